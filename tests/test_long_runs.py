"""Long runs you can trust: good weights survive NaN, stop signals and full disks; the loss is weighted by tokens
across micro-batches and ranks; the LR follows samples; --max_steps, resume and the metrics hold together.

    python -m pytest tests/test_long_runs.py -q

Most runs are in-process (conftest.run_inprocess). One torchrun launch (the `ddp` fixture) runs every 2-rank job.
"""
import json
import os
import shutil
import signal
import sys
import time
import types

import pytest
import torch

from conftest import (DEMO, ROOT, TINY, dirs, read_metrics, run_inprocess, run_torchrun, run_until_sigint,
                      signal_after_step)
from grad_probe import record_first_step
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.trainer_utils import (StopSignals, TrainLoop, check_tokenizer, default_num_workers, get_lr,
                                   load_tokenizer, root_path, run_main, save_weights)

PRE, SFT, DPO, DIST = ("trainer/train_pretrain.py", "trainer/train_full_sft.py", "trainer/train_dpo.py",
                       "trainer/train_distillation.py")
F32 = ["--dtype", "float32"]
ONE = ["--accumulation_steps", "1"]  # pretraining defaults to 8


def lines(src, n, dst):
    dst.write_text("".join(open(src, encoding="utf-8").readlines()[:n]), encoding="utf-8")
    return dst


def weights(path):
    return torch.load(path, weights_only=True)


# ------------------------------------------------------------------------------------------------ good weights survive

def test_nan_steps_are_skipped_then_the_run_stops_and_the_good_weights_survive(tiny_random, tmp_path, capsys):
    shutil.copytree(tiny_random / "out", tmp_path / "out")
    good = tmp_path / "out" / "pretrain_64.pth"
    before = good.read_bytes()
    # --learning_rate 1e3 makes the loss blow up after the first update (measured in the issue: NaN weights saved)
    code, out, err = run_inprocess(PRE, *TINY, *ONE, *dirs(tmp_path), "--data_path", DEMO / "pretrain.jsonl",
                                   "--from_weight", "pretrain", "--save_weight", "pretrain", "--learning_rate", "1e3",
                                   "--batch_size", "4", "--max_steps", "30", "--log_interval", "1",
                                   "--save_interval", "100", "--max_bad_steps", "3", capsys=capsys)
    assert code == 3 and "Traceback" not in err
    assert out.count("update skipped") == 3 and "skipped 2 |" in out  # each bad step counted and logged
    assert "training diverged: 3 optimizer steps in a row had a non-finite loss or gradient norm" in err
    assert f"(last at step 4, lr {get_lr(3, 30, 1e3):.3e})" in err and "this run saved nothing" in err
    assert "Lower --learning_rate" in err
    assert good.read_bytes() == before  # bit-identical
    assert not (tmp_path / "checkpoints" / "pretrain_64_resume.pth").exists()


def test_non_finite_weights_are_never_written(tiny_random, tmp_path):
    path = tmp_path / "w_64.pth"
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2)
    sd = MiniMindForCausalLM(config).state_dict()
    sd["model.norm.weight"][3] = float("nan")
    with pytest.raises(Exception, match="NaN/inf; nothing was written"):
        save_weights(sd, str(path), config)
    sd["model.norm.weight"][3] = 1e6  # finite in fp32, inf in the fp16 file
    with pytest.raises(Exception, match="exceeds the float16 range"):
        save_weights(sd, str(path), config)
    assert list(tmp_path.iterdir()) == []


