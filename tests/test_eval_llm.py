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


def scripted(answers, asked=None):
    """A stand-in for input(): prints its prompt (and records it in `asked`), returns or raises the next answer."""
    it = iter(answers)

    def fake_input(prompt=""):
        print(prompt, end="")
        if asked is not None:
            asked.append(prompt)
        a = next(it)
        if isinstance(a, type) and issubclass(a, BaseException):
            raise a
        return a
    return fake_input


def test_interactive_says_how_to_quit_and_quits_cleanly(out, monkeypatch, capsys):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    argv = ["--save_dir", str(out), "--device", "cpu", "--max_new_tokens", "3"]
    for answers, code in ((["1", "hello", EOFError], 0), (["1", "hello", ""], 0), (["1", KeyboardInterrupt], 130)):
        monkeypatch.setattr(builtins, "input", scripted(answers))
        got, stdout, stderr = run_cli(argv, monkeypatch, capsys)
        assert got == code and "Traceback" not in stderr
        assert "Ctrl-D or Ctrl-C quits" in stdout
    assert "(interrupted)" in stderr


def test_menu_shows_a_prompt_and_asks_again_on_other_keys(out, monkeypatch, capsys):
    """The [0] auto / [1] chat menu ends in a visible prompt on the same line, and a key that is neither 0 nor 1
    asks again (it used to run the auto prompts silently); Ctrl-D at the menu quits."""
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    asked = []
    argv = ["--save_dir", str(out), "--device", "cpu", "--max_new_tokens", "3"]
    monkeypatch.setattr(builtins, "input", scripted(["2", "", "chat", "1", "hello", ""], asked))
    code, stdout, stderr = run_cli(argv, monkeypatch, capsys)
    menu = asked[0]
    assert code == 0 and "[0]" in menu and "[1]" in menu and not menu.endswith("\n") and menu.rstrip().endswith(":")
    assert asked[:4] == [menu] * 4 and stdout.count("type 0 or 1") == 3
    assert eval_llm.AUTO_PROMPTS[0] not in stdout and stdout.count("tok/s]") == 1  # only the typed "hello"
    asked.clear()
    monkeypatch.setattr(builtins, "input", scripted([" 0 "], asked))
    code, stdout, _ = run_cli(argv, monkeypatch, capsys)
    assert code == 0 and all(f"👶: {p}" in stdout for p in eval_llm.AUTO_PROMPTS)
    monkeypatch.setattr(builtins, "input", scripted([EOFError]))
    code, stdout, stderr = run_cli(argv, monkeypatch, capsys)
    assert code == 0 and "tok/s]" not in stdout and "Traceback" not in stderr


@pytest.mark.slow
def test_many_short_runs_all_exit_0(tiny_random, tmp_path):
    """The exit abort of issue 16 (a generation thread alive at interpreter exit: 'terminate called without an
    active exception', exit 134, about 1 run in 5-8 there): 16 real runs, 4 at a time, each must exit 0."""
    from concurrent.futures import ThreadPoolExecutor
    shutil.copytree(tiny_random / "out", tmp_path / "out")
    (tmp_path / "out" / "pretrain_64.pth").rename(tmp_path / "out" / "full_sft_64.pth")
    (tmp_path / "out" / "pretrain_64.json").rename(tmp_path / "out" / "full_sft_64.json")
    cmd = [sys.executable, str(ROOT / "eval_llm.py"), "--save_dir", str(tmp_path / "out"), "--device", "cpu",
           "--mode", "auto", "--prompts", "hi", "3 + 4 = ?", "--max_new_tokens", "8", "--temperature", "0.7"]

    def run(i):
        return subprocess.run([*cmd, "--seed", str(i)], capture_output=True, text=True, timeout=300,
                              env=script_env(tmp_path), stdin=subprocess.DEVNULL)
    with ThreadPoolExecutor(4) as pool:
        procs = list(pool.map(run, range(16)))
    bad = [(p.returncode, p.stderr[-300:]) for p in procs if p.returncode != 0]
    assert not bad, bad
    assert all(p.stdout.count("tok/s]") == 2 for p in procs)


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


def test_demo_pipeline_ends_saying_what_next_and_that_the_demo_model_talks_nonsense():
    """The demo's last words: the model's real size (1.6M at the default 128x4), that its replies are nonsense by
    design, and commands that work for the sizes the run used."""
    import argparse
    import importlib.util
    spec = importlib.util.spec_from_file_location("demo_pipeline", ROOT / "scripts" / "demo_pipeline.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    args = argparse.Namespace(hidden_size=128, num_hidden_layers=4, use_moe=0, save_dir=str(ROOT / "out"),
                              stages="pretrain,full_sft")
    text = demo.closing_words(args, ["pretrain", "full_sft"], "full_sft")
    assert "only 1.6M parameters" in text and "nonsense" in text
    assert "python eval_llm.py --weight full_sft --hidden_size 128\n" in text and "--stages all" in text
    args = argparse.Namespace(hidden_size=64, num_hidden_layers=2, use_moe=1, save_dir="/tmp/x", stages="all")
    text = demo.closing_words(args, list(demo.STAGES), "spo")
    assert "python eval_llm.py --weight spo --hidden_size 64 --use_moe 1 --save_dir /tmp/x" in text
    assert "--stages all" not in text and "only 0." in text
