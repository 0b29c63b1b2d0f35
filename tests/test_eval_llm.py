"""eval_llm.py: bad input gives one message and a non-zero exit (one parametrized table), stdin prompts, greedy
decoding, interactive quitting, Ctrl-C.

    python -m pytest tests/test_eval_llm.py -q

The table runs eval_llm's real entry point (cli(): argparse + run_main) in-process on a private copy of the
session's tiny SFT checkpoint, so each case costs milliseconds; one subprocess test covers the script as a user
runs it (stdin piped, then Ctrl-C).
"""
import builtins
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval_llm  # noqa: E402
from conftest import script_env  # noqa: E402


def _truncate(out: Path):
    data = (out / "full_sft_64.pth").read_bytes()
    (out / "full_sft_64.pth").write_bytes(data[:len(data) // 2])


def _lora_sidecar_only(out: Path):
    (out / "lora").mkdir()


# (id, extra argv, setup(out dir), exit code, message pattern that names the problem and the fix)
CASES = [
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
     r"cannot read weight file .*full_sft_64.pth.*truncated or not a torch .pth file; copy it again or re-run"),
    ("weight_not_torch", [], lambda o: (o / "full_sft_64.pth").write_text("hello, not weights\n"), 1,
     r"cannot read weight file .*full_sft_64.pth.*not a torch .pth file"),
    ("sidecar_corrupt", [], lambda o: (o / "full_sft_64.json").write_text('{"model_config": {"hidden'), 1,
     r"sidecar .*full_sft_64.json .*is not valid JSON.*delete it and pass the sizes as flags"),
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
    pytest.param("device_cuda_missing", ["--device", "cuda"], None, 1, r"CUDA is not available; pass --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
]


@pytest.fixture
def out(tiny_sft, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(tiny_sft / "out", dst)
    return dst


def run_cli(argv, monkeypatch, capsys, stdin_lines=None):
    """eval_llm's entry point in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["eval_llm.py", *argv])
    if stdin_lines is not None:
        import io
        monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in stdin_lines)))
    code = 0
    try:
        eval_llm.cli()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case,argv,setup,code,pattern", CASES,
                         ids=[c.values[0] if hasattr(c, "values") else c[0] for c in CASES])
def test_bad_input_one_message_no_traceback(out, monkeypatch, capsys, case, argv, setup, code, pattern):
    if setup:
        setup(out)
    argv = [a.replace("{out}", str(out)) for a in argv]
    got, stdout, stderr = run_cli(["--save_dir", str(out), "--device", "cpu", "--prompts", "hi",
                                   "--max_new_tokens", "4", *argv], monkeypatch, capsys)
    assert got == code, (stdout, stderr)
    assert re.search(pattern, stderr), stderr
    assert "Traceback" not in stderr + stdout
    assert len([line for line in stderr.splitlines() if line.strip() and not line.startswith(("usage:", " "))]) == 1


def test_stdin_lines_are_the_prompts(out, monkeypatch, capsys):
    """Not a terminal: each non-empty stdin line is one prompt (not the built-in auto prompts); --temperature 0 is
    greedy, so the same prompt gives the same reply twice."""
    code, stdout, stderr = run_cli(["--save_dir", str(out), "--device", "cpu", "--temperature", "0",
                                    "--max_new_tokens", "12"], monkeypatch, capsys,
                                   stdin_lines=["中国的首都是哪里？", "", "中国的首都是哪里？"])
    assert code == 0, stderr
    assert stdout.count("👶: 中国的首都是哪里？") == 2 and eval_llm.AUTO_PROMPTS[0] not in stdout
    replies = [line for line in stdout.splitlines() if line.startswith("🤖: ")]
    assert len(replies) == 2 and replies[0] == replies[1]
    assert stdout.count(" tok/s]") == 2


def test_auto_mode_and_prompts(out, monkeypatch, capsys):
    code, stdout, _ = run_cli(["--save_dir", str(out), "--device", "cpu", "--mode", "auto", "--max_new_tokens",
                               "3"], monkeypatch, capsys, stdin_lines=["ignored"])
    assert code == 0 and all(f"👶: {p}" in stdout for p in eval_llm.AUTO_PROMPTS) and "ignored" not in stdout
    code, stdout, _ = run_cli(["--save_dir", str(out), "--device", "cpu", "--prompts", "one", "two",
                               "--max_new_tokens", "3"], monkeypatch, capsys)
    assert code == 0 and "👶: one" in stdout and "👶: two" in stdout and stdout.count("tok/s]") == 2


def test_interactive_says_how_to_quit_and_quits_cleanly(out, monkeypatch, capsys):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)

    def scripted(answers):
        it = iter(answers)

        def fake_input(prompt=""):
            print(prompt, end="")
            a = next(it)
            if isinstance(a, type) and issubclass(a, BaseException):
                raise a
            return a
        return fake_input
    argv = ["--save_dir", str(out), "--device", "cpu", "--max_new_tokens", "3"]
    for answers, code in ((["1", "hello", EOFError], 0), (["1", "hello", ""], 0), (["1", KeyboardInterrupt], 130)):
        monkeypatch.setattr(builtins, "input", scripted(answers))
        got, stdout, stderr = run_cli(argv, monkeypatch, capsys)
        assert got == code and "Traceback" not in stderr
        assert "Ctrl-D or Ctrl-C quits" in stdout
    assert "(interrupted)" in stderr


@pytest.mark.slow
def test_script_reads_stdin_then_ctrl_c_exits_cleanly(out, tmp_path):
    """The real script: two prompts piped in (stdin stays open), both answered; then SIGINT -> exit 130, no
    traceback."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "eval_llm.py"), "--save_dir", str(out), "--device", "cpu",
                             "--max_new_tokens", "6", "--temperature", "0"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env(tmp_path))
    lines, err = [], []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    try:
        proc.stdin.write("hello\nwhat is 3 + 4?\n")
        proc.stdin.flush()
        deadline = time.time() + 120
        while sum("tok/s]" in line for line in lines) < 2:
            assert proc.poll() is None and time.time() < deadline, "".join(lines + err)
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.1)
    text = "".join(lines)
    assert "👶: hello" in text and "👶: what is 3 + 4?" in text and eval_llm.AUTO_PROMPTS[0] not in text
    assert "Traceback" not in "".join(err) and "(interrupted)" in "".join(err)
