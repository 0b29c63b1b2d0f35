"""Trust, second pass (issue 16): what a run does when something goes wrong after start-up.

    python -m pytest tests/test_trust2.py -q

Errors with DataLoader workers alive end the process with its exit code (on one process and under torchrun), a real
failed save (a file size limit the kernel enforces, not a faked OSError) is one line and leaves a resumable
checkpoint, a resume file refuses another stage's or dataset's run, loaded weights are checked for NaN/inf and their
dtype, one huge record is cut before tokenizing, and the smaller rough edges of a first hour.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import DEMO, ROOT, TINY, dirs, run_inprocess, script_env

PRE = "trainer/train_pretrain.py"
SFT = "trainer/train_full_sft.py"

# Runs a training script after patching TrainLoop._optimizer_step to call `fault(loop)` after every step: the test's
# way to make something go wrong in the middle of a real run (a crash in the step, the data file cut short, ...).
DRIVER = textwrap.dedent("""\
    import os, runpy, sys
    sys.path.insert(0, {root!r})
    from trainer.trainer_utils import TrainLoop
    step = TrainLoop._optimizer_step

    def fault(loop):
    {fault}

    def patched(self):
        step(self)
        fault(self)
    TrainLoop._optimizer_step = patched
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """)


def driver(tmp: Path, fault: str) -> Path:
    path = tmp / "driver.py"
    path.write_text(DRIVER.format(root=str(ROOT), fault=textwrap.indent(textwrap.dedent(fault), "    ")))
    return path


def run_with_timeout(cmd, tmp: Path, timeout: int, env: dict | None = None) -> tuple[int, str]:
    """(exit code, output); a process still alive after `timeout` seconds fails the test (and is stopped)."""
    log = tmp / "run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or script_env(tmp), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the script, torchrun and their workers
            proc.wait()
            pytest.fail(f"still running {timeout}s after start (hung):\n{log.read_text()[-3000:]}")
    return rc, log.read_text()


# With 2 workers per process every error below happens while workers are alive. The timeouts are several times a
# run's length on a loaded 2-core machine (~30 s one process); a hang is forever.
WORKERS = [*TINY[:6], "--num_workers", "2", *TINY[8:]]


def pretrain_args(tmp, *extra):
    return [*WORKERS, *dirs(tmp), "--data_path", DEMO / "pretrain.jsonl", "--batch_size", "2",
            "--accumulation_steps", "1", "--max_steps", "200", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("fault,code,expect", [
    # an error nobody expected (e.g. out of memory): Python prints the traceback, and the process must still end
    ("if loop.opt_step == 2: raise RuntimeError('out of memory (simulated)')", 1, "out of memory (simulated)"),
    # a user error raised inside the loop (here: a save that cannot be written): the one line, then exit 1
    ("if loop.opt_step == 2:\n    from trainer.trainer_utils import SaveError\n"
     "    raise SaveError('cannot write x (simulated)')", 1, "error: cannot write x (simulated)"),
], ids=["unexpected_error", "user_error"])
def test_an_error_with_dataloader_workers_alive_ends_the_process(fault, code, expect, tmp_path):
    rc, out = run_with_timeout([sys.executable, driver(tmp_path, fault), ROOT / PRE, *pretrain_args(tmp_path)],
                               tmp_path, timeout=120)
    assert rc == code and expect in out


@pytest.mark.slow
def test_data_file_cut_short_while_training_is_one_line_and_the_end(tmp_path):
    data = tmp_path / "pretrain.jsonl"
    shutil.copy(DEMO / "pretrain.jsonl", data)
    fault = f"if loop.opt_step == 1: open({str(data)!r}, 'w').close()"
    args = [*pretrain_args(tmp_path)]
    args[args.index("--data_path") + 1] = data
    rc, out = run_with_timeout([sys.executable, driver(tmp_path, fault), ROOT / PRE, *args], tmp_path, timeout=120)
    assert rc == 1 and "Traceback" not in out
    assert f"{data}:" in out and "not valid JSON" in out


@pytest.mark.slow
def test_an_error_on_one_rank_with_workers_ends_torchrun_and_is_the_last_thing_shown(tmp_path):
    """Rank 1 fails in the middle of the run with 2 workers alive; rank 0 waits in the step's all-reduce. Both must
    end (the process group's timeout is set far beyond the test's, so only a prompt exit passes), the error is
    printed once, torchrun's closing summary carries it, and no rank prints a traceback or a DDP FutureWarning."""
    fault = ("if loop.opt_step == 2 and loop.ctx.rank == 1:\n    from trainer.trainer_utils import UserError\n"
             "    raise UserError('the data of rank 1 broke (simulated)')")
    env = {**script_env(tmp_path), "MINIMIND_DIST_TIMEOUT": "600"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           driver(tmp_path, fault), ROOT / PRE, *pretrain_args(tmp_path)]
    rc, out = run_with_timeout(cmd, tmp_path, timeout=180, env=env)
    assert rc != 0 and "broadcast_buffers" not in out and "FutureWarning" not in out
    assert out.count("Traceback") <= 1 and "File \"" + str(ROOT / "trainer") not in out  # only torchrun's own
    root_cause = out[out.index("Root Cause"):]
    assert "[rank 1] error: the data of rank 1 broke (simulated)" in root_cause


