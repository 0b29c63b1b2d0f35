"""What packing buys and costs: training throughput in real tokens/s, and the loss effect of split documents.

    python scripts/bench_packing.py speed                  # 512x8, batch 16 x 340, SFT- and pretrain-shaped lengths
    python scripts/bench_packing.py speed --hidden_size 640 --num_hidden_layers 12 --use_moe 1 --device cuda
    python scripts/bench_packing.py loss                   # 128x4 on the demo data, --pack 0 vs 1, 3 seeds

speed: forward + loss + backward of the same micro-batches padded (collate_lm) and packed (collate_packed for SFT
lengths, collate_pretrain_packed for pretrain lengths), alternating A, B, A, B over --repeats; real tokens per second
(median, min-max) and the real-token share of the computed positions. Lengths are lm_dataset.synthetic_lengths (the
--pack_report shapes), in the unsorted order a plain sampler gives (no length grouping), with random token ids.

loss: the last 500 lines of dataset/demo/pretrain.jsonl are held out, the rest is one training epoch of
trainer/train_pretrain.py (a subprocess, fp32) with --pack 0 and --pack 1; the sampler's order does not depend on
--pack, so both runs see the same documents in the same optimizer steps. Printed per run: the held-out loss (mean
next-token cross-entropy of every held-out document run alone), the mean training loss of the last 50 steps, the
real-token share, and the share of training tokens in a split document's later pieces (which lack the earlier
piece's context).
"""
import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dataset.lm_dataset import (PretrainDataset, collate_lm, collate_packed, collate_pretrain_packed,  # noqa: E402
                                split_share, synthetic_lengths)
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402
from trainer.trainer_utils import SkipBatchSampler, load_tokenizer, load_weights, resolve_dtype  # noqa: E402

HELD_OUT = 500


# ------------------------------------------------------------------------------------------------------------------
# speed

def speed(args):
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                            use_moe=bool(args.use_moe), headwise_attn_output_gate=True)
    model = MiniMindForCausalLM(config).to(device).train()
    print(f"{args.hidden_size}x{args.num_hidden_layers}{' MoE' if args.use_moe else ''}, {device} {dtype}, batch "
          f"{args.batch_size}, max_seq_len {args.max_seq_len}, {args.batches} micro-batches x {args.repeats} repeats")

    def step(batch):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch.get("position_ids"), labels=batch["labels"])
        (out.loss + out.aux_loss).backward()
        model.zero_grad(set_to_none=True)

    print("lengths   layout  real share  real tok/s (median, min-max)")
    for kind in ("sft", "pretrain"):
        rng = random.Random(0)
        micro = []
        for _ in range(args.batches):
            ids = [torch.randint(3, config.vocab_size, (n,)) for n in
                   synthetic_lengths(kind, args.batch_size, args.max_seq_len, rng)]
            micro.append([{"input_ids": x, "labels": x.clone()} for x in ids])
        pack = collate_pretrain_packed if kind == "pretrain" else collate_packed
        layouts = {"padded": [collate_lm(b) for b in micro],
                   "packed": [pack(b, args.max_seq_len) for b in micro]}
        layouts = {k: [{n: t.to(device) for n, t in b.items()} for b in v] for k, v in layouts.items()}
        real = sum(len(it["input_ids"]) for b in micro for it in b)
        step(layouts["packed"][0])  # warm-up
        step(layouts["padded"][0])
        times = {k: [] for k in layouts}
        for _ in range(args.repeats):
            for k, batches in layouts.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                for b in batches:
                    step(b)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t)
        for k, batches in layouts.items():
            share = real / sum(b["input_ids"].numel() for b in batches)
            rate = sorted(real / t for t in times[k])
            print(f"{kind:8} {k:7} {share:10.1%}  {statistics.median(rate):8.0f} ({rate[0]:.0f}-{rate[-1]:.0f})")
        pad, packed = (statistics.median(times[k]) for k in ("padded", "packed"))
        print(f"{kind:8} packed / padded real tok/s: {pad / packed:.2f}x")


# ------------------------------------------------------------------------------------------------------------------
# loss

def heldout_loss(weights, config, data, tokenizer, max_len):
    """Mean next-token cross-entropy over every target of the held-out documents, each run alone (padded)."""
    model = MiniMindForCausalLM(config)
    load_weights(model, str(weights), config)
    model.eval()
    ds = PretrainDataset(data, tokenizer, max_length=max_len, target_sample=0)
    total = count = 0.0
    with torch.no_grad():
        for k in range(0, len(ds), 32):
            batch = collate_lm([ds[i] for i in range(k, min(k + 32, len(ds)))])
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            total, count = total + loss.item() * n, count + n
    return total / count