def test_sigint_saves_a_resume_point_and_the_resumed_run_reaches_the_uninterrupted_weights(tmp_path, capsys):
    data = lines(DEMO / "pretrain.jsonl", 240, tmp_path / "data.jsonl")
    args = [*TINY, *ONE, "--data_path", data, "--batch_size", "4", "--log_interval", "1", "--save_interval", "1000",
            "--learning_rate", "1e-3"]
    ref, part = tmp_path / "ref", tmp_path / "part"
    assert run_inprocess(PRE, *args, *dirs(ref), capsys=capsys)[0] == 0  # uninterrupted: 60 steps
    # a real process with a DataLoader worker (which must ignore the Ctrl-C that reaches the whole process group)
    code, err = run_until_sigint(PRE, *args, *dirs(part), "--num_workers", "1", tmp=part, marker="step 2/60")
    assert code == 130, err
    stopped = int(err.split("stopped at step ")[1].split(";")[0])
    assert 2 <= stopped < 60 and "; resume with --from_resume 1" in err and "Traceback" not in err
    ckp = torch.load(part / "checkpoints" / "pretrain_64_resume.pth", weights_only=True)
    assert ckp["opt_step"] == stopped and ckp["samples"] == 4 * stopped
    assert json.loads((part / "out" / "pretrain_64.json").read_text())["step"] == stopped  # same step as resume
    code, out, _ = run_inprocess(PRE, *args, *dirs(part), "--from_resume", "1", capsys=capsys)
    assert code == 0 and f"step {stopped + 1}/60" in out
    a, b = weights(ref / "out" / "pretrain_64.pth"), weights(part / "out" / "pretrain_64.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["global_step"] for r in read_metrics(part, "pretrain")]
    assert steps == list(range(1, 61))  # one clean curve in the metrics file


def test_a_second_signal_stops_at_once(capsys):
    guard = StopSignals()
    guard.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert guard.received == signal.SIGINT  # the first only raises the flag
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        guard.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        run_main(interrupted)
    assert e.value.code == 130 and "interrupted: stopped at once" in capsys.readouterr().err


def test_full_disk_names_the_file_keeps_the_previous_save_and_stale_temps_go(tiny_random, tmp_path, capsys,
                                                                            monkeypatch):
    out, ck = tmp_path / "out", tmp_path / "checkpoints"
    out.mkdir(), ck.mkdir()
    stale = [out / "pretrain_64.pth.tmp4242", out / "pretrain_64.json.tmp4242", ck / "pretrain_64_resume.pth.tmp7"]
    for p in stale + [out / "other_64.pth.tmp1"]:
        p.write_bytes(b"x" * 100)
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):  # the fourth torch.save (the second save's weights) hits a full disk mid-write
        calls.append(f)
        if len(calls) == 4:
            open(f, "wb").write(b"partial")
            raise OSError(28, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    code, stdout, err = run_inprocess(PRE, *TINY, *dirs(tmp_path), "--data_path", DEMO / "pretrain.jsonl",
                                      "--batch_size", "2", "--max_steps", "4", "--save_interval", "2", capsys=capsys)
    assert code == 1 and "Traceback" not in err
    assert f"cannot write {out / 'pretrain_64.pth'}: No space left on device" in err and "--from_resume 1" in err
    assert "removed 3 temporary file(s)" in stdout and not any(p.exists() for p in stale)
    assert (out / "other_64.pth.tmp1").exists()  # not this run's name: left alone
    assert sorted(p.name for p in out.iterdir()) == ["other_64.pth.tmp1", "pretrain_64.json", "pretrain_64.pth"]
    monkeypatch.undo()
    assert json.loads((out / "pretrain_64.json").read_text())["step"] == 2  # the previous save, intact
    # the resume file is written first and on its own: the run can go on from the step whose weights failed
    assert torch.load(ck / "pretrain_64_resume.pth", weights_only=True)["opt_step"] == 4
    assert "resume with --from_resume 1 from step 4" in err
    assert len(weights(out / "pretrain_64.pth")) > 0


# ------------------------------------------------------------------------------------------------ steps and resume

def test_max_steps_counts_optimizer_steps_ends_the_cosine_and_a_finished_resume_says_so(tmp_path, capsys):
    args = [*TINY, *dirs(tmp_path), "--data_path", DEMO / "pretrain.jsonl", "--batch_size", "2",
            "--accumulation_steps", "2", "--max_steps", "3", "--log_interval", "1", "--learning_rate", "1e-3"]
    code, out, _ = run_inprocess(PRE, *args, capsys=capsys)
    assert code == 0 and "step 3/3" in out
    rows = read_metrics(tmp_path, "pretrain")
    assert [(r["global_step"], r["micro_step"], r["samples"]) for r in rows] == [(1, 2, 4), (2, 4, 8), (3, 6, 12)]
    assert [r["lr"] for r in rows] == pytest.approx([get_lr(s, 3, 1e-3) for s in range(3)], rel=1e-12)
    before = (tmp_path / "out" / "pretrain_64.pth").read_bytes()
    code, out, err = run_inprocess(PRE, *args, "--from_resume", "1", capsys=capsys)
    assert code == 0 and "already finished at step 3" in err + out and "--from_resume 0 to start over" in err + out
    assert (tmp_path / "out" / "pretrain_64.pth").read_bytes() == before
    assert len(read_metrics(tmp_path, "pretrain")) == 3


def test_progress_after_resume_with_another_batch_size(tmp_path, capsys, monkeypatch):
    data = lines(DEMO / "pretrain.jsonl", 40, tmp_path / "d.jsonl")
    args = [*TINY, *ONE, *dirs(tmp_path), "--data_path", data, "--log_interval", "1"]
    signal_after_step(monkeypatch, 2)
    code, out, err = run_inprocess(PRE, *args, "--batch_size", "4", capsys=capsys)
    assert code == 130 and "step 1/10" in out and "stopped at step 2" in err  # 40 samples / 4
    monkeypatch.undo()
    code, out, _ = run_inprocess(PRE, *args, "--batch_size", "8", "--from_resume", "1", capsys=capsys)
    assert code == 0 and "step 3/6 " in out and "step 6/6 " in out  # 8 done, 32 left = 4 steps of 8


def test_wandb_rewinds_to_the_resumed_step_and_the_metrics_file_drops_later_rows(tmp_path, capsys, monkeypatch):
    runs = []

    class Run:
        id = "run42"

        def __init__(self, **kw):
            self.kw, self.steps = kw, []
            runs.append(self)

        def log(self, row, step):
            self.steps.append(step)

        def finish(self):
            pass
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: Run(**kw)))
    data = lines(DEMO / "pretrain.jsonl", 24, tmp_path / "d.jsonl")
    args = [*TINY, *ONE, *dirs(tmp_path), "--data_path", data, "--batch_size", "4", "--log_interval", "1",
            "--save_interval", "2", "--use_wandb"]
    original = TrainLoop._optimizer_step

    def crash_at_step_4(self):  # the process dies after step 3 was logged; the last save was at step 2
        if self.opt_step == 3:
            raise RuntimeError("simulated crash")
        original(self)
    monkeypatch.setattr(TrainLoop, "_optimizer_step", crash_at_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_inprocess(PRE, *args, capsys=capsys)
    monkeypatch.setattr(TrainLoop, "_optimizer_step", original)
    assert runs[0].steps == [1, 2, 3] and [r["global_step"] for r in read_metrics(tmp_path, "pretrain")] == [1, 2, 3]
    assert run_inprocess(PRE, *args, "--from_resume", "1", capsys=capsys)[0] == 0
    assert runs[1].kw["resume_from"] == "run42?_step=2" and "id" not in runs[1].kw
    assert runs[1].steps == [3, 4, 5, 6]  # continues after the rewind point: never backwards, nothing dropped
    assert [r["global_step"] for r in read_metrics(tmp_path, "pretrain")] == [1, 2, 3, 4, 5, 6]


def test_packed_length_grouped_sft_resumes_exactly_and_logs_the_real_token_share(tmp_path, capsys, monkeypatch):
    """--pack 1 --group_by_length 1 (the SFT defaults): a run stopped mid-epoch and resumed ends with the weights of
    an uninterrupted run; the progress line and the metrics report the batches' real-token share."""
    from dataset.lm_dataset import GROUP_FILL, SFTDataset, collate_lm, collate_packed
    from trainer.trainer_utils import SkipBatchSampler
    data = lines(DEMO / "sft.jsonl", 96, tmp_path / "sft.jsonl")
    args = [*TINY, *F32, "--data_path", data, "--from_weight", "none", "--batch_size", "8", "--epochs", "2",
            "--log_interval", "1", "--learning_rate", "1e-3"]
    ref, part = tmp_path / "ref", tmp_path / "part"
    code, out, _ = run_inprocess(SFT, *args, *dirs(ref), capsys=capsys)
    assert code == 0 and "length-grouped batches: chunks of 64 x 8 samples pre-packed into rows of ~122 tokens" in out
    # the first step's batch, rebuilt: the grouped sampler's first 8 samples, packed
    ds = SFTDataset(data, load_tokenizer(root_path("model")), max_length=128)
    first = next(iter(SkipBatchSampler(len(ds), 8, lengths=ds.lengths, group_size=8,
                                       width=round(GROUP_FILL * 128 * ds.bytes_per_token, 3))))
    packed, padded = collate_packed([ds[i] for i in first], 128), collate_lm([ds[i] for i in first])
    share = int(packed["attention_mask"].sum()) / packed["attention_mask"].numel()
    rows = read_metrics(ref, "full_sft")
    assert rows[0]["real_tokens"] == pytest.approx(share, rel=1e-12)
    assert share > 0.95 and share > int(padded["attention_mask"].sum()) / padded["attention_mask"].numel()
    assert f"| real {share:.0%} |" in out.splitlines()[[i for i, x in enumerate(out.splitlines())
                                                          if "step 1/24" in x][0]]
    signal_after_step(monkeypatch, 7)  # mid-epoch: 12 steps per epoch
    assert run_inprocess(SFT, *args, *dirs(part), capsys=capsys)[0] == 130
    monkeypatch.undo()
    code, out, _ = run_inprocess(SFT, *args, *dirs(part), "--from_resume", "1", capsys=capsys)
    assert code == 0 and "step 8/24" in out
    a, b = weights(ref / "out" / "full_sft_64.pth"), weights(part / "out" / "full_sft_64.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ token weighting

def by_position(values):
    """Lay values out so that the k-th sample the (seed 42, epoch 0) sampler yields gets values[k]."""
    order = torch.randperm(len(values), generator=torch.Generator().manual_seed(42)).tolist()
    out = [None] * len(values)
    for k, i in enumerate(order):
        out[i] = values[k]
    return out


def skewed_sft(path):
    """8 conversations: the first micro-batch of 4 (and rank 0's half) holds ~30x the answer tokens of the rest."""
    with open(path, "w", encoding="utf-8") as f:
        for i, n in enumerate(by_position([90, 1, 60, 2, 3, 1, 2, 1])):
            f.write(json.dumps({"conversations": [{"role": "user", "content": f"question {i}"},
                                                  {"role": "assistant", "content": " ".join(["word"] * n)}]}) + "\n")
    return path


def skewed_dpo(path):
    """8 pairs of skewed lengths; 3 of the second micro-batch's 4 pairs lose every answer token to --max_seq_len
    (a 200-word prompt), so valid pairs per micro-batch are 4 and 1."""
    pairs = [(1, 30), (50, 2), (3, 3), (80, 1), (2, 60), (5, 9), (40, 40), (1, 1)]
    cut = by_position([False] * 5 + [True] * 3)
    with open(path, "w", encoding="utf-8") as f:
        for i, ((c, r), long) in enumerate(zip(by_position(pairs), cut)):
            prompt = [{"role": "user", "content": ("a long question " * 70 if long else "") + f"question {i}"}]
            f.write(json.dumps({"chosen": prompt + [{"role": "assistant", "content": "yes " * c}],
                                "rejected": prompt + [{"role": "assistant", "content": "no " * r}]}) + "\n")
    return path


# script, extra args (8 samples = one global batch; --grad_clip 0 so the probe sees the raw gradient). The stages'
# defaults --pack 1 --group_by_length 1 apply: 8 x 1, 4 x 2 and 2 ranks x 4 pack their micro-batches differently
STAGES = {
    "sft": (SFT, ["--from_weight", "none"]),
    "dpo": (DPO, ["--from_weight", "none", "--loss_type", "sigmoid"]),
    "distillation": (DIST, ["--student_hidden_size", "64", "--student_num_layers", "2", "--from_student_weight",
                            "none", "--teacher_hidden_size", "64", "--teacher_num_layers", "2",
                            "--from_teacher_weight", "pretrain", "--alpha", "0.3"]),
}


def stage_args(stage, tmp, batch, accum):
    script, extra = STAGES[stage]
    data = tmp / ("dpo.jsonl" if stage == "dpo" else "sft.jsonl")
    tiny = TINY[4:] if stage == "distillation" else TINY  # distillation has per-model size flags
    return [*tiny, *F32, "--save_dir", tmp / "out", "--checkpoint_dir", tmp / f"ck_{stage}_{batch}x{accum}",
            "--data_path", data, "--batch_size", batch, "--accumulation_steps", accum, "--max_steps", "1",
            "--grad_clip", "0", "--learning_rate", "1e-3", *extra]


@pytest.fixture(scope="module")
def ddp(tiny_random, tmp_path_factory):
    """The 2-rank side of every multi-process check, in one torchrun launch: the first-step gradients of SFT, DPO
    and distillation with 2 ranks x 4 x 1 on the skewed data, and a 1-process pretraining run (stopped by a
    signal) resumed on 2 processes."""
    tmp = tmp_path_factory.mktemp("ddp")
    shutil.copytree(tiny_random / "out", tmp / "out")
    skewed_sft(tmp / "sft.jsonl"), skewed_dpo(tmp / "dpo.jsonl")
    # 1 process, batch 4: stop after step 5 (20 of 96 samples), to be resumed on 2 processes (packed, grouped order)
    lr_args = [*TINY, *ONE, "--save_dir", tmp / "lr_out", "--checkpoint_dir", tmp / "lr_ck", "--data_path",
               lines(DEMO / "pretrain.jsonl", 96, tmp / "pre.jsonl"), "--batch_size", "4", "--log_interval", "1",
               "--learning_rate", "1e-3", "--group_by_length", "1"]
    mp = pytest.MonkeyPatch()
    signal_after_step(mp, 5)
    code = subprocess_free_run(lr_args)
    mp.undo()
    assert code == 130
    jobs = [{"script": STAGES[s][0], "args": list(map(str, stage_args(s, tmp, 4, 1))), "grads": str(tmp / f"{s}.pt")}
            for s in STAGES]
    jobs.append({"script": PRE, "args": list(map(str, [*lr_args, "--from_resume", "1"])), "grads": None})
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    out = run_torchrun("tests/grad_probe.py", tmp / "jobs.json", tmp=tmp, timeout=400)
    return tmp, out, lr_args


def subprocess_free_run(args):
    import runpy
    argv, sys.argv = sys.argv, [str(ROOT / PRE), *map(str, args)]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = argv


def first_step_grads(args, capsys):
    grads = {}
    original = record_first_step(None, grads)
    try:
        script = STAGES[args[0]][0]
        code, _, err = run_inprocess(script, *args[1:], capsys=capsys)
    finally:
        TrainLoop._optimizer_step = original
    assert code == 0, err
    return grads


def ddp_units(stage, tmp, capsys):
    """The unit counts the loop gives the micro-batches of the 4 x 2 run."""
    seen = []
    original = TrainLoop.backward

    def spy(self, loss, units=None, **kw):
        seen.append(units)
        return original(self, loss, units=units, **kw)
    TrainLoop.backward = spy
    try:
        first_step_grads([stage, *stage_args(stage, tmp, 4, 2)], capsys)
    finally:
        TrainLoop.backward = original
    return seen[:2]


def rel_diff(a, b):
    assert a.keys() == b.keys()
    da = torch.cat([(a[k] - b[k]).flatten() for k in a])
    return (da.norm() / torch.cat([a[k].flatten() for k in a]).norm()).item()


@pytest.mark.parametrize("stage", list(STAGES))
def test_gradient_is_the_same_for_8x1_4x2_and_2_ranks_x_4(stage, ddp, capsys):
    tmp, _, _ = ddp
    g81 = first_step_grads([stage, *stage_args(stage, tmp, 8, 1)], capsys)
    g42 = first_step_grads([stage, *stage_args(stage, tmp, 4, 2)], capsys)
    g2r = torch.load(tmp / f"{stage}.pt", weights_only=True)
    assert rel_diff(g81, g42) < 1e-5
    assert rel_diff(g81, g2r) < 1e-5
    # the two micro-batches of 4 x 2 hold very different numbers of units: a mean of their means would differ
    units = [u for u in ddp_units(stage, tmp, capsys)]
    assert max(units) > 3 * min(units), units


def test_lr_follows_samples_after_a_world_size_change(ddp, capsys, tmp_path):
    tmp, out, lr_args = ddp
    assert "resumed from" in out and "(saved with world size 1, now 2)" in out
    assert "step 6/15" in out  # 20 samples done, 76 left at 8 per step: 10 more steps
    # the uninterrupted 1-process run logs the lr of every step; match steps by the samples seen before them
    assert run_inprocess(PRE, *lr_args, *dirs(tmp_path), capsys=capsys)[0] == 0  # later flags win
    ref = {r["samples"] - 4: r["lr"] for r in read_metrics(tmp_path, "pretrain")}
    rows = [json.loads(x) for x in open(tmp / "lr_ck" / "pretrain_64_metrics.jsonl")]
    assert [r["global_step"] for r in rows] == list(range(1, 16))
    resumed = rows[5:]
    for prev, r in zip(rows[4:], resumed):
        before = prev["samples"]
        assert r["lr"] == pytest.approx(ref[before], rel=1e-12), (r["global_step"], before)
        assert r["lr"] == pytest.approx(get_lr(before, 96, 1e-3), rel=1e-12)
    assert resumed[0]["lr"] == pytest.approx(get_lr(20, 96, 1e-3))  # not the 1-process curve's step 6 value


# ------------------------------------------------------------------------------------------------ MoE aux and pads

def test_moe_aux_loss_ignores_padding():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, use_moe=True)).train()
    ids = torch.randint(3, 6000, (3, 10))
    padded = torch.cat([ids, torch.zeros(3, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(3, 10), torch.zeros(3, 6)], dim=1).long()
    plain = model(ids).aux_loss
    assert model(padded, attention_mask=mask).aux_loss.item() == pytest.approx(plain.item(), rel=1e-5)
    assert model(padded).aux_loss.item() != pytest.approx(plain.item(), rel=1e-3)  # pads would count without it


@pytest.mark.parametrize("script,extra", [
    (PRE, ["--data_path", DEMO / "pretrain.jsonl"]),
    (SFT, ["--data_path", DEMO / "sft.jsonl"]),
    ("trainer/train_lora.py", ["--data_path", DEMO / "lora_identity.jsonl", "--from_weight", "pretrain"]),
    ("trainer/train_distill_reason.py", ["--data_path", DEMO / "reason.jsonl", "--from_weight", "pretrain"]),
    (DPO, ["--data_path", DEMO / "dpo.jsonl", "--from_weight", "pretrain"]),
    (DIST, ["--data_path", DEMO / "sft.jsonl", "--student_hidden_size", "64", "--student_num_layers", "2",
            "--from_student_weight", "pretrain", "--teacher_hidden_size", "64", "--teacher_num_layers", "2",
            "--from_teacher_weight", "pretrain"]),
])
def test_every_supervised_stage_passes_the_attention_mask(script, extra, tiny_random, tmp_path, capsys, monkeypatch):
    shutil.copytree(tiny_random / "out", tmp_path / "out")
    if "lora" in script:
        tmp_path.joinpath("out", "lora").mkdir()
    seen = []
    forward = MiniMindForCausalLM.forward

    def spy(self, input_ids=None, attention_mask=None, position_ids=None, **kw):
        if self.training or not torch.is_grad_enabled():  # the policy/student, or a frozen reference/teacher
            seen.append((attention_mask is not None and attention_mask.shape == input_ids.shape,
                         position_ids is not None and position_ids.shape == input_ids.shape))
        return forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
    monkeypatch.setattr(MiniMindForCausalLM, "forward", spy)
    tiny = TINY[4:] if script == DIST else TINY
    extra = [*extra, "--from_dir", tmp_path / "out"] if "lora" in script else extra
    code, _, err = run_inprocess(script, *tiny, *dirs(tmp_path), "--batch_size", "4", "--max_steps", "1", *extra,
                                 capsys=capsys)
    assert code == 0, err
    mask, packed = zip(*seen)
    # --pack 1 (default): every forward (also the frozen reference's / teacher's) got the batch's mask (pads at a
    # row's end stay out of the MoE balance loss) and the packed rows' position_ids (restarting per sample)
    assert seen and all(mask) and all(packed)


# ------------------------------------------------------------------------------------------------ small pieces

def test_tokenizer_fingerprint_is_checked(tiny_random, tmp_path, capsys):
    tok = load_tokenizer(root_path("model"))
    path = str(tiny_random / "out" / "pretrain_64.pth")
    check_tokenizer(path, tok, root_path("model"))  # recorded fingerprint matches: silent
    copy = tmp_path / "tok"
    shutil.copytree(root_path("model"), copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    check_tokenizer(path, load_tokenizer(str(copy)), str(copy))  # a copy of the same tokenizer matches too
    bare = tmp_path / "bare_64.pth"
    shutil.copy(path, bare)
    capsys.readouterr()
    check_tokenizer(str(bare), tok, root_path("model"))
    warning = capsys.readouterr().out
    assert "has no sidecar JSON" in warning and "pass --tokenizer_path" in warning
    check_tokenizer(str(bare), tok, str(copy))  # the user chose a tokenizer: no warning
    assert capsys.readouterr().out == ""


def test_num_workers_default_follows_the_cores_per_rank(monkeypatch):
    for cores, ranks, want in [(2, 1, 2), (2, 2, 0), (1, 1, 0), (64, 2, 8), (8, 2, 4)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cores)))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        assert default_num_workers() == want, (cores, ranks)


