"""Plot training runs from their metrics JSONL (no wandb needed): one subplot per metric, runs overlaid.

    python scripts/plot_metrics.py checkpoints/pretrain_640_moe_metrics.jsonl --out pretrain.png
    python scripts/plot_metrics.py checkpoints/pretrain_128_metrics.jsonl checkpoints/full_sft_128_metrics.jsonl \
        --out compare.png --smooth 0.6
    python scripts/plot_metrics.py checkpoints/grpo_*_metrics.jsonl --keys reward,kl,loss --out grpo.png
    python scripts/plot_metrics.py checkpoints/*_metrics.jsonl --per_run --out plots/run.png  # plots/run_{name}.png
    python scripts/plot_metrics.py on/pretrain_640_moe_metrics.jsonl:"gate on" \
        off/pretrain_640_moe_metrics.jsonl:"gate off" --keys eval_bpb,sink_share,act_max --out gate.png

Every training stage appends each logged row to checkpoints/{weight}_{hidden}{_moe}_metrics.jsonl (loss, lr, grad
norm, tokens/s, and the stage's own metrics: reward, kl, lr_actor...). Every numeric key is drawn against --x
(global_step by default, then step, then the row number); non-numeric values, booleans and the counters (epoch,
step, global_step, micro_step, samples) and eta_min are skipped unless --keys names them, and so are per-layer keys
(with a "/", e.g. layers/sink_share_L3: dozens of them; name them in --keys to draw some). Keys logged only at some
steps (held-out eval_loss, eval_bpb, the gate/sink/act/expert statistics) are drawn at those steps. A resumed run
logs some steps again: the last row for a step wins, so the curve shows the run that continued. --smooth A draws an
exponential moving average (weight A on the past, bias-corrected, as TensorBoard does) over a faint raw curve. The
run name in the legend is FILE:LABEL's label, else the file name without _metrics.jsonl. Output: one PNG
(matplotlib, Agg backend: no display needed), or one per run with --per_run.
"""
import argparse
import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class UserError(SystemExit):
    """Bad input: exits with one line on stderr (status 1), no traceback. Not the spine's UserError: importing
    trainer/ would pull in torch (seconds) for a script that only reads JSON."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


SKIP = {"epoch", "step", "global_step", "micro_step", "samples", "eta_min"}
# a readable order for the usual keys; anything else follows alphabetically
PREFERRED = ["loss", "reward", "kl", "lr", "lr_actor", "lr_critic", "grad_norm", "grad_norm_actor", "grad_norm_critic",
             "tokens_per_s"]


def split_label(arg: str) -> tuple[Path, str | None]:
    """FILE or FILE:LABEL -> (path, label or None). A path that exists as typed is a file even with a colon in it."""
    path, sep, label = arg.rpartition(":")
    if not sep or Path(arg).is_file() or not label or "/" in label or "\\" in label:
        return Path(arg), None
    return Path(path), label


def run_name(path: Path) -> str:
    name = path.name
    for suffix in ("_metrics.jsonl", ".jsonl"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def read_run(path: Path, x_key: str) -> tuple[str, dict[float, dict]]:
    """(x axis name, {x: row}) in x order. Where x goes back (a resumed run re-logging steps), the rows the earlier
    attempt logged from that x on are dropped: the curve shows the run that continued."""
    if not path.is_file():
        raise UserError(f"{path} not found; metrics files are checkpoints/{{weight}}_{{hidden}}_metrics.jsonl")
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if n == len(lines):  # a run killed mid-write leaves a partial last line
                print(f"note: {path} line {n} is incomplete ({e}); skipped")
                continue
            raise UserError(f"{path} line {n}: not a JSON object ({e}); fix or delete that line")
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no rows; the run has not logged yet (see --log_interval)")
    axis = next((k for k in (x_key, "global_step", "step") if all(is_number(r.get(k)) for r in rows)), None)
    if axis != x_key:
        print(f"note: {path} has no numeric {x_key!r} in every row; x axis = {axis or 'row number'}")
    kept: list[tuple[float, dict]] = []
    for i, row in enumerate(rows):
        x = float(row[axis]) if axis else float(i)
        while kept and kept[-1][0] >= x:
            kept.pop()
        kept.append((x, row))
    return axis or "row", dict(kept)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def series_keys(runs: dict, keys: list[str] | None, x_names: set[str]) -> list[str]:
    if keys:
        return keys
    found = {k for _, rows in runs.values() for row in rows.values() for k, v in row.items() if is_number(v)}
    found -= SKIP | x_names
    found = {k for k in found if "/" not in k}
    return [k for k in PREFERRED if k in found] + sorted(found - set(PREFERRED))


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased so the first points are not pulled towards 0; NaN gaps skipped."""
    out, avg, n = [], 0.0, 0
    for v in values:
        if math.isfinite(v):
            avg, n = weight * avg + (1 - weight) * v, n + 1
        out.append(avg / (1 - weight ** n) if n else float("nan"))
    return out


