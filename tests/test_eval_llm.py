"""eval_llm.py: stdin prompts, greedy decoding, interactive quitting, Ctrl-C (its bad-input rows are in
tests/test_bad_input.py).

    python -m pytest tests/test_eval_llm.py -q

Tests run eval_llm's real entry point (cli(): argparse + run_main) in-process on a private copy of the session's
tiny SFT checkpoint; one subprocess test covers the script as a user runs it (stdin piped, then Ctrl-C).
"""
import builtins
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import run_eval_cli as run_cli  # noqa: E402
from conftest import script_env

import eval_llm  # noqa: E402


@pytest.fixture
def out(tiny_sft, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(tiny_sft / "out", dst)
    return dst


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
