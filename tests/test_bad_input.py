"""Bad input to the training scripts: one clear message (the problem and the fix), the right exit code, no traceback.

    python -m pytest tests/test_bad_input.py -q

Two tables, one row per mistake: the training scripts (run in-process as __main__, see conftest.run_inprocess: the
checks under test happen at start-up, so a subprocess would only add its ~4 s start) and eval_llm.py (its cli() entry
point in-process on a copy of the session's tiny SFT checkpoint). A real DataLoader worker covers errors raised in a
worker process.
"""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DEMO, TINY, dirs, run_eval_cli, run_inprocess

SFT = "trainer/train_full_sft.py"
PRE = "trainer/train_pretrain.py"
DIST = "trainer/train_distillation.py"
DPO = "trainer/train_dpo.py"


def sft(tmp, *extra):
    return [*TINY, *dirs(tmp), "--data_path", DEMO / "sft.jsonl", "--max_steps", "1", *extra]


def pre(tmp, *extra):
    return [*TINY, *dirs(tmp), "--data_path", DEMO / "pretrain.jsonl", "--max_steps", "1", *extra]


def write(path, content: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def resume_file(tmp):
    return tmp / "checkpoints" / "full_sft_64_resume.pth"


# (id, script, args(tmp), setup(tmp) or None, exit code, [patterns that must all be in stderr])
CASES = [
    # ---- flags out of range: refused before anything is loaded
    ("batch_size_0", SFT, lambda t: sft(t, "--batch_size", "0"), None, 1, [r"--batch_size 0 is out of range", r">= 1"]),
    ("batch_size_negative", SFT, lambda t: sft(t, "--batch_size", "-4"), None, 1, [r"--batch_size -4", r">= 1"]),
    ("accumulation_0", SFT, lambda t: sft(t, "--accumulation_steps", "0"), None, 1,
     [r"--accumulation_steps 0 is out of range", r"1 = no gradient accumulation"]),
    ("save_interval_0", SFT, lambda t: sft(t, "--save_interval", "0"), None, 1,
     [r"--save_interval 0 is out of range", r"e\.g\. --save_interval 1000"]),
    ("log_interval_0", SFT, lambda t: sft(t, "--log_interval", "0"), None, 1,
     [r"--log_interval 0 is out of range", r"e\.g\. --log_interval 100"]),
    ("learning_rate_0", SFT, lambda t: sft(t, "--learning_rate", "0"), None, 1,
     [r"--learning_rate 0\.0 is out of range", r"> 0", r"e\.g\. --learning_rate"]),
    ("learning_rate_negative", SFT, lambda t: sft(t, "--learning_rate=-1e-4"), None, 1,
     [r"--learning_rate -0\.0001 is out of range", r"> 0"]),
    ("epochs_0", SFT, lambda t: sft(t, "--epochs", "0"), None, 1, [r"--epochs 0 is out of range", r"trains nothing"]),
    ("layers_0", SFT, lambda t: sft(t, "--num_hidden_layers", "0"), None, 1,
     [r"--num_hidden_layers 0 is out of range", r">= 1"]),
    ("hidden_not_divisible", SFT, lambda t: sft(t, "--hidden_size", "100"), None, 1,
     [r"--hidden_size 100 does not split into 8 attention heads", r"multiple of 16"]),
    ("max_seq_len_1", PRE, lambda t: pre(t, "--max_seq_len", "1"), None, 1,
     [r"--max_seq_len 1 is out of range", r">= 2"]),
    ("max_seq_len_below_chat_template", SFT, lambda t: sft(t, "--max_seq_len", "6", "--from_weight", "none"), None, 1,
     [r"--max_seq_len 6 is too small", r"no token would be supervised", r"use at least"]),
    ("max_steps_negative", SFT, lambda t: sft(t, "--max_steps", "-1"), None, 1, [r"--max_steps -1", r"0 = no limit"]),
    ("num_workers_negative", SFT, lambda t: sft(t, "--num_workers", "-2"), None, 1,
     [r"--num_workers -2", r"0 = load data in the main process"]),
    ("grad_clip_negative", SFT, lambda t: sft(t, "--grad_clip", "-1"), None, 1, [r"--grad_clip -1\.0", r"0 = no"]),
    ("max_bad_steps_0", SFT, lambda t: sft(t, "--max_bad_steps", "0"), None, 1, [r"--max_bad_steps 0", r">= 1"]),
    ("unknown_flag", SFT, lambda t: sft(t, "--batchsize", "8"), None, 2, [r"unrecognized arguments: --batchsize"]),
    ("cuda_without_cuda", SFT, lambda t: sft(t, "--device", "cuda:0"), None, 1,
     [r"torch\.cuda\.is_available\(\) is False", r"pass --device cpu"]),
    ("distill_student_hidden", DIST, lambda t: [*TINY[4:], *dirs(t), "--student_hidden_size", "72"], None, 1,
     [r"--student_hidden_size 72 does not split", r"multiple of 16"]),
    ("distill_alpha", DIST, lambda t: [*TINY[4:], *dirs(t), "--alpha", "2"], None, 1,
     [r"--alpha must be in \[0, 1\]"]),
    # ---- data
    ("data_path_is_directory", SFT, lambda t: sft(t, "--data_path", DEMO), None, 1,
     [r"is a directory", r"pass a \.jsonl file inside it, e\.g\. one of .*pretrain\.jsonl"]),
    ("data_path_missing", SFT, lambda t: sft(t, "--data_path", t / "nope.jsonl"), None, 1,
     [r"Data file not found: .*nope\.jsonl", r"download them into dataset/"]),
    ("data_file_empty", PRE, lambda t: pre(t, "--data_path", t / "empty.jsonl"),
     lambda t: write(t / "empty.jsonl", "\n\n"), 1, [r"empty\.jsonl has no records", r"empty or holds only blank lines",
                                                  r"one JSON object per line"]),
    ("bad_jsonl_line", PRE, lambda t: pre(t, "--data_path", t / "bad.jsonl", "--batch_size", "1", "--max_steps", "3"),
     lambda t: write(t / "bad.jsonl", '{"text": "ok"}\n{"text": "fine"}\n{"txt": oops\n'), 1,
     [r"1 bad line of 3 in .*bad\.jsonl", r"bad\.jsonl:3: not valid JSON", r"pass --skip_bad_lines 1"]),
    ("unpaired_surrogate_line", PRE, lambda t: pre(t, "--data_path", t / "sur.jsonl"),
     lambda t: write(t / "sur.jsonl", '{"text": "ok"}\n{"text": "bad \\ud800 escape"}\n'), 1,
     [r"sur\.jsonl:2: holds an unpaired UTF-16 surrogate", r"Fix or remove these lines"]),
    ("every_answer_cut_by_max_seq_len", SFT,
     lambda t: sft(t, "--data_path", t / "long_prompt.jsonl", "--max_seq_len", "20", "--from_weight", "none",
                   "--batch_size", "1", "--max_steps", "0"),
     lambda t: write(t / "long_prompt.jsonl", json.dumps({"conversations": [
         {"role": "user", "content": "please read this long question " * 20},
         {"role": "assistant", "content": "ok"}]}) + "\n"), 1,
     [r"the run trained nothing: all 2 steps had no supervised token", r"--max_seq_len 20"]),
    # ---- weight files
    ("weight_missing", SFT, lambda t: sft(t, "--from_weight", "nothere"), None, 1,
     [r"weight file .*nothere_64\.pth not found", r"Run the stage that produces it first"]),
    ("weight_zero_bytes", SFT, lambda t: sft(t), lambda t: write(t / "out" / "pretrain_64.pth", b""), 1,
     [r"weight file .*pretrain_64\.pth is empty \(0 bytes\)", r"re-run the stage that writes it"]),
    ("weight_truncated", SFT, lambda t: sft(t), lambda t: truncate(t / "out" / "pretrain_64.pth"), 1,
     [r"pretrain_64\.pth \(\d+ bytes\) is not a readable PyTorch file", r"re-run the stage that writes it"]),
    ("weight_not_torch", SFT, lambda t: sft(t), lambda t: write(t / "out" / "pretrain_64.pth", "hello, not torch\n"), 1,
     [r"is not a readable PyTorch file", r"point --weight/--from_weight and --save_dir at a good copy"]),
    ("weight_is_not_a_state_dict", SFT, lambda t: sft(t),
     lambda t: torch.save({"model": {}, "epoch": 1}, t / "out" / "pretrain_64.pth"), 1,
     [r"not a state_dict of tensors", r"pass a weights file"]),
    ("weight_other_architecture", SFT, lambda t: sft(t, "--headwise_attn_output_gate", "0"), None, 1,
     [r"different architecture", r"pass --headwise_attn_output_gate 1"]),
    ("sidecar_corrupt", SFT, lambda t: sft(t), lambda t: write(t / "out" / "pretrain_64.json", '{"model_config": {'),
     1, [r"sidecar .*pretrain_64\.json is not valid JSON", r"Restore it .* or delete it"]),
    ("tokenizer_mismatch", SFT, lambda t: sft(t),
     lambda t: write(t / "out" / "pretrain_64.json", json.dumps(
         {"model_config": None, "tokenizer_hash": "0123456789abcdef", "tokenizer_path": "/data/minimind/model"})), 1,
     [r"trained with another tokenizer \(/data/minimind/model", r"pass --tokenizer_path /data/minimind/model"]),
    ("tokenizer_path_missing", SFT, lambda t: sft(t, "--tokenizer_path", t / "no_tok"), None, 1,
     [r"tokenizer directory .*no_tok not found", r"pass --tokenizer_path DIR"]),
    ("distill_teacher_missing", DIST,
     lambda t: [*TINY[4:], *dirs(t), "--student_hidden_size", "64", "--student_num_layers", "2",
                "--from_student_weight", "pretrain", "--teacher_hidden_size", "96", "--max_steps", "1",
                "--data_path", DEMO / "sft.jsonl"], None, 1,
     [r"teacher weight file .*full_sft_96\.pth not found", r"--from_teacher_weight none trains on plain CE"]),
    # ---- resume files
    ("resume_zero_bytes", SFT, lambda t: sft(t, "--from_resume", "1"), lambda t: write(resume_file(t), b""), 1,
     [r"resume file .*full_sft_64_resume\.pth is empty \(0 bytes\)", r"pass --from_resume 0\) to start over"]),
    ("resume_truncated", SFT, lambda t: sft(t, "--from_resume", "1"),
     lambda t: (shutil.copy(t / "out" / "pretrain_64.pth", resume_file(t)) if resume_file(t).parent.mkdir(
         parents=True, exist_ok=True) is None else None, truncate(resume_file(t), 0.3)), 1,
     [r"resume file .* is not a readable PyTorch file", r"--from_resume 0"]),
    ("resume_is_a_weights_file", SFT, lambda t: sft(t, "--from_resume", "1"),
     lambda t: (resume_file(t).parent.mkdir(parents=True, exist_ok=True),
                shutil.copy(t / "out" / "pretrain_64.pth", resume_file(t))), 1,
     [r"is not a resume checkpoint of this repo", r"--from_resume 0"]),
    # ---- outputs
    ("save_dir_not_writable", SFT, lambda t: [*TINY, "--save_dir", t / "out", "--checkpoint_dir", t / "afile" / "ck",
                                              "--data_path", DEMO / "sft.jsonl", "--max_steps", "1"],
     lambda t: write(t / "afile", "a file, not a folder"), 1,
     [r"cannot write to --checkpoint_dir .*afile/ck", r"pass a writable folder"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_message(case, tiny_random, tmp_path, capsys):
    name, script, make_args, setup, code, patterns = case
    shutil.copytree(tiny_random / "out", tmp_path / "out")  # a good out/pretrain_64.pth to start from
    if setup is not None:
        setup(tmp_path)
    rc, _, err = run_inprocess(script, *make_args(tmp_path), capsys=capsys)
    assert rc == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for pattern in patterns:
        assert re.search(pattern, err, re.S | re.M), (pattern, err[-3000:])


def _truncate(out: Path):
    data = (out / "full_sft_64.pth").read_bytes()
    (out / "full_sft_64.pth").write_bytes(data[:len(data) // 2])


def _lora_sidecar_only(out: Path):
    (out / "lora").mkdir()


# eval_llm.py: (id, extra argv, setup(out dir), exit code, message pattern that names the problem and the fix)
EVAL_CASES = [
    ("max_new_tokens_0", ["--max_new_tokens", "0"], None, 2, r"--max_new_tokens: 0 must be >= 1"),
    ("max_new_tokens_negative", ["--max_new_tokens", "-3"], None, 2, r"--max_new_tokens: -3 must be >= 1"),
    ("max_new_tokens_not_int", ["--max_new_tokens", "1.5"], None, 2, r"--max_new_tokens: '1.5' is not an integer"),
    ("max_new_tokens_over_context", ["--max_new_tokens", "40000"], None, 1,
     r"--max_new_tokens 40000 leaves no room .* context of 32768 tokens; lower it"),
    ("temperature_negative", ["--temperature", "-0.5"], None, 2, r"--temperature: -0.5 must be >= 0 \(0 = greedy"),
    ("temperature_text", ["--temperature", "hot"], None, 2, r"--temperature: 'hot' is not a number"),
    ("top_p_zero", ["--top_p", "0"], None, 2, r"--top_p: 0 must be in \(0, 1\]"),
    ("top_p_above_one", ["--top_p", "1.5"], None, 2, r"--top_p: 1.5 must be in \(0, 1\]"),
    ("historys_negative", ["--historys", "-2"], None, 2, r"--historys: '-2' must be an integer >= 0"),
    ("weight_zero_bytes", [], lambda o: (o / "full_sft_64.pth").write_bytes(b""), 1,
     r"full_sft_64.pth is empty \(0 bytes\).*re-run the stage that writes it"),
    ("weight_truncated", [], _truncate, 1,
     r"weight file .*full_sft_64.pth \(\d+ bytes\) is not a readable PyTorch file: truncated.*copy it again"),
    ("weight_not_torch", [], lambda o: (o / "full_sft_64.pth").write_text("hello, not weights\n"), 1,
     r"weight file .*full_sft_64.pth .*is not a readable PyTorch file.*re-run the stage that writes it"),
    ("sidecar_corrupt", [], lambda o: (o / "full_sft_64.json").write_text('{"model_config": {"hidden'), 1,
     r"sidecar .*full_sft_64.json is not valid JSON.*Restore it .* or delete it"),
    ("weight_missing", ["--weight", "dpo"], None, 1,
     r"no .*/dpo_\*.pth found; train that stage first or pass --save_dir"),
    ("weight_other_size", ["--hidden_size", "128"], None, 1,
     r"full_sft_128.pth not found. Found full_sft_64.pth in .*: set --hidden_size/--use_moe to match one of them"),
    ("weight_other_gate", ["--headwise_attn_output_gate", "0"], None, 1,
     r"--headwise_attn_output_gate 0 contradicts .*drop the flag or pass --headwise_attn_output_gate 1"),
    ("lora_missing", ["--lora_weight", "nope"], _lora_sidecar_only, 1,
     r"LoRA file .*nope_64.pth not found; train it with trainer/train_lora.py"),
    ("hf_dir_not_a_model", ["--hf_dir", "{out}"], None, 1,
     r"is not a transformers model folder \(no config.json in it\); pass the folder scripts/convert_model.py wrote"),
    ("tokenizer_missing", ["--tokenizer_path", "{out}/no_tokenizer"], None, 1,
     r"tokenizer directory .*no_tokenizer not found; pass --tokenizer_path DIR"),
    ("mode_unknown", ["--mode", "batch"], None, 2, r"--mode: invalid choice: 'batch'"),
    ("tokenizer_mismatch", [], lambda o: (o / "full_sft_64.json").write_text(json.dumps(
        {**json.loads((o / "full_sft_64.json").read_text()), "tokenizer_hash": "0123456789abcdef",
         "tokenizer_path": "/data/minimind/model"})), 1,
     r"trained with another tokenizer \(/data/minimind/model.*pass --tokenizer_path /data/minimind/model"),
    pytest.param("device_cuda_missing", ["--device", "cuda"], None, 1, r"CUDA is not available; pass --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
]


@pytest.mark.parametrize("case,argv,setup,code,pattern", EVAL_CASES,
                         ids=[c.values[0] if hasattr(c, "values") else c[0] for c in EVAL_CASES])
def test_eval_llm_bad_input_one_message(tiny_sft, tmp_path, monkeypatch, capsys, case, argv, setup, code, pattern):
    out = tmp_path / "out"
    shutil.copytree(tiny_sft / "out", out)
    if setup:
        setup(out)
    argv = [a.replace("{out}", str(out)) for a in argv]
    got, stdout, stderr = run_eval_cli(["--save_dir", str(out), "--device", "cpu", "--prompts", "hi",
                                        "--max_new_tokens", "4", *argv], monkeypatch, capsys)
    assert got == code, (stdout, stderr)
    assert re.search(pattern, stderr), stderr
    assert "Traceback" not in stderr + stdout
    assert len([line for line in stderr.splitlines() if line.strip() and not line.startswith(("usage:", " "))]) == 1


class _BrokenInWorker(torch.utils.data.Dataset):
    """Raises what a dataset raises for a line that went bad after start-up (e.g. the file was edited mid-run)."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        from dataset.lm_dataset import DataFormatError
        raise DataFormatError("data.jsonl:7: not valid JSON (Expecting value at character 9); fix or remove the line")


def test_error_inside_a_dataloader_worker_is_the_same_one_line(capsys):
    """DataLoader re-raises a worker's exception with the worker's traceback in its message; run_main shows the
    line the main process would have shown."""
    from trainer.trainer_utils import run_main

    def main():
        for _ in torch.utils.data.DataLoader(_BrokenInWorker(), num_workers=1):
            pass

    with pytest.raises(SystemExit) as exc:
        run_main(main)
    err = capsys.readouterr().err
    assert exc.value.code == 1
    assert err == "\nerror: data.jsonl:7: not valid JSON (Expecting value at character 9); fix or remove the line\n"