# ------------------------------------------------------------------------------------------------ a real failed save

def limit_file_size_after_step(monkeypatch, step: int, limit: int):
    """From optimizer step `step` on, files this process writes may not grow past `limit` bytes: the kernel refuses
    the write (EFBIG; Python ignores SIGXFSZ), exactly as a full disk refuses it. Only the soft limit is lowered."""
    import resource
    from trainer.trainer_utils import TrainLoop
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    original = TrainLoop._optimizer_step

    def step_then_limit(self):
        original(self)
        if self.opt_step + 1 == step:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    monkeypatch.setattr(TrainLoop, "_optimizer_step", step_then_limit)
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("limit,failed,written", [
    (200_000, ["checkpoints/pretrain_64_resume.pth", "out/pretrain_64.pth"], []),  # both larger: nothing new
    (3_000_000, ["checkpoints/pretrain_64_resume.pth"], ["out/pretrain_64.pth"]),  # weights ~1 MB, resume ~6 MB
], ids=["both_fail", "resume_fails_weights_written"])
def test_a_real_failed_save_is_one_line_and_leaves_a_resumable_checkpoint(limit, failed, written, tmp_path, capsys,
                                                                         monkeypatch):
    restore = limit_file_size_after_step(monkeypatch, 3, limit)
    args = [*TINY, *dirs(tmp_path), "--data_path", DEMO / "pretrain.jsonl", "--batch_size", "2",
            "--accumulation_steps", "1", "--max_steps", "4", "--save_interval", "2"]
    try:
        code, _, err = run_inprocess(PRE, *args, capsys=capsys)
    finally:
        restore()
    monkeypatch.undo()
    assert code == 1 and "Traceback" not in err, err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and all(f"cannot write {tmp_path / f}" in line[0] for f in failed), err
    assert all(str(tmp_path / f) in line[0] for f in written) and "--from_resume 1" in line[0]
    assert not list(tmp_path.glob("*/*.tmp*"))  # the half-written temp files are gone
    ckp = torch.load(tmp_path / "checkpoints/pretrain_64_resume.pth", weights_only=True)
    assert ckp["opt_step"] == 2  # the previous resume file, intact
    side = json.loads((tmp_path / "out/pretrain_64.json").read_text())
    assert side["step"] == (4 if written else 2)
    assert len(torch.load(tmp_path / "out/pretrain_64.pth", weights_only=True)) > 0
    code, out, _ = run_inprocess(PRE, *args, "--from_resume", "1", capsys=capsys)
    assert code == 0 and "resumed from" in out and "step 2" in out


# ------------------------------------------------------------------------------------------------ resume identity

