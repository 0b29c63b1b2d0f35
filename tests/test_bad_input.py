"""Bad input to the training scripts: one clear message (the problem and the fix), the right exit code, no traceback.

    python -m pytest tests/test_bad_input.py -q

One table, one row per mistake. Rows run the real script in-process (runpy as __main__, see conftest.run_inprocess):
the checks under test happen at start-up, so a subprocess would only add its ~4 s start. Rows marked SUBPROCESS need
a real process (DataLoader worker processes).
"""
import json
import re
import shutil

import pytest
import torch

from conftest import DEMO, TINY, dirs, run_inprocess, run_script

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
     lambda t: write(t / "empty.jsonl", "\n\n"), 1, [r"has no samples", r"nothing to train on"]),
    ("bad_jsonl_line", PRE, lambda t: pre(t, "--data_path", t / "bad.jsonl", "--batch_size", "1", "--max_steps", "3"),
     lambda t: write(t / "bad.jsonl", '{"text": "ok"}\n{"text": "fine"}\n{"txt": oops\n'), 1,
     [r"bad\.jsonl:3: not valid JSON", r"fix or remove the line"]),
    ("every_answer_cut_by_max_seq_len", SFT,
     lambda t: sft(t, "--data_path", t / "long_prompt.jsonl", "--max_seq_len", "20", "--from_weight", "none",
                   "--batch_size", "1", "--max_steps", "0"),
     lambda t: write(t / "long_prompt.jsonl", json.dumps({"conversations": [
         {"role": "user", "content": "please read this long question " * 20},
         {"role": "assistant", "content": "ok"}]}) + "\n"), 1,
     [r"the run trained nothing: all 2 steps had no supervised token", r"--max_seq_len 20"]),
    ("worker_error_is_one_line_SUBPROCESS", PRE,
     lambda t: [*TINY[:6], "--num_workers", "1", "--max_seq_len", "128", *dirs(t), "--data_path", t / "bad.jsonl",
                "--batch_size", "1", "--max_steps", "3"],
     lambda t: write(t / "bad.jsonl", '{"text": "ok"}\n{"text": "fine"}\n{"txt": oops\n'), 1,
     [r"^\nerror: .*bad\.jsonl:3: not valid JSON .*fix or remove the line\n$"]),
    # ---- weight files
    ("weight_missing", SFT, lambda t: sft(t, "--from_weight", "nothere"), None, 1,
     [r"weight file .*nothere_64\.pth not found", r"Run the stage that produces it first"]),
    ("weight_zero_bytes", SFT, lambda t: sft(t), lambda t: write(t / "out" / "pretrain_64.pth", b""), 1,
     [r"weight file .*pretrain_64\.pth is empty \(0 bytes\)", r"re-run the stage that writes it"]),
    ("weight_truncated", SFT, lambda t: sft(t), lambda t: truncate(t / "out" / "pretrain_64.pth"), 1,
     [r"pretrain_64\.pth \(\d+ bytes\) is not a readable PyTorch file", r"re-run the stage that writes it"]),
    ("weight_not_torch", SFT, lambda t: sft(t), lambda t: write(t / "out" / "pretrain_64.pth", "hello, not torch\n"), 1,
     [r"is not a readable PyTorch file", r"point --from_weight/--save_dir at a good copy"]),
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
    if name.endswith("SUBPROCESS"):
        proc = run_script(script, *make_args(tmp_path), tmp=tmp_path, check=False)
        rc, err = proc.returncode, proc.stderr
    else:
        rc, _, err = run_inprocess(script, *make_args(tmp_path), capsys=capsys)
    assert rc == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for pattern in patterns:
        assert re.search(pattern, err, re.S | re.M), (pattern, err[-3000:])
