"""Side-by-side speed and memory: this repo's MiniMindForCausalLM against a MiniMind-layout peer checkout.

    python scripts/bench_model.py --peer /path/to/minimind --repeats 3            # all four configs, CPU
    python scripts/bench_model.py --peer /path/to/minimind --device cuda --dtype bfloat16
    python scripts/bench_model.py --configs 512x8 --workloads train,decode        # this repo only, one config

The peer is any checkout with MiniMind's layout (`model/model_minimind.py` defining MiniMindConfig and
MiniMindForCausalLM), e.g. jingyaogong/minimind at 42a4e8c. Its file is imported by path into this process and only
ever run, never copied. Both models get the same random weights (ours are built, its state_dict is loaded into the
peer with strict=True) and the same tokens, and the benchmark checks that both compute the same logits before it
times anything. MiniMind's RoPE tables are buffers that transformers 5 leaves at zero when a model is built on the meta
device; they are recomputed here with the peer's own function so both models compute the same function.

Configs (`--configs`, comma separated, `{hidden}x{layers}[_moe][_gate]`): 512x8, 512x8_moe, 640x12_moe (attention
gate off, so the two models are identical) and 640x12_moe_gate (the user's model; ours only, the peer has no gate).

Rows per config: this repo in its default mode for the device (`--dtype`, else trainer_utils.resolve_dtype: the
training scripts' default), this repo in fp32 (if that differs), and the peer (fp32 on CPU, where MiniMind has no
autocast; the same dtype as ours on CUDA, as its trainers do). Every timed run alternates between the rows
(A, B, C, A, B, C, ...), so load from other processes hits all alike; medians with min-max over --repeats.

Workloads:
  train      forward + cross-entropy (+ MoE aux) + backward + AdamW step on batch x seq_len random tokens, tok/s.
             Ours: forward(labels=...) and the AdamW of trainer_utils.build_optimizer, as the trainers do; the peer:
             its logits + masked-mean CE and torch.optim.AdamW, as its trainers do. lr is 0 so the weights (and the
             MoE routing) stay the same across repeats.
  prefill    one no-grad forward over batch x seq_len with use_cache=True, ms.
  decode     model.generate(ids, max_new_tokens=--decode_tokens, do_sample=False) at batch 1 after a
             --decode_prompt-token prompt (min_new_tokens too, so an early eos never shortens a run): new tokens
             per second of the whole call (prefill included).
  rollout    the padded batch-8 rollout of the RL stages: 8 left-padded prompts of lengths 16..64, sampling at
             temperature 0.8 (top_k 0, seeded), --decode_tokens new tokens per row, tokens/s over the whole call.
  memory     activation memory of one training step: peak of live tensor bytes during forward + backward + AdamW
             step, minus the bytes live before it, where the baseline already holds the fp32 weights, their .grad
             buffers (kept allocated between steps, zero_grad(set_to_none=False)) and the AdamW state.
             CUDA: torch.cuda.max_memory_allocated. CPU: the allocator's own alloc/free events recorded by
             torch.profiler(profile_memory=True), summed in time order; exact tensor bytes, unlike process RSS
             (glibc caching and page reuse made the old VmHWM method move by tens of MB between runs).
             Deterministic, so measured once per row (after warmup), outside the timed runs.
"""

import argparse
import gc
import importlib.util
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIGS = "512x8,512x8_moe,640x12_moe,640x12_moe_gate"
WORKLOADS = ["train", "prefill", "decode", "rollout", "memory"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="this repo vs a MiniMind checkout / 速度与显存对比")
    p.add_argument("--peer", default=None, help="MiniMind-layout checkout to compare with (model/model_minimind.py)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma separated {hidden}x{layers}[_moe][_gate]")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="subset of " + ",".join(WORKLOADS))
    p.add_argument("--batch_size", type=int, default=4, help="training / prefill rows")
    p.add_argument("--seq_len", type=int, default=256, help="training / prefill tokens per row")
    p.add_argument("--decode_prompt", type=int, default=32, help="prompt length of the batch-1 decode")
    p.add_argument("--decode_tokens", type=int, default=128, help="new tokens per row (decode and rollout)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="our default-mode precision (autocast over fp32 weights); default: the trainers' default")
    p.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda if available)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per workload (median, min-max reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time; cpu: CPU seconds of this process (all threads), robust to other load "
                        "on a shared machine (use with --threads 1, where no thread spins waiting for another)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--grad_checkpointing", type=int, default=0, choices=[0, 1],
                   help="ours: model.gradient_checkpointing_enable() (recompute each decoder layer in backward)")
    p.add_argument("--compile_decode", type=int, default=0, choices=[0, 1],
                   help="ours: generate(compile_decode=True), torch.compile of the decode step")
    return p.parse_args(argv)


def parse_config(spec):
    """'640x12_moe_gate' -> dict of MiniMindConfig fields."""
    head, *flags = spec.strip().split("_")
    hidden, layers = (int(v) for v in head.split("x"))
    unknown = set(flags) - {"moe", "gate"}
    if unknown:
        raise SystemExit(f"--configs: unknown flag(s) {sorted(unknown)} in {spec!r}; expected e.g. 640x12_moe_gate")
    return dict(hidden_size=hidden, num_hidden_layers=layers, use_moe="moe" in flags,
                headwise_attn_output_gate="gate" in flags)