def test_a_resume_file_of_another_stage_data_or_seed_is_refused(tmp_path, capsys):
    base = [*TINY, *dirs(tmp_path), "--batch_size", "2", "--accumulation_steps", "1", "--from_weight", "none"]
    pre = [*base, "--data_path", DEMO / "pretrain.jsonl", "--save_weight", "full_sft", "--max_steps", "2"]
    assert run_inprocess(PRE, *pre, capsys=capsys)[0] == 0
    resume = tmp_path / "checkpoints" / "full_sft_64_resume.pth"
    before = resume.read_bytes()

    # SFT with the pretraining run's resume file (same --save_weight): refused, nothing touched
    code, _, err = run_inprocess(SFT, *base, "--data_path", DEMO / "sft.jsonl", "--max_steps", "4",
                                 "--from_resume", "1", capsys=capsys)
    assert code == 1 and "Traceback" not in err
    assert f"resume file {resume} belongs to another run (stage Pretrain, data {DEMO / 'pretrain.jsonl'}" in err
    assert f"not this one (stage Full-SFT, data {DEMO / 'sft.jsonl'}" in err
    assert "pass another --save_weight" in err and "delete the resume file" in err
    assert resume.read_bytes() == before

    # the same stage on other data, or with another seed: refused too
    other = tmp_path / "other.jsonl"
    other.write_text("".join((DEMO / "pretrain.jsonl").read_text().splitlines(keepends=True)[:1000]))
    code, _, err = run_inprocess(PRE, *[str(a) for a in pre[:-1]], "4", "--data_path", other, "--from_resume", "1",
                                 capsys=capsys)
    assert code == 1 and "belongs to another run" in err and "(1000 records" in err
    code, _, err = run_inprocess(PRE, *pre[:-1], "4", "--seed", "7", "--from_resume", "1", capsys=capsys)
    assert code == 1 and "seed 42), not this one" in err and "seed 7)" in err

    # an identical copy of the data elsewhere is the same data
    copy = tmp_path / "copy.jsonl"
    shutil.copy(DEMO / "pretrain.jsonl", copy)
    code, out, _ = run_inprocess(PRE, *pre[:-1], "3", "--data_path", copy, "--from_resume", "1", capsys=capsys)
    assert code == 0 and "resumed from" in out and "step 3/3" in out

    # a resume file from before the record: used, with a warning
    ckp = torch.load(resume, weights_only=True)
    del ckp["run_identity"]
    torch.save(ckp, resume)
    code, out, _ = run_inprocess(PRE, *pre[:-1], "4", "--from_resume", "1", capsys=capsys)
    assert code == 0 and "does not record which stage and data it belongs to" in out and "step 4/4" in out


# ------------------------------------------------------------------------------------------------ progress and files

def test_the_plan_and_the_first_step_are_printed_and_a_failed_fresh_run_keeps_the_old_metrics(tmp_path, capsys,
                                                                                            monkeypatch):
    args = [*TINY, *dirs(tmp_path), "--data_path", DEMO / "pretrain.jsonl", "--batch_size", "4",
            "--accumulation_steps", "2", "--max_steps", "3", "--log_interval", "100"]
    code, out, _ = run_inprocess(PRE, *args, capsys=capsys)
    assert code == 0
    assert ("plan: 5,000 samples x 1 epoch(s) -> 3 optimizer steps; 8 samples per step (4 batch x 2 accumulation "
            "x 1 process(es)), up to 1,024 tokens per step (--max_seq_len 128)") in out
    assert f"weights -> {tmp_path / 'out' / 'pretrain_64.pth'}" in out
    assert "step 1/3 |" in out and "step 2/3 |" not in out and "step 3/3 |" in out
    metrics = tmp_path / "checkpoints" / "pretrain_64_metrics.jsonl"
    assert [json.loads(r)["global_step"] for r in metrics.read_text().splitlines()] == [3]  # rows stay per interval
    before = metrics.read_bytes()

    # a fresh run that fails in its first step leaves the previous run's metrics as they were
    from trainer.trainer_utils import TrainLoop, UserError

    def fail(self):
        raise UserError("simulated failure in the first step")
    monkeypatch.setattr(TrainLoop, "_optimizer_step", fail)
    code, _, err = run_inprocess(PRE, *args, capsys=capsys)
    assert code == 1 and "simulated failure" in err
    assert metrics.read_bytes() == before


