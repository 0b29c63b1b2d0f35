"""Run training scripts in one process and record the gradient of their first optimizer step (a test helper).

    python -m torch.distributed.run --nproc_per_node 2 tests/grad_probe.py JOBS.json
    JOBS.json: [{"script": "trainer/train_full_sft.py", "args": [...], "grads": "out.pt" or null,
                 "copy": [src_dir, dst_dir] (optional: rank 0 copies a folder before the job)}, ...]

Each job runs the real script as __main__ (sys.argv patched). With "grads", rank 0 saves {name: grad} of the
trainable parameters as the first optimizer step sees them (after DDP's all-reduce, before clipping/stepping).
Used by tests/test_long_runs.py to compare 2 ranks with 1 rank inside a single torchrun launch, and by
tests/test_fsdp.py to run a chain of DDP and FSDP runs (and resumes of copies of their checkpoints) in one launch.
"""
import json
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import trainer.spine.loop  # noqa: E402
from trainer.spine.loop import TrainLoop  # noqa: E402


def record_first_step(path, store=None):
    """Patch TrainLoop so its first optimizer step saves the gradients to `path` (rank 0) or into `store`."""
    original = TrainLoop._optimizer_step

    def probe(self):
        if not getattr(self, "_probed", False):
            self._probed = True
            grads = {n: p.grad.detach().clone() for n, p in self.raw_model.named_parameters() if p.grad is not None}
            if store is not None:
                store.update(grads)
            if path and self.ctx.is_main:
                torch.save(grads, path)
        original(self)
    TrainLoop._optimizer_step = probe
    return original


def main():
    jobs = json.loads(Path(sys.argv[1]).read_text())
    # one process group for all jobs: a second init_process_group under the same torchrun store does not connect,
    # so the scripts find it initialized and their teardown only waits for the other rank
    dist.init_process_group("gloo")
    trainer.spine.loop.cleanup_distributed = dist.barrier
    for job in jobs:
        if job.get("copy"):
            if dist.get_rank() == 0:
                import shutil
                shutil.copytree(*job["copy"])
            dist.barrier()
        original = record_first_step(job.get("grads"))
        sys.argv = [str(ROOT / job["script"]), *map(str, job["args"])]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as e:
            if e.code not in (0, None):
                raise
        finally:
            TrainLoop._optimizer_step = original
        print(f"[rank {os.environ.get('RANK')}] job done: {job['script']}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
