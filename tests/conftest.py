"""Shared test fixtures: run the real scripts as subprocesses on the demo data with a tiny model.

    python -m pytest tests -q
"""
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tests run beside subprocess trainings on 2 cores: one intra-op thread avoids oversubscription (30x slowdowns seen).
torch.set_num_threads(1)

# A suite started in the background by a shell without job control (`(pytest ... &)`, some CI runners) inherits
# SIGINT ignored, and so would every script the Ctrl-C tests start: give this process, and through exec its
# children, the normal disposition (seen in the session-7 CI rehearsal: 5 Ctrl-C tests failed that way only).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "dataset" / "demo"
sys.path.insert(0, str(ROOT))

# hidden 64, 2 layers: a model that trains at thousands of tokens/s on one CPU core. fp32 pinned: the CPU default is
# bf16 where the CPU has native bf16, and tests compare numbers that must not depend on the machine.
TINY = ["--hidden_size", "64", "--num_hidden_layers", "2", "--device", "cpu", "--num_workers", "0",
        "--max_seq_len", "128", "--dtype", "float32"]


def script_env(tmp: Path | None = None) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MINIMIND_DIST_TIMEOUT="60",
               PYTHONUNBUFFERED="1")
    if tmp is not None:
        env["WANDB_DIR"] = str(tmp)
    env.pop("WANDB_API_KEY", None)
    return env


def run_script(script: str, *args, tmp: Path, cwd: Path | None = None, timeout: int = 300, check: bool = True,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python <script> args...` (script relative to the repo root); output captured; fail loudly."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd or ROOT, env=env or script_env(tmp), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def run_torchrun(script: str, *args, tmp: Path, nproc: int = 2, timeout: int = 240,
                 cwd: Path | None = None) -> str:
    """torchrun --nproc_per_node N with gloo on CPU; output goes to a file; hard timeout stops the agent."""
    log = tmp / f"torchrun_{Path(script).stem}.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / script), *map(str, args)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=script_env(tmp), stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # torchrun's agent stops its workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise AssertionError(f"torchrun timed out after {timeout}s:\n{log.read_text()[-6000:]}")
    out = log.read_text()
    assert rc == 0, f"torchrun failed ({rc}):\n{out[-8000:]}"
    return out


def run_until_sigint(script: str, *args, tmp: Path, marker: str, timeout: int = 240) -> tuple[int, str]:
    """Run `python <script> args...` as a real process and send it SIGINT (a user's Ctrl-C) once a stdout line
    contains `marker`; returns (exit code, stderr) after it has stopped."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        if marker in line:
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def run_inprocess(script: str, *args, capsys) -> tuple[int, str, str]:
    """Run `python <script> args...` inside this process (runpy, __main__): (exit code, stdout, stderr).

    Saves the ~4 s interpreter + torch start-up of a subprocess where it adds nothing (argument checks, start-up
    errors, short CPU runs). Output is read through pytest's capsys, so earlier output is discarded first."""
    capsys.readouterr()
    argv = sys.argv
    sys.argv = [str(ROOT / script), *map(str, args)]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def dirs(tmp: Path) -> list[str]:
    """--save_dir/--checkpoint_dir inside the test's temp folder."""
    return ["--save_dir", str(tmp / "out"), "--checkpoint_dir", str(tmp / "checkpoints")]


def read_metrics(tmp: Path, weight: str, hidden: int = 64, moe: bool = False) -> list[dict]:
    path = tmp / "checkpoints" / f"{weight}_{hidden}{'_moe' if moe else ''}_metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_sft(tmp_path_factory) -> Path:
    """A tiny dense gated model pretrained then SFT'd on the demo data, once per session.
    Returns a folder with out/pretrain_64.pth and out/full_sft_64.pth (+ sidecars). Copy it before writing."""
    tmp = tmp_path_factory.mktemp("tiny_sft")
    common = [*TINY, *dirs(tmp), "--log_interval", "10", "--batch_size", "16"]
    run_script("trainer/train_pretrain.py", *common, "--data_path", DEMO / "pretrain.jsonl", "--max_steps", "60",
               "--learning_rate", "3e-3", "--accumulation_steps", "1", tmp=tmp)
    run_script("trainer/train_full_sft.py", *common, "--data_path", DEMO / "sft.jsonl", "--max_steps", "60",
               "--learning_rate", "1e-3", tmp=tmp)
    return tmp


@pytest.fixture(scope="session")
def tiny_random(tmp_path_factory) -> Path:
    """A folder with out/pretrain_64.pth + sidecar (tokenizer fingerprint included) of a random tiny gated model
    (seed 0), written in-process in well under a second. Copy it before writing."""
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from trainer.trainer_utils import load_tokenizer, root_path, save_weights
    tmp = tmp_path_factory.mktemp("tiny_random")
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, headwise_attn_output_gate=True)
    torch.manual_seed(0)
    save_weights(MiniMindForCausalLM(config).state_dict(), str(tmp / "out" / "pretrain_64.pth"), config,
                 tokenizer=load_tokenizer(root_path("model")), stage="Pretrain", step=1,
                 tokenizer_path=root_path("model"))
    return tmp


@pytest.fixture
def sft_copy(tiny_sft, tmp_path) -> Path:
    """A private copy of the session's tiny SFT folder (out/ only), so a test may write next to it."""
    shutil.copytree(tiny_sft / "out", tmp_path / "out")
    return tmp_path


def run_eval_cli(argv, monkeypatch, capsys, stdin_lines=None):
    """eval_llm's entry point in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["eval_llm.py", *argv])
    if stdin_lines is not None:
        import io
        monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in stdin_lines)))
    code = 0
    try:
        import eval_llm
        eval_llm.cli()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def signal_after_step(monkeypatch, step: int, signum=signal.SIGINT):
    """Make this process receive `signum` right after optimizer step `step` (as a user's Ctrl-C would)."""
    from trainer.trainer_utils import TrainLoop
    original = TrainLoop._optimizer_step

    def step_then_signal(self):
        original(self)
        if self.opt_step + 1 == step:  # opt_step counts the step after _optimizer_step returns
            os.kill(os.getpid(), signum)
    monkeypatch.setattr(TrainLoop, "_optimizer_step", step_then_signal)