def test_grad_checkpointing_trains_the_same_weights(tmp_path, capsys):
    """--grad_checkpointing 1 recomputes each decoder layer in backward: same gradients, so the same weights."""
    weights = {}
    for gc in ("0", "1"):
        d = tmp_path / gc
        code, out, err = run_inprocess(PRE, *TINY, *dirs(d), "--data_path", DEMO / "pretrain.jsonl", "--use_moe", "1",
                                       "--max_steps", "2", "--batch_size", "2", "--grad_checkpointing", gc,
                                       capsys=capsys)
        assert code == 0, err
        assert ("gradient checkpointing on" in out) == (gc == "1")
        weights[gc] = torch.load(d / "out" / "pretrain_64_moe.pth", weights_only=True)
    assert all(torch.equal(weights["0"][k], weights["1"][k]) for k in weights["0"])


def test_cpu_precision_default_follows_native_bf16(monkeypatch, capsys):
    import trainer.spine.runtime as runtime
    from trainer.trainer_utils import build_parser, init_run, parse_args, resolve_dtype
    cpu = torch.device("cpu")
    for native, want in [(True, torch.bfloat16), (False, torch.float32)]:
        monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: native)
        assert resolve_dtype(None, cpu) == want and resolve_dtype("float32", cpu) == torch.float32
        capsys.readouterr()
        assert init_run(parse_args(build_parser("t"), ["--device", "cpu"])).dtype == want
        assert f"precision: {str(want)[6:]} on cpu (default" in capsys.readouterr().out


def test_skip_bad_lines_reaches_datasets_that_accept_it():
    from types import SimpleNamespace

    from trainer.trainer_utils import UserError, dataset_options

    class New:
        def __init__(self, path, tokenizer, max_length=512, skip_bad_lines=False):
            pass

    class Old:
        def __init__(self, path, tokenizer, max_length=512):
            pass
    assert dataset_options(New, SimpleNamespace(skip_bad_lines=1)) == {"skip_bad_lines": True}
    assert dataset_options(New, SimpleNamespace(skip_bad_lines=0)) == {"skip_bad_lines": False}
    assert dataset_options(Old, SimpleNamespace(skip_bad_lines=0)) == {}
    with pytest.raises(UserError, match="--skip_bad_lines 1 is not supported by Old"):
        dataset_options(Old, SimpleNamespace(skip_bad_lines=1))
