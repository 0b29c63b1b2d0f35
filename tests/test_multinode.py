"""Multi-node torchrun: two agents on this machine act as two "nodes" (one process each, gloo) and must train exactly
like one node of two processes, with only global rank 0 writing files.

    python -m pytest tests/test_multinode.py -q
"""
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEMO, ROOT, TINY, run_torchrun, script_env

# Each run writes into its own cwd: ./out and ./checkpoints are relative paths (plain "out" would be the default,
# which resolves against the repo root), so a node that wrote anything
# would leave it in its own folder.
ARGS = [*TINY, "--save_dir", "./out", "--checkpoint_dir", "./checkpoints", "--data_path", DEMO / "pretrain.jsonl",
        "--batch_size", "4", "--accumulation_steps", "2", "--log_interval", "1", "--save_interval", "2",
        "--use_moe", "1", "--max_steps"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(script: str, *args, tmp: Path, timeout: int = 240, check: bool = True) -> tuple[list[Path], str]:
    """torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 1, rendezvous on 127.0.0.1, each node in its own cwd
    (tmp/node0, tmp/node1, made if missing); returns the cwds and both logs."""
    port, cwds, procs, logs = free_port(), [], [], []
    for node in range(2):
        cwd = tmp / f"node{node}"
        cwd.mkdir(exist_ok=True)
        log = open(cwd.parent / f"node{node}.log", "w")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(ROOT / script), *map(str, args)]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=script_env(tmp), stdout=log, stderr=subprocess.STDOUT))
        cwds.append(cwd)
        logs.append(log)
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # the agent stops its worker
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        for f in logs:
            f.close()
    text = "\n".join(f"--- node {i}\n" + (tmp / f"node{i}.log").read_text()[-4000:] for i in range(2))
    if check:
        assert [p.returncode for p in procs] == [0, 0], f"two-node run failed:\n{text}"
    return cwds, text


def losses(cwd: Path) -> list[tuple]:
    import json
    rows = [json.loads(line) for line in (cwd / "checkpoints" / "pretrain_64_moe_metrics.jsonl").read_text()
            .splitlines()]
    return [(r["global_step"], r["samples"], r["loss"], r["lr"], r["grad_norm"]) for r in rows]


def files(cwd: Path) -> list[str]:
    return sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.is_file())


@pytest.mark.slow
def test_two_nodes_equal_one_node_only_global_rank0_writes_resume_needs_shared_checkpoints(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    run_torchrun("trainer/train_pretrain.py", *ARGS, 4, tmp=tmp_path, nproc=2, cwd=one)
    (node0, node1), _ = run_two_nodes("trainer/train_pretrain.py", *ARGS, 4, tmp=tmp_path)

    # global rank 0 (node 0) wrote weights, sidecar, resume file and metrics; node 1's rank (local rank 0, global
    # rank 1) wrote nothing at all
    assert files(node0) == files(one) == ["checkpoints/pretrain_64_moe_metrics.jsonl",
                                          "checkpoints/pretrain_64_moe_resume.pth", "out/pretrain_64_moe.json",
                                          "out/pretrain_64_moe.pth"]
    assert files(node1) == []

    # same data order and reduction: the same losses, LR and grad norms at every step, the same fp32 weights
    assert len(losses(one)) == 4 and losses(node0) == losses(one)
    a = torch.load(one / "checkpoints/pretrain_64_moe_resume.pth", weights_only=True)
    b = torch.load(node0 / "checkpoints/pretrain_64_moe_resume.pth", weights_only=True)
    assert a["world_size"] == b["world_size"] == 2 and a["opt_step"] == b["opt_step"] == 4
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


    # without a shared (or copied) checkpoints/, node 1 would start over while node 0 resumes: every rank stops
    _, log = run_two_nodes("trainer/train_pretrain.py", *ARGS, 6, "--from_resume", "1", tmp=tmp_path, check=False)
    assert "rank 0 (host" in log and "has step 4 but rank 1" in log and "has no file" in log, log
    assert "[rank 1] error: resume file" in log and "must be shared" in log  # one line per rank, no worker trace
