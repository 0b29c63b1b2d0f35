"""Inspect a checkpoint: per-layer gate scores, attention sink, massive activations and expert loads, as a table, a
JSON file and a picture; two or more weights side by side.

    python scripts/inspect_model.py --weight pretrain --out inspect.png
    python scripts/inspect_model.py --weight full_sft --data_path dataset/demo/sft.jsonl --json inspect.json
    python scripts/inspect_model.py --weight gate_on/pretrain_640_moe.pth gate_off/pretrain_640_moe.pth \
        --labels "gate on" "gate off" --out gate.png                     # side by side
    python scripts/inspect_model.py --hf_dir ./MiniMind2-hf --out hf.png  # a transformers folder

Each --weight is a weight name in --save_dir (sizes from its sidecar, as eval_llm.py), a .pth path (its sidecar
beside it), or a transformers folder. The text: --data_path (pretrain {"text"} or SFT {"conversations"} JSONL, its
first --max_samples records) or, by default, a fixed set of bilingual texts below; each is tokenized as the training
stages do, cut at --max_seq_len, and run in right-padded batches (pads never count). The statistics are
model/model_stats.py's (what each one means is written there): gate_mean and gate_sparsity (share of head-wise gate
scores below 0.1; gated models), sink_share (attention on each sequence's first token, position 0 itself left out),
act_max (largest |hidden state| of the residual stream), expert_load per expert (sums to 1), expert_load_cv and
expert_entropy (MoE). Training runs log the same keys at each evaluation.
"""
import argparse
import copy
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dataset.lm_dataset import PretrainDataset, SFTDataset, collate_lm  # noqa: E402
from model.model_stats import ModelStats  # noqa: E402
from trainer.chat_utils import add_device_arg, add_model_args, inference_context, load_model, place_model  # noqa: E402
from trainer.trainer_utils import UserError, atomic_write_text, run_main, user_path  # noqa: E402

# Fixed default text: a few hundred tokens each, Chinese and English, prose, lists and arithmetic, so that the
# sink share averages over many query positions and two runs are measured on exactly the same tokens.
TEXTS = [
    "春天来了，河边的柳树发出了新芽。孩子们在草地上放风筝，老人们坐在树下聊天。田野里，农民开始播种，"
    "他们希望今年有一个好收成。傍晚的时候，太阳慢慢落下，天空变成了橙红色，鸟儿成群地飞回树林。",
    "The river starts in the mountains, where snow melts in spring. It runs through forests and small towns, "
    "turns a few old mills, and reaches the sea after about three hundred kilometres. Fish swim upstream every "
    "autumn, and the people of the valley have told stories about them for centuries.",
    "中国的首都是北京。日本的首都是东京。法国的首都是巴黎。3 加 4 等于 7。12 减 5 等于 7。"
    "一年有十二个月，一个星期有七天，一天有二十四个小时。水在零摄氏度结冰，在一百摄氏度沸腾。",
    "To make tea, boil fresh water, warm the pot, add one spoon of leaves for each cup, pour the water, and wait "
    "three to five minutes. Green tea wants cooler water than black tea. Serve it hot, with or without milk.",
    "学习一门新的语言需要耐心。每天读一点书，写几个句子，和别人练习说话。开始的时候会犯很多错误，"
    "但是慢慢地就会进步。重要的是坚持下去，不要因为困难而放弃。",
    "A neural network is a function built from many simple units. Each unit multiplies its inputs by weights, adds "
    "them up and applies a non-linear function. Training changes the weights so that the outputs match examples.",
    "7 + 8 = 15. 23 + 19 = 42. 100 - 37 = 63. 6 × 7 = 42. 81 ÷ 9 = 9. The sum of the first ten numbers is 55. "
    "Two plus two is four, and four times four is sixteen.",
    "地球绕着太阳转，一年转一圈。因为地轴是倾斜的，所以有了春夏秋冬四个季节。月亮绕着地球转，"
    "大约一个月转一圈。晴朗的夜晚，我们可以看到满天的星星。",
]
STATS = [("gate_mean", "gate"), ("gate_sparsity", "gate<0.1"), ("sink_share", "sink"), ("act_max", "act_max"),
         ("expert_load_cv", "load_cv"), ("expert_entropy", "router_H")]


