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
def test_an_error_on_one_rank_with_workers_ends_torchrun(tmp_path):
    """Rank 1 fails in the middle of the run with 2 workers alive; rank 0 waits in the step's all-reduce. Both must
    end (the process group's timeout is set far beyond the test's, so only a prompt exit passes)."""
    fault = "if loop.opt_step == 2 and loop.ctx.rank == 1: raise RuntimeError('out of memory (simulated)')"
    env = {**script_env(tmp_path), "MINIMIND_DIST_TIMEOUT": "600"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           driver(tmp_path, fault), ROOT / PRE, *pretrain_args(tmp_path)]
    rc, out = run_with_timeout(cmd, tmp_path, timeout=180, env=env)
    assert rc != 0 and "out of memory (simulated)" in out
