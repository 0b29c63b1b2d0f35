"""Per-rank memory and tokens/s of DDP vs FSDP (--fsdp 1): real train_pretrain.py runs under torchrun.

    python scripts/bench_fsdp.py --configs 640x12_moe 1024x16 --nproc 2 4 --steps 4
    python scripts/bench_fsdp.py --configs 640x12_moe --nproc 2 --modes ddp fsdp --device cuda --dtype bfloat16

Each (config, processes, mode) launches `torchrun --nproc_per_node N` on this script in worker mode, which runs
trainer/train_pretrain.py unchanged (demo data, --max_steps steps) and records per rank:
- peak RSS over the whole run (includes start-up, where every rank builds the full fp32 model before DDP copies it
  or FSDP shards it, and the final save, where rank 0 holds the gathered full fp32 model + AdamW state),
- peak RSS of training: VmHWM reset after the first optimizer step (/proc/self/clear_refs; Linux), read before the
  final save,
- on CUDA, torch.cuda.max_memory_allocated over the run,
and tokens/s is the median of the logged steps after the first (the metrics JSONL). A table is printed at the end.
The workers run with MALLOC_MMAP_THRESHOLD_=131072 (glibc): every tensor of 128 KiB or more is its own mapping and
goes back to the OS when freed, so RSS follows the live tensors instead of keeping the freed full model of start-up
(or freed activations) in the heap; both modes alike.
Before each launch the script checks MemAvailable against a 20 B/param (DDP) or 4 B/param (FSDP start-up) estimate
per rank and skips what would not fit, saying so (other jobs share the machine).
"""
import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {  # name: (hidden, layers, moe); all with the attention output gate (the default)
    "640x12_moe": (640, 12, 1), "1024x16": (1024, 16, 0), "1536x16": (1536, 16, 0), "2048x22": (2048, 22, 0),
    "64x2": (64, 2, 0),
}


def status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(out_dir: str, argv: list[str]) -> None:
    """Inside torchrun: run train_pretrain.py as __main__, then write this rank's memory numbers."""
    import torch
    from trainer.spine.loop import TrainLoop
    original = TrainLoop._optimizer_step
    seen = {"steps": 0}

    def step(self):
        original(self)
        seen["steps"] += 1
        if seen["steps"] == 1 and os.path.exists("/proc/self/clear_refs"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM: from here on it is the training peak
    TrainLoop._optimizer_step = step
    save = TrainLoop.save

    def save_after_peak(self, *a, **k):
        # the final save gathers the full fp32 model + AdamW state on rank 0 (both modes): measured apart
        seen.setdefault("train_peak_kib", status_kib("VmHWM"))
        return save(self, *a, **k)
    TrainLoop.save = save_after_peak
    sys.argv = [str(ROOT / "trainer" / "train_pretrain.py"), *argv]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    import resource
    rank = int(os.environ.get("RANK", 0))
    row = {"rank": rank, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "train_peak_rss_gib": seen.get("train_peak_kib", status_kib("VmHWM")) / 2**20}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        row["cuda_max_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(row))


def mem_available_gib() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def n_params(hidden: int, layers: int, moe: int) -> int:
    import torch
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    with torch.device("meta"):
        m = MiniMindForCausalLM(MiniMindConfig(hidden_size=hidden, num_hidden_layers=layers, use_moe=bool(moe)))
    return sum(p.numel() for p in m.parameters())


def run_one(name, nproc, mode, args) -> dict:
    hidden, layers, moe = CONFIGS[name]
    params = n_params(hidden, layers, moe)
    need = nproc * params * (20 if mode == "ddp" else max(4, 16 / nproc + 2)) / 2**30 + nproc * 0.6
    if args.device == "cpu" and need > mem_available_gib() - args.reserve_gib:
        return {"config": name, "nproc": nproc, "mode": mode, "params_m": params / 1e6,
                "skipped": f"needs ~{need:.1f} GiB, {mem_available_gib():.1f} GiB available"}
    with tempfile.TemporaryDirectory() as tmp:
        train = ["--hidden_size", hidden, "--num_hidden_layers", layers, "--use_moe", moe, "--device", args.device,
                 "--num_workers", 0, "--max_seq_len", args.seq_len, "--batch_size", args.batch_size,
                 "--accumulation_steps", 1, "--max_steps", args.steps, "--log_interval", 1,
                 "--save_interval", 10**9, "--data_path", ROOT / "dataset" / "demo" / "pretrain.jsonl",
                 "--save_dir", Path(tmp) / "out", "--checkpoint_dir", Path(tmp) / "ck", "--fsdp", int(mode == "fsdp"),
                 *(["--dtype", args.dtype] if args.dtype else [])]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               __file__, "--worker", tmp, "--", *map(str, train)]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)), WANDB_MODE="disabled",
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MALLOC_MMAP_THRESHOLD_="131072")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            return {"config": name, "nproc": nproc, "mode": mode, "params_m": params / 1e6,
                    "skipped": f"failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-300:]}"}
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
        metrics = next((Path(tmp) / "ck").glob("*_metrics.jsonl"))
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    tps = statistics.median(r["tokens_per_s"] for r in rows[1:]) if len(rows) > 1 else rows[0]["tokens_per_s"]
    out = {"config": name, "nproc": nproc, "mode": mode, "params_m": params / 1e6, "tokens_per_s": tps,
           "loss_last": rows[-1]["loss"]}
    for key in ("peak_rss_gib", "train_peak_rss_gib", "cuda_max_alloc_gib"):
        if key in ranks[0]:
            out[key] = max(r[key] for r in ranks)
    out["rank0_peak_rss_gib"] = ranks[0]["peak_rss_gib"]
    return out


def main():
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        return worker(sys.argv[i + 1], sys.argv[sys.argv.index("--") + 1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["640x12_moe"], choices=sorted(CONFIGS))
    p.add_argument("--nproc", nargs="+", type=int, default=[2, 4])
    p.add_argument("--modes", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (memory needs few)")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="--dtype of the runs ('' = the stage default)")
    p.add_argument("--reserve_gib", type=float, default=3.0, help="leave this much RAM free (CPU runs)")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    rows = []
    print("config      params  procs mode  peak RSS/rank (rank 0)  train peak RSS/rank  cuda alloc  tokens/s  "
          "last loss")
    for name in args.configs:
        for nproc in args.nproc:
            for mode in args.modes:
                r = run_one(name, nproc, mode, args)
                rows.append(r)
                if "skipped" in r:
                    print(f"{name:<11} {r['params_m']:6.0f}M {nproc:5} {mode:<5} skipped: {r['skipped']}", flush=True)
                    continue
                cuda = f"{r['cuda_max_alloc_gib']:8.2f} GiB" if "cuda_max_alloc_gib" in r else "         -"
                print(f"{name:<11} {r['params_m']:6.0f}M {nproc:5} {mode:<5} {r['peak_rss_gib']:9.2f} GiB "
                      f"({r['rank0_peak_rss_gib']:.2f})"
                      f"{r['train_peak_rss_gib']:15.2f} GiB  {cuda}  {r['tokens_per_s']:8.0f}  {r['loss_last']:.4f}",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
