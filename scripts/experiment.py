"""Controlled pretraining experiments on the demo corpus: attention output gate on vs off, AdamW vs Muon.

    nice -n 5 python scripts/experiment.py --experiment gate       # ~12 min on 2 loaded CPU cores
    nice -n 5 python scripts/experiment.py --experiment optimizer

Each arm is the real trainer/train_pretrain.py, run as a subprocess with the same data, seeds, steps and every other
flag; only the arm's flag differs (--headwise_attn_output_gate 1/0, or --optimizer adamw/muon with the gate on).
Data: the last --heldout records of --data_path (default the bundled dataset/demo/pretrain.jsonl) are written to a
held-out file and never trained on; the rest is the training file. Each run evaluates eval_loss / eval_bpb on that
held-out file every --eval_interval optimizer steps and at the end (trainer/spine/evaluate.py), so every arm is
measured on the same documents at the same steps. Two arms with the same seed see the same documents in the same
order, so the same step means the same tokens.

gate: after training, scripts/inspect_model.py measures each final checkpoint on the held-out file (sink_share: mean
over layers of the attention on each sequence's first token; act_max: largest |hidden state|; gate_sparsity: share
of gate scores below 0.1, gate on only; model/model_stats.py defines them).
optimizer: held-out bpb at equal tokens (the final evaluation: same step, same documents) and at equal wall-clock:
T = the faster arm's training time (the metrics rows' train_s: seconds of training, evaluation passes and start-up
left out); the slower arm's eval_bpb at T is interpolated linearly between its two evaluations around T. The two arms
of a seed run back to back, so they share the machine's load as far as it can be shared; the wall-clock numbers of a
loaded shared machine are noisy, and the table gives each arm's training time so a reader can judge.

Writes {--work_dir}/{arm}_seed{S}/ (weights, metrics, logs), docs/experiment_{name}.json (every number),
docs/experiment_{name}.png (held-out eval_bpb and training loss of every run against documents seen, drawn by
scripts/plot_metrics.py) and, for the gate, docs/experiment_gate_inspect.png (per-layer statistics side by side),
for the optimizers docs/experiment_optimizer_time.png (against training seconds); prints the Markdown table.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.trainer_utils import atomic_write_text  # noqa: E402

ARMS = {
    "gate": [("gate_on", ["--headwise_attn_output_gate", "1"]), ("gate_off", ["--headwise_attn_output_gate", "0"])],
    "optimizer": [("adamw", ["--optimizer", "adamw"]), ("muon", ["--optimizer", "muon"])],
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--experiment", choices=sorted(ARMS), required=True, help="which comparison to run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="one run per arm and seed")
    p.add_argument("--data_path", default=str(ROOT / "dataset" / "demo" / "pretrain.jsonl"),
                   help="pretraining JSONL; its last --heldout records are held out")
    p.add_argument("--heldout", type=int, default=500, help="records held out from the end of --data_path")
    p.add_argument("--hidden_size", type=int, default=128, help="model width")
    p.add_argument("--num_hidden_layers", type=int, default=4, help="model depth")
    p.add_argument("--use_moe", type=int, default=0, choices=[0, 1], help="MoE FFN in every arm")
    p.add_argument("--batch_size", type=int, default=16, help="documents per optimizer step")
    p.add_argument("--epochs", type=int, default=1, help="epochs over the training file")
    p.add_argument("--learning_rate", type=float, default=2e-3, help="peak lr of every arm (one value, not tuned)")
    p.add_argument("--max_seq_len", type=int, default=128, help="packed row width")
    p.add_argument("--eval_interval", type=int, default=20, help="optimizer steps between held-out evaluations")
    p.add_argument("--eval_samples", type=int, default=300, help="held-out documents per evaluation")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="training precision")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP threads per run (1: on a shared 2-core box 2 threads ran ~10x slower, measured)")
    p.add_argument("--work_dir", default=None, help="runs go here (default out/experiment_{name})")
    p.add_argument("--docs_dir", default=str(ROOT / "docs"), help="where the JSON and pictures go")
    return p


def split_data(src: Path, heldout: int, work: Path) -> tuple[Path, Path]:
    """train.jsonl = all but the last `heldout` non-blank records, heldout.jsonl = those (byte-identical lines)."""
    lines = [line for line in src.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    if heldout < 1 or heldout >= len(lines):
        raise SystemExit(f"error: --heldout {heldout} must be between 1 and {len(lines) - 1} ({src} has "
                         f"{len(lines)} records)")
    work.mkdir(parents=True, exist_ok=True)
    train, held = work / "train.jsonl", work / "heldout.jsonl"
    train.write_text("".join(lines[:-heldout]), encoding="utf-8")
    held.write_text("".join(lines[-heldout:]), encoding="utf-8")
    return train, held


def run_arm(args, name: str, flags: list, seed: int, train: Path, held: Path, work: Path) -> dict:
    """One training run; returns its evaluation rows and timings."""
    run = work / f"{name}_seed{seed}"
    cmd = [sys.executable, str(ROOT / "trainer" / "train_pretrain.py"),
           "--data_path", str(train), "--eval_data_path", str(held), "--eval_samples", str(args.eval_samples),
           "--eval_interval", str(args.eval_interval), "--hidden_size", str(args.hidden_size),
           "--num_hidden_layers", str(args.num_hidden_layers), "--use_moe", str(args.use_moe),
           "--batch_size", str(args.batch_size), "--accumulation_steps", "1", "--epochs", str(args.epochs),
           "--learning_rate", str(args.learning_rate), "--max_seq_len", str(args.max_seq_len),
           "--dtype", args.dtype, "--device", "cpu", "--num_workers", "0", "--seed", str(seed),
           "--log_interval", str(args.eval_interval), "--save_interval", "100000",
           "--save_dir", str(run / "out"), "--checkpoint_dir", str(run / "checkpoints"), *flags]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), WANDB_MODE="disabled", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    run.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    t0, load0 = time.time(), os.getloadavg()[0]
    with open(run / "train.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"error: {name} seed {seed} failed (exit {rc}); see {run / 'train.log'}")
    moe = "_moe" if args.use_moe else ""
    metrics = run / "checkpoints" / f"pretrain_{args.hidden_size}{moe}_metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    evals = [{k: r[k] for k in ("global_step", "samples", "train_s", "eval_bpb", "eval_loss")}
             for r in rows if "eval_bpb" in r]
    print(f"    done in {wall:.0f} s (load {load0:.1f} -> {os.getloadavg()[0]:.1f}); final eval_bpb "
          f"{evals[-1]['eval_bpb']:.4f} after {evals[-1]['train_s']:.0f} s of training", flush=True)
    return {"arm": name, "seed": seed, "flags": flags, "wall_s": wall, "load_start": load0,
            "weights": str(run / "out" / f"pretrain_{args.hidden_size}{moe}.pth"), "metrics": str(metrics),
            "evals": evals, "command": " ".join(cmd[1:])}


def bpb_at_time(evals: list, t: float) -> float:
    """eval_bpb at training time t, linear between the evaluations around it (t beyond the last: the last)."""
    pts = [(e["train_s"], e["eval_bpb"]) for e in evals]
    if t >= pts[-1][0]:
        return pts[-1][1]
    for (t0, b0), (t1, b1) in zip(pts, pts[1:]):
        if t0 <= t <= t1:
            return b0 + (b1 - b0) * (t - t0) / max(t1 - t0, 1e-9)
    return pts[0][1]


def inspect(runs: list, held: Path, out_png: Path, work: Path) -> dict:
    """scripts/inspect_model.py over every final checkpoint, on the held-out file: label -> summary."""
    labels = [f"{r['arm']}_seed{r['seed']}" for r in runs]
    out_json = work / "inspect.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "inspect_model.py"), "--weight", *[r["weights"] for r in runs],
           "--labels", *labels, "--data_path", str(held), "--max_samples", "128", "--device", "cpu",
           "--dtype", "float32", "--json", str(out_json), "--out", str(out_png)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: inspect_model failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    print(proc.stdout)
    return {m["label"]: m["summary"] for m in json.loads(out_json.read_text())["models"]}


def plot(runs: list, out_png: Path, work: Path, title: str, x: str = "samples") -> None:
    """Held-out eval_bpb and the training loss of every run against documents seen (x="samples": the same
    documents for every arm of a seed) or training seconds (x="train_s"); legend names {arm}_s{seed}."""
    files = []
    for r in runs:
        f = work / "plots" / f"{r['arm']}_s{r['seed']}_metrics.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(Path(r["metrics"]).read_text())
        files.append(str(f))
    cmd = [sys.executable, str(ROOT / "scripts" / "plot_metrics.py"), *files, "--keys", "eval_bpb,loss",
           "--x", x, "--out", str(out_png), "--title", title]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: plot_metrics failed:\n{proc.stderr[-2000:]}")


def gate_table(runs: list, stats: dict) -> str:
    head = ("| seed | gate | held-out eval_bpb | eval_loss | sink_share | act_max | gate_sparsity | training s |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in runs:
        s = stats[f"{r['arm']}_seed{r['seed']}"]
        last = r["evals"][-1]
        sparsity = f"{s['gate_sparsity']:.3f}" if "gate_sparsity" in s else "-"
        body += (f"| {r['seed']} | {'on' if r['arm'] == 'gate_on' else 'off'} | {last['eval_bpb']:.4f} | "
                 f"{last['eval_loss']:.4f} | {s['sink_share']:.3f} | {s['act_max']:.3g} | {sparsity} | "
                 f"{last['train_s']:.0f} |\n")
    return head + body


def optimizer_table(runs: list) -> tuple[str, dict]:
    head = ("| seed | optimizer | eval_bpb, equal tokens (final) | training s | eval_bpb, equal wall-clock "
            "(at T) | T (s) |\n|---|---|---|---|---|---|\n")
    body, verdict = "", {}
    for seed in sorted({r["seed"] for r in runs}):
        pair = {r["arm"]: r for r in runs if r["seed"] == seed}
        t = min(p["evals"][-1]["train_s"] for p in pair.values())
        at_t = {a: bpb_at_time(p["evals"], t) for a, p in pair.items()}
        final = {a: p["evals"][-1]["eval_bpb"] for a, p in pair.items()}
        verdict[seed] = {"muon_wins_equal_tokens": final["muon"] < final["adamw"],
                         "muon_wins_equal_time": at_t["muon"] < at_t["adamw"], "T": t,
                         "final": final, "at_T": at_t}
        for a in ("adamw", "muon"):
            body += (f"| {seed} | {a} | {final[a]:.4f} | {pair[a]['evals'][-1]['train_s']:.0f} | {at_t[a]:.4f} | "
                     f"{t:.0f} |\n")
    return head + body, verdict


def main():
    args = build_parser().parse_args()
    name = args.experiment
    work = Path(args.work_dir) if args.work_dir else ROOT / "out" / f"experiment_{name}"
    docs = Path(args.docs_dir)
    train, held = split_data(Path(args.data_path), args.heldout, work)
    runs = [run_arm(args, arm, flags, seed, train, held, work) for seed in args.seeds for arm, flags in ARMS[name]]
    plot(runs, docs / f"experiment_{name}.png", work,
         f"held-out eval_bpb, {args.hidden_size}x{args.num_hidden_layers}, demo corpus")
    result = {"experiment": name, "args": vars(args), "runs": runs}
    if name == "gate":
        stats = inspect(runs, held, docs / "experiment_gate_inspect.png", work)
        result["inspect"] = stats
        table = gate_table(runs, stats)
    else:
        plot(runs, docs / "experiment_optimizer_time.png", work,
             f"held-out eval_bpb against training seconds, {args.hidden_size}x{args.num_hidden_layers}", x="train_s")
        table, verdict = optimizer_table(runs)
        result["verdict"] = {str(k): v for k, v in verdict.items()}
        wins = all(v["muon_wins_equal_tokens"] and v["muon_wins_equal_time"] for v in verdict.values())
        table += (f"\nmuon wins at equal tokens and at equal wall-clock for every seed: {'yes' if wins else 'no'}\n")
    # paths relative to the repo root: the JSON is committed beside the README's table
    text = json.dumps(result, indent=1).replace(f"{ROOT}{os.sep}", "")
    atomic_write_text(text + "\n", str(docs / f"experiment_{name}.json"))
    print(table)
    print(f"wrote {docs / f'experiment_{name}.json'} and {docs / f'experiment_{name}.png'}")


if __name__ == "__main__":
    main()