def save_png(fig, out: Path, dpi: int) -> None:
    """Write the figure through a temp file and rename (a crash never leaves half a PNG), then free it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()


def plot(runs: dict, keys: list[str], out: Path, smooth: float, logy: set[str], title: str | None,
         dpi: int) -> dict:
    """Draw and save one PNG; returns what it drew (path, runs, metrics, and each curve's raw points)."""
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.1 * nrows), squeeze=False, layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    x_names = sorted({axis for axis, _ in runs.values()})
    series = {}
    for ax, key in zip(axes.flat, keys):
        for i, (name, (_, rows)) in enumerate(runs.items()):
            xs = [x for x, r in rows.items() if is_number(r.get(key))]
            ys = [float(rows[x][key]) if math.isfinite(rows[x][key]) else float("nan") for x in xs]
            if not xs:
                continue
            series.setdefault(key, {})[name] = (xs, ys)
            color = colors[i % len(colors)]
            marker = "o" if len(xs) <= 30 else None  # sparse logs: show where the points are
            if smooth > 0:
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1)
                ax.plot(xs, ema(ys, smooth), color=color, label=name, linewidth=1.6, marker=marker, markersize=3)
            else:
                ax.plot(xs, ys, color=color, label=name, linewidth=1.4, marker=marker, markersize=3)
        ax.set_title(key, fontsize=11)
        ax.set_xlabel(" / ".join(x_names), fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if key in logy:
            ax.set_yscale("log")
        else:  # lr of 1e-4 reads better as 1e-4 than as 0.0001; no offset trick on the axis
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:  # the legend lists every run, even one missing from the first subplot
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if title or len(labels) == 1:
        fig.suptitle(title or labels[0], fontsize=12)
    if len(labels) > 1:  # constrained layout makes room for an "outside" legend (below when a title takes the top)
        fig.legend(handles, labels, loc=f"outside {'lower' if title else 'upper'} center", ncol=min(len(labels), 4),
                   fontsize=9, frameon=False)
    save_png(fig, out, dpi)
    print(f"wrote {out} ({len(keys)} metrics, {len(runs)} run{'s' if len(runs) > 1 else ''})")
    return {"path": str(out), "runs": list(runs), "keys": keys, "series": series}


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot metrics JSONL files (checkpoints/*_metrics.jsonl)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("files", nargs="+", help="metrics JSONL files, each optionally FILE:LABEL (the legend's name); "
                                            "several are overlaid")
    p.add_argument("--out", type=str, default="metrics.png", help="PNG path (with --per_run: {stem}_{run}.png)")
    p.add_argument("--keys", type=str, default=None, help="comma-separated metrics to draw (default: every numeric)")
    p.add_argument("--x", type=str, default="global_step", help="x axis key (falls back to step, then row number)")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) (0 = raw curves)")
    p.add_argument("--logy", type=str, default="", help="comma-separated metrics drawn on a log scale (e.g. lr)")
    p.add_argument("--per_run", action="store_true", help="one PNG per run instead of one overlaid PNG")
    p.add_argument("--title", type=str, default=None, help="figure title")
    p.add_argument("--dpi", type=int, default=100, help="resolution")
    args = p.parse_args(argv)

    if not 0 <= args.smooth < 1:
        raise UserError(f"--smooth {args.smooth}: the EMA weight must be in [0, 1)")
    runs = {}
    for f in args.files:
        path, label = split_label(f)
        name = label or run_name(path)
        if name in runs and label:
            raise UserError(f"two runs are labelled {label!r}; give each FILE:LABEL its own label")
        if name in runs:  # same file name from two folders: tell them apart by the folder
            name = f"{path.parent.name}/{name}"
        runs[name] = read_run(path, args.x)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    x_names = {axis for axis, _ in runs.values()}
    keys = series_keys(runs, keys, x_names)
    if not keys:
        raise UserError(f"no numeric metrics in {', '.join(args.files)}")
    missing = [k for k in keys if not any(is_number(r.get(k)) for _, rows in runs.values() for r in rows.values())]
    if missing:
        raise UserError(f"--keys {','.join(missing)} not found (numeric) in any file")
    logy = {k.strip() for k in args.logy.split(",") if k.strip()}
    out = Path(args.out)
    if not args.per_run:
        return [plot(runs, keys, out, args.smooth, logy, args.title, args.dpi)]
    written = []
    for name, run in runs.items():
        own = [k for k in keys if any(is_number(r.get(k)) for r in run[1].values())]
        path = out.with_name(f"{out.stem}_{name.replace('/', '_')}{out.suffix or '.png'}")
        written.append(plot({name: run}, own, path, args.smooth, logy, args.title, args.dpi))
    return written


if __name__ == "__main__":
    main()