def loss(args):
    tokenizer = load_tokenizer(str(ROOT / "model"))
    config = MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                            use_moe=bool(args.use_moe), headwise_attn_output_gate=True)
    weight = f"pretrain_{args.hidden_size}{'_moe' if args.use_moe else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lines = (ROOT / "dataset" / "demo" / "pretrain.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        train, held = tmp / "train.jsonl", tmp / "heldout.jsonl"
        train.write_text("".join(lines[:-HELD_OUT]), encoding="utf-8")
        held.write_text("".join(lines[-HELD_OUT:]), encoding="utf-8")
        results = {}
        print("max_seq_len seed pack  held-out loss  train loss (last 50)  real tokens  split-piece tokens")
        for max_len in args.max_seq_lens:
            ds = PretrainDataset(train, tokenizer, max_length=max_len, target_sample=0)
            for seed in args.seeds:
                order = [i for b in SkipBatchSampler(len(ds), args.batch_size, seed=seed) for i in b]
                cut = split_share([len(ds[i]["input_ids"]) for i in order], args.batch_size, max_len)
                for pack in (0, 1):
                    out = tmp / f"run_{max_len}_{seed}_{pack}"
                    cmd = [sys.executable, str(ROOT / "trainer" / "train_pretrain.py"), "--data_path", str(train),
                           "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
                           "--use_moe", str(args.use_moe), "--batch_size", str(args.batch_size),
                           "--accumulation_steps", "1", "--learning_rate", str(args.learning_rate), "--max_seq_len",
                           str(max_len), "--seed", str(seed), "--pack", str(pack), "--device", args.device,
                           "--dtype", "float32", "--num_workers", "0", "--log_interval", "1", "--save_dir", str(out),
                           "--checkpoint_dir", str(out)]
                    subprocess.run(cmd, check=True, capture_output=True, text=True)
                    rows = [json.loads(x) for x in (out / f"{weight}_metrics.jsonl").open()]
                    train_loss = statistics.mean(r["logits_loss"] for r in rows[-50:])
                    real = sum(r["real_tokens"] for r in rows) / len(rows)
                    held_loss = heldout_loss(out / f"{weight}.pth", config, held, tokenizer, max_len)
                    results.setdefault((max_len, pack), []).append(held_loss)
                    print(f"{max_len:11} {seed:4} {pack:4} {held_loss:14.4f} {train_loss:21.4f} {real:12.1%} "
                          f"{cut if pack else 0:19.1%}", flush=True)
        for max_len in args.max_seq_lens:
            pad, packed = results[(max_len, 0)], results[(max_len, 1)]
            diffs = ", ".join(f"{b - a:+.4f}" for a, b in zip(pad, packed))
            print(f"max_seq_len {max_len}: held-out loss padded {statistics.mean(pad):.4f}, packed "
                  f"{statistics.mean(packed):.4f}; packed - padded per seed {diffs}; seed-to-seed spread (padded) "
                  f"{max(pad) - min(pad):.4f}")


def main():
    p = argparse.ArgumentParser(description="packing: throughput and loss effect / 打包的速度与损失影响",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed", help="real tokens/s, padded vs packed", formatter_class=p.formatter_class)
    s.add_argument("--hidden_size", type=int, default=512)
    s.add_argument("--num_hidden_layers", type=int, default=8)
    s.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    s.add_argument("--batch_size", type=int, default=16)
    s.add_argument("--max_seq_len", type=int, default=340)
    s.add_argument("--batches", type=int, default=4, help="micro-batches per timed run")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype (default: the training scripts' default for the device)")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    s.set_defaults(run=speed)
    lo = sub.add_parser("loss", help="held-out loss on the demo data, --pack 0 vs 1",
                        formatter_class=p.formatter_class)
    lo.add_argument("--hidden_size", type=int, default=128)
    lo.add_argument("--num_hidden_layers", type=int, default=4)
    lo.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    lo.add_argument("--batch_size", type=int, default=16)
    lo.add_argument("--learning_rate", type=float, default=2e-3)
    lo.add_argument("--max_seq_lens", type=int, nargs="+", default=[64, 128])
    lo.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    lo.add_argument("--device", default="cpu")
    lo.set_defaults(run=loss)
    args = p.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