def build_parser():
    p = argparse.ArgumentParser(description="Per-layer gate / attention-sink / activation / expert statistics",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, conflict_handler="resolve")
    add_model_args(p)
    add_device_arg(p)
    p.add_argument("--weight", type=str, nargs="+", default=None,
                   help="权重 / one or more: a weight name in --save_dir, a .pth path, or a transformers folder "
                        "(default: full_sft)")
    p.add_argument("--labels", type=str, nargs="+", default=None, help="names in the table and picture, one per weight")
    p.add_argument("--data_path", type=str, default=None,
                   help="pretrain or SFT JSONL to run (default: the built-in bilingual texts)")
    p.add_argument("--max_samples", type=int, default=64, help="first N records of --data_path")
    p.add_argument("--max_seq_len", type=int, default=512, help="tokens per text (longer ones are cut)")
    p.add_argument("--batch_size", type=int, default=8, help="texts per forward")
    p.add_argument("--json", type=str, default=None, help="write the numbers here")
    p.add_argument("--out", type=str, default=None, help="draw the per-layer picture here (PNG)")
    p.add_argument("--dpi", type=int, default=100, help="picture resolution")
    return p


def model_args(args, item: str):
    """A copy of args that load_model reads as this --weight item."""
    a = copy.copy(args)
    path = Path(item)
    if path.is_dir():
        a.load_from = a.hf_dir = str(path)
    elif item.endswith(".pth"):
        found = re.fullmatch(r"(.+)_(\d+)(_moe)?", path.stem)
        if not found:
            raise UserError(f"--weight {item}: expected a file named {{weight}}_{{hidden}}[_moe].pth as the trainers "
                            "write it")
        a.save_dir, a.weight = str(path.resolve().parent), found.group(1)
        a.hidden_size, a.use_moe = int(found.group(2)), int(bool(found.group(3)))
    else:
        a.weight = item
    return a


def load_texts(args, tokenizer) -> list[torch.Tensor]:
    """Token ids of each text, tokenized as the training stage of its format does."""
    if args.data_path is None:
        bos, eos = [tokenizer.bos_token_id], [tokenizer.eos_token_id]
        return [torch.tensor((bos + tokenizer(t, add_special_tokens=False)["input_ids"] + eos)[:args.max_seq_len])
                for t in TEXTS]
    path = user_path(args.data_path)
    if not os.path.isfile(path):
        raise UserError(f"--data_path {args.data_path} not found")
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except ValueError as e:
        raise UserError(f"{path} line 1 is not JSON ({e}); expected pretrain {{\"text\"}} or SFT "
                        "{\"conversations\"} lines") from None
    kind = {"text": PretrainDataset, "conversations": SFTDataset}
    cls = next((kind[k] for k in kind if isinstance(record, dict) and k in record), None)
    if cls is None:
        raise UserError(f"{path}: the first record has neither \"text\" (pretrain) nor \"conversations\" (SFT)")
    ds = cls(path, tokenizer, args.max_seq_len, target_sample=0)
    return [ds[i]["input_ids"] for i in range(min(args.max_samples, len(ds)))]


def measure(model, texts, batch_size):
    """ModelStats over the texts in right-padded batches -> (summary, per-layer rows, tokens counted)."""
    device = next(model.parameters()).device
    with torch.no_grad(), inference_context(model), ModelStats(model) as st:
        for s in range(0, len(texts), batch_size):
            batch = collate_lm([{"input_ids": t, "labels": t} for t in texts[s:s + batch_size]])
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return st.summary(), st.per_layer(), sum(len(t) for t in texts)


def table(label, rows) -> str:
    cols = [(k, h) for k, h in STATS if any(k in r for r in rows)]
    n_exp = max((len(r["expert_load"]) for r in rows if "expert_load" in r), default=0)
    head = f"{'layer':>5} " + " ".join(f"{h:>9}" for _, h in cols) + "".join(f" {f'E{e}':>6}" for e in range(n_exp))
    lines = [f"== {label}", head]
    for i, r in enumerate(rows):
        cells = [f"{r[k]:>9.4g}" if k in r else f"{'-':>9}" for k, _ in cols]
        loads = "".join(f" {x:>6.3f}" for x in r.get("expert_load", []))
        lines.append(f"{i:>5} " + " ".join(cells) + loads)
    return "\n".join(lines)