def load_peer(peer_dir):
    path = Path(peer_dir) / "model" / "model_minimind.py"
    if not path.is_file():
        raise SystemExit(f"--peer {peer_dir}: no model/model_minimind.py there; pass a MiniMind-layout checkout")
    spec = importlib.util.spec_from_file_location("peer_model_minimind", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def repair_peer_rope(peer_module, model):
    """Recompute MiniMind's RoPE buffers with its own function (they are zero after a meta-device build)."""
    inner = model.model
    if not hasattr(inner, "freqs_cos") or not hasattr(peer_module, "precompute_freqs_cis"):
        return
    c = model.config
    cos, sin = peer_module.precompute_freqs_cis(dim=c.hidden_size // c.num_attention_heads,
                                                end=c.max_position_embeddings, rope_base=c.rope_theta,
                                                rope_scaling=c.rope_scaling)
    inner.freqs_cos.copy_(cos)
    inner.freqs_sin.copy_(sin)


# ------------------------------------------------------------------------------------------------------------------
# One row: a model in one precision with its workloads


class Row:
    def __init__(self, label, model, opt, amp_dtype, device, args, is_ours):
        import torch

        self.label, self.model, self.opt, self.device, self.is_ours = label, model, opt, device, is_ours
        self.amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype != torch.float32 else nullcontext
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.args = args
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=g).to(device)
        self.prompt = torch.randint(3, vocab, (1, args.decode_prompt), generator=g).to(device)
        lengths = [16 + (64 - 16) * i // 7 for i in range(8)]
        self.rollout_ids = torch.zeros(8, max(lengths), dtype=torch.long)
        self.rollout_mask = torch.zeros(8, max(lengths), dtype=torch.long)
        for i, n in enumerate(lengths):
            self.rollout_ids[i, -n:] = torch.randint(3, vocab, (n,), generator=g)
            self.rollout_mask[i, -n:] = 1
        self.rollout_ids, self.rollout_mask = self.rollout_ids.to(device), self.rollout_mask.to(device)

    def loss(self):
        import torch
        import torch.nn.functional as F

        if self.is_ours:
            out = self.model(input_ids=self.ids, labels=self.ids)
            return out.loss + out.aux_loss
        # the peer's trainers: logits, per-token CE, mean over the loss mask (all ones here), plus the aux loss
        out = self.model(input_ids=self.ids[:, :-1])
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), self.ids[:, 1:].reshape(-1),
                             reduction="none")
        mask = torch.ones_like(ce)
        return (ce * mask).sum() / mask.sum() + out.aux_loss

    def train(self):
        self.model.train()
        with self.amp():
            loss = self.loss()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=False)  # grads stay allocated: part of the fixed memory, not activations

    def prefill(self):
        import torch

        self.model.eval()
        with torch.no_grad(), self.amp():
            self.model(input_ids=self.ids, use_cache=True)

    def _generate(self, ids, **kw):
        import torch

        self.model.eval()
        n = self.args.decode_tokens
        if self.is_ours and self.args.compile_decode:
            kw["compile_decode"] = True
        with torch.no_grad(), self.amp():
            out = self.model.generate(ids, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **kw)
        assert out.shape[1] == ids.shape[1] + n, out.shape
        return out

    def decode(self):
        self._generate(self.prompt, do_sample=False)

    def rollout(self):
        import torch

        torch.manual_seed(0)
        self._generate(self.rollout_ids, attention_mask=self.rollout_mask, do_sample=True, temperature=0.8,
                       top_k=0, top_p=1.0)

    def memory(self):
        """Activation bytes of one training step (see the module docstring)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self.train()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base
        from torch.profiler import ProfilerActivity, profile

        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.train()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
        return peak


# ------------------------------------------------------------------------------------------------------------------
# Building, checking, timing


def build_rows(spec, args, device, mode_dtype, peer_dtype, peer_module):
    import torch

    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from trainer.trainer_utils import build_optimizer, enable_grad_checkpointing

    fields = parse_config(spec)
    torch.manual_seed(0)
    ours = MiniMindForCausalLM(MiniMindConfig(**fields)).to(device)
    if args.grad_checkpointing:
        enable_grad_checkpointing(ours)  # the trainers' --grad_checkpointing 1
    # the trainers' optimizer (trainer_utils.build_optimizer) for ours, MiniMind's plain AdamW for the peer; lr 0:
    # the same work every repeat (MoE routing included) for every row, AdamW still does all of its arithmetic
    opt = build_optimizer(ours, lr=0.0, device=device)
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    rows = [Row(f"ours {names[mode_dtype]}", ours, opt, mode_dtype, device, args, True)]
    if mode_dtype != torch.float32:
        rows.append(Row("ours fp32", ours, opt, torch.float32, device, args, True))
    if peer_module is not None and not fields["headwise_attn_output_gate"]:
        peer_fields = {k: v for k, v in fields.items() if k != "headwise_attn_output_gate"}
        peer = peer_module.MiniMindForCausalLM(peer_module.MiniMindConfig(**peer_fields)).to(device)
        peer.load_state_dict(ours.state_dict(), strict=True)
        repair_peer_rope(peer_module, peer)
        check_same_function(ours, peer, device)
        peer_opt = torch.optim.AdamW(peer.parameters(), lr=0.0)
        rows.append(Row(f"MiniMind {names[peer_dtype]}", peer, peer_opt, peer_dtype, device, args, False))
    params = sum(p.numel() for p in ours.parameters())
    return rows, params


def check_same_function(ours, peer, device):
    """Same weights must give the same logits (fp32, eval), else the timings compare different models."""
    import torch

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, ours.config.vocab_size, (2, 24), generator=g).to(device)
    ours.eval()
    peer.eval()
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits.float(), peer(input_ids=ids).logits.float()
    diff = (a - b).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"the peer's logits differ from ours by {diff:.3g} with the same weights; not comparable")
    return diff


def timed(fn, device, clock):
    import torch

    now = time.process_time if clock == "cpu" else time.perf_counter
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = now()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return now() - t0


def run_config(spec, args, device, mode_dtype, peer_dtype, peer_module, workloads):
    rows, params = build_rows(spec, args, device, mode_dtype, peer_dtype, peer_module)
    results = {r.label: {} for r in rows}
    for w in workloads:
        if w == "memory":
            for r in rows:
                r.train()  # warm: AdamW state and .grad buffers exist before the measured step
                results[r.label]["memory"] = [r.memory() / 2**20]
            continue
        times = {r.label: [] for r in rows}
        for i in range(args.warmup + args.repeats):
            for r in rows:
                elapsed = timed(getattr(r, w), device, args.clock)
                if i >= args.warmup:
                    times[r.label].append(elapsed)
        for r in rows:
            t = times[r.label]
            if w == "train":
                results[r.label][w] = [args.batch_size * args.seq_len / s for s in t]
            elif w == "prefill":
                results[r.label][w] = [s * 1e3 for s in t]
            elif w == "decode":
                results[r.label][w] = [args.decode_tokens / s for s in t]
            else:
                results[r.label][w] = [8 * args.decode_tokens / s for s in t]
    del rows
    gc.collect()
    return results, params


HEADERS = {"train": "train tok/s", "prefill": "prefill ms", "decode": "decode tok/s (b1)",
           "rollout": "rollout tok/s (b8 padded)", "memory": "activation MiB"}


def fmt(values):
    med = statistics.median(values)
    digits = 0 if med >= 100 else 1
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def ratio(ours, peer, workload):
    """Speed ratios as speed-ups (ours faster > 1x); memory as ours / peer (less memory < 1x)."""
    a, b = statistics.median(ours), statistics.median(peer)
    if a <= 0 or b <= 0:
        return "-"
    return f"{(b / a if workload == 'prefill' else a / b):.2f}x"


def main(argv=None):
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # each config's table shows (or reaches a log) when it is done
    import torch

    from trainer.trainer_utils import resolve_dtype

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.clock == "cpu" and device.type == "cuda":
        raise SystemExit("--clock cpu measures host CPU time; use --clock wall with --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = set(workloads) - set(WORKLOADS)
    if bad:
        raise SystemExit(f"--workloads: unknown {sorted(bad)}; choose from {','.join(WORKLOADS)}")
    mode_dtype = resolve_dtype(args.dtype, device)
    peer_dtype = mode_dtype if device.type == "cuda" else torch.float32
    peer_module = load_peer(args.peer) if args.peer else None
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, train/prefill batch "
          f"{args.batch_size} x {args.seq_len}, decode b1 {args.decode_prompt}+{args.decode_tokens}, rollout b8 "
          f"16..64+{args.decode_tokens}, median (min-max) of {args.repeats}, warmup {args.warmup}"
          + f", {args.clock} clock" + (", compiled decode" if args.compile_decode else "")
          + (", ours with gradient checkpointing" if args.grad_checkpointing else ""))
    for spec in [s.strip() for s in args.configs.split(",") if s.strip()]:
        results, params = run_config(spec, args, device, mode_dtype, peer_dtype, peer_module, workloads)
        labels = list(results)
        print(f"\n### {spec} ({params / 1e6:.2f}M params)\n")
        print("| row | " + " | ".join(HEADERS[w] for w in workloads) + " |")
        print("|---|" + "---:|" * len(workloads))
        for label in labels:
            print(f"| {label} | " + " | ".join(fmt(results[label][w]) for w in workloads) + " |")
        peers = [lb for lb in labels if lb.startswith("MiniMind")]
        for label in [lb for lb in labels if lb.startswith("ours")] if peers else []:
            cells = [ratio(results[label][w], results[peers[0]][w], w) for w in workloads]
            print(f"| {label} / {peers[0]} | " + " | ".join(cells) + " |")
    print("\nratio rows: speed-ups of ours over the peer (prefill: peer ms / ours ms); memory: ours / peer")


if __name__ == "__main__":
    main()