def test_raising_max_steps_on_resume_says_the_lr_schedule_changes(tmp_path, capsys):
    args = [*TINY, *dirs(tmp_path), "--data_path", DEMO / "pretrain.jsonl", "--batch_size", "2",
            "--accumulation_steps", "1", "--learning_rate", "1e-3"]
    assert run_inprocess(PRE, *args, "--max_steps", "4", capsys=capsys)[0] == 0
    code, out, _ = run_inprocess(PRE, *args, "--max_steps", "8", "--from_resume", "1", capsys=capsys)
    # get_lr by hand: step k (1-based) uses 0.1 + 0.45 * (1 + cos(pi * (k - 1) / total)) times the peak lr; step 4
    # of 4: 0.1 + 0.45 * (1 - 0.70711) = 0.23180; step 5 of 8: 0.1 + 0.45 * (1 + 0) = 0.55
    assert code == 0 and "NOTE: --max_steps 4 -> 8 changes the learning-rate schedule" in out
    assert "lr goes from 2.318e-04 (step 4) to 5.500e-04 (step 5)" in out
    code, out, _ = run_inprocess(PRE, *args, "--max_steps", "9", "--from_resume", "1", capsys=capsys)
    assert code == 0 and "--max_steps 8 -> 9" in out


# ------------------------------------------------------------------------------------------------ one huge record

class CountingTokenizer:
    """The real tokenizer, recording the longest text it was asked to tokenize."""

    def __init__(self, tokenizer):
        self.tok, self.longest = tokenizer, 0

    def __call__(self, text, *a, **k):
        self.longest = max(self.longest, len(text))
        return self.tok(text, *a, **k)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_one_huge_record_is_cut_by_characters_before_tokenizing_and_gives_the_same_tokens(tmp_path):
    from dataset.lm_dataset import PretrainDataset, RLAIFDataset, SFTDataset
    from trainer.rl_utils import fit_prompt
    from trainer.trainer_utils import load_tokenizer, root_path
    tok = CountingTokenizer(load_tokenizer(root_path("model")))
    huge = "长文本 long text, 第二句。" * 8000 + " the end"  # 168k characters, tokens of a few characters each
    (tmp_path / "pre.jsonl").write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": huge}) + "\n")
    conv = [{"role": "user", "content": huge}, {"role": "assistant", "content": "ok"}]
    (tmp_path / "sft.jsonl").write_text(json.dumps({"conversations": conv}, ensure_ascii=False) + "\n")
    for cls, path in ((PretrainDataset, "pre.jsonl"), (SFTDataset, "sft.jsonl")):
        ds = cls(tmp_path / path, tok, max_length=64, target_sample=0)
        tok.longest = 0
        cut = ds[len(ds) - 1]
        assert 0 < tok.longest <= ds.max_chars + 100 < len(huge) // 5  # (+100: the chat markup)
        ds.max_chars = 10 ** 9  # nothing cut: the whole record tokenized
        whole = ds[len(ds) - 1]
        assert torch.equal(cut["input_ids"], whole["input_ids"]) and torch.equal(cut["labels"], whole["labels"])
        assert len(cut["input_ids"]) == 64

    # RL prompts keep their head and tail: the fitted prompt is the one the whole record gives
    rl = [{"role": "user", "content": huge}, {"role": "assistant", "content": "42"}]
    (tmp_path / "rl.jsonl").write_text(json.dumps({"conversations": rl}, ensure_ascii=False) + "\n")
    ds = RLAIFDataset(tmp_path / "rl.jsonl", tok.tok, max_length=64, target_sample=0)
    cut = ds[0]
    assert len(cut["prompt"]) < 2 * ds.max_chars + 100 and cut["answer"] == "42"
    ds.max_chars = 10 ** 9
    assert fit_prompt(tok.tok, cut["prompt"], 64) == fit_prompt(tok.tok, ds[0]["prompt"], 64)