def draw(results, out: Path, dpi: int) -> None:
    """Per-layer bars (one colour per model, side by side) and, for MoE models, a layers x experts load heatmap."""
    from scripts.plot_metrics import save_png  # first: it selects the Agg backend (no display needed)

    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = [("gate_mean", "mean gate score"), ("gate_sparsity", "gate sparsity (share of scores < 0.1)"),
              ("sink_share", "first-token attention share"), ("act_max", "max |activation| (residual stream)"),
              ("expert_load_cv", "expert load CV (0 = balanced)")]
    has = {k for res in results for r in res["layers"] for k in r}
    panels = [(k, t) for k, t in panels if k in has or k.startswith("gate")]
    moe = [res for res in results if "expert_load" in {k for r in res["layers"] for k in r}]
    ncols = max(len(panels), len(moe))
    fig, axes = plt.subplots(2 if moe else 1, ncols, figsize=(3.8 * ncols, 3.3 * (2 if moe else 1)), squeeze=False,
                             layout="constrained")
    width = 0.8 / len(results)
    n_layers = max(len(res["layers"]) for res in results)
    for ax, (key, title) in zip(axes[0], panels):
        for m, res in enumerate(results):
            xs = [i + (m - (len(results) - 1) / 2) * width for i, r in enumerate(res["layers"]) if key in r]
            ax.bar(xs, [r[key] for r in res["layers"] if key in r], width=width, color=f"C{m}")
        if key not in has:
            ax.text(0.5, 0.5, "no attention output gate", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer", fontsize=9)
        ax.set_xticks(range(n_layers))
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        if key in ("gate_mean", "gate_sparsity", "sink_share"):
            ax.set_ylim(0, 1)
    for ax in axes[0][len(panels):]:
        ax.set_visible(False)
    if moe:
        # one colour scale for every model, so equal colours mean equal loads
        top = max(x for res in moe for r in res["layers"] for x in r.get("expert_load", []))
        for ax, res in zip(axes[1], moe):
            loads = [r.get("expert_load", []) for r in res["layers"]]
            im = ax.imshow(loads, aspect="auto", cmap="viridis", vmin=0, vmax=top)
            for i, row in enumerate(loads):
                for e, v in enumerate(row):
                    ax.text(e, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="k" if v > 0.6 * top else "w")
            ax.set_title(f"expert load: {res['label']}", fontsize=10)
            ax.set_xlabel("expert", fontsize=9)
            ax.set_ylabel("layer", fontsize=9)
            ax.set_xticks(range(len(loads[0])))
            ax.set_yticks(range(len(loads)))
            ax.tick_params(labelsize=8)
            fig.colorbar(im, ax=ax, shrink=0.8)
        for ax in axes[1][len(moe):]:
            ax.set_visible(False)
    if len(results) > 1:
        handles = [Patch(color=f"C{m}", label=res["label"]) for m, res in enumerate(results)]
        fig.legend(handles=handles, loc="outside upper center", ncol=len(results), frameon=False, fontsize=9)
    else:
        fig.suptitle(results[0]["label"], fontsize=11)
    save_png(fig, out, dpi)

def main(argv=None):
    args = build_parser().parse_args(argv)
    for name in ("max_samples", "max_seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} must be >= 1")
    if args.hf_dir and args.weight:
        raise UserError("--hf_dir and --weight both name a model; to compare a folder with weights, list them all in "
                        "--weight (a transformers folder is accepted there)")
    items = [args.hf_dir] if args.hf_dir else args.weight or ["full_sft"]
    if args.labels and len(args.labels) != len(items):
        raise UserError(f"--labels gives {len(args.labels)} names for {len(items)} weights")
    results = []
    for n, item in enumerate(items):
        a = model_args(args, item)
        model, tokenizer = load_model(a)
        model = place_model(model, args.device, args.dtype)
        texts = load_texts(args, tokenizer)
        summary, rows, tokens = measure(model, texts, args.batch_size)
        results.append({"label": args.labels[n] if args.labels else a.model_name, "model": a.model_file,
                        "texts": len(texts), "tokens": tokens, "summary": summary, "layers": rows})
        del model
    names = [r["label"] for r in results]
    for r in results:
        if names.count(r["label"]) > 1:  # the same file name in two folders (gate on / off runs): add the folder
            r["label"] = f"{Path(r['model']).parent.name}/{r['label']}"
    for r in results:
        print(f"\n{table(r['label'], r['layers'])}")
        line = " | ".join(f"{k} {v:.4g}" for k, v in r["summary"].items() if "/" not in k)
        print(f"   {r['texts']} texts, {r['tokens']} tokens | {line}")
    source = user_path(args.data_path) if args.data_path else "built-in texts"
    if args.json:
        atomic_write_text(json.dumps({"data": source, "models": results}, ensure_ascii=False, indent=1) + "\n",
                          user_path(args.json))
        print(f"wrote {args.json}")
    if args.out:
        draw(results, Path(user_path(args.out)), args.dpi)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    run_main(main)