# ------------------------------------------------------------------------------------------------ files that lie

def test_loaded_weights_are_checked_for_nan_inf_and_dtype(tiny_random, tmp_path, capsys):
    shutil.copytree(tiny_random / "out", tmp_path / "out")
    path = tmp_path / "out" / "pretrain_64.pth"
    good = torch.load(path, weights_only=True)
    args = [*TINY, *dirs(tmp_path), "--data_path", DEMO / "sft.jsonl", "--max_steps", "1"]
    key = "model.layers.1.mlp.up_proj.weight"
    for change, expect in [
        (lambda t: t.fill_(float("nan")), f"weight file {path}: tensor {key} holds {good[key].numel()} NaN/inf"),
        (lambda t: t.index_fill_(0, torch.tensor([3, 5]), float("inf")),
         f"weight file {path}: tensor {key} holds {2 * good[key].shape[1]} NaN/inf value(s)"),
        (lambda t: t.round().to(torch.int64), f"weight file {path}: tensor {key} has dtype int64, not a float type"),
    ]:
        sd = {k: v.clone() for k, v in good.items()}
        sd[key] = change(sd[key])
        torch.save(sd, path)
        code, _, err = run_inprocess(SFT, *args, "--from_weight", "pretrain", capsys=capsys)
        assert code == 1 and "Traceback" not in err and expect in err, err


def test_a_malicious_pickle_is_called_unsafe_not_truncated(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    (ck / "pretrain_64_resume.pth").write_bytes(pickle.dumps({"model": Evil()}))
    args = [*TINY, *dirs(tmp_path), "--data_path", DEMO / "pretrain.jsonl", "--max_steps", "1", "--from_resume", "1"]
    code, _, err = run_inprocess(PRE, *args, capsys=capsys)
    assert code == 1 and not (tmp_path / "pwned").exists()
    assert "is not a weights file: it asks the loader to create Python objects" in err and "truncated" not in err
    assert err.strip().count("\n") == 0, err  # one line: no pickle-protocol warning before it


@pytest.mark.parametrize("case", ["symlink_loop", "device_gpu", "gzip_named_jsonl"])
def test_more_bad_input_is_one_line(case, tmp_path, capsys):
    import gzip
    data = DEMO / "pretrain.jsonl"
    extra = []
    if case == "symlink_loop":
        os.symlink(tmp_path / "b.jsonl", tmp_path / "a.jsonl")
        os.symlink(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
        data, expect = tmp_path / "a.jsonl", "is a symbolic link that points back to itself"
    elif case == "device_gpu":
        extra, expect = ["--device", "gpu"], "--device gpu is not a device name torch knows; pass cpu, cuda"
    else:
        data = tmp_path / "pretrain.jsonl"
        data.write_bytes(gzip.compress((DEMO / "pretrain.jsonl").read_bytes()[:2000]))
        expect = f"{data} is a gzip-compressed file, not JSONL text (whatever its name says); unpack it first, e.g. " \
                 f"gunzip -c {data} > unpacked.jsonl"
    code, _, err = run_inprocess(PRE, *TINY, *dirs(tmp_path), "--data_path", data, "--max_steps", "1", *extra,
                                 capsys=capsys)
    assert code == 1 and "Traceback" not in err and expect in err, err


def test_readme_and_the_missing_data_message_name_the_same_dataset_ids():
    from dataset.lm_dataset import DATA_HELP
    for readme in ("README.md", "README_en.md"):
        text = (ROOT / readme).read_text()
        for dataset_id in ("gongjy/minimind_dataset", "jingyaogong/minimind_dataset"):
            assert dataset_id in text and dataset_id in DATA_HELP
        assert "ModelScope 上的 `gongjy/minimind_dataset`" in text or "`gongjy/minimind_dataset` on ModelScope" in text
    assert "ModelScope gongjy/minimind_dataset" in DATA_HELP
