"""Speed/memory of MiniMindForCausalLM next to transformers' LlamaForCausalLM of the same dense shape.

Both models live in one process and every timed run alternates between them (A, B, A, B, ...), so load from other
processes on a shared machine hits both alike. Per model:
  train tok/s   forward + backward + AdamW step on random tokens (labels = inputs), median step time
  peak memory   growth during one training step over what was live before it (weights, AdamW state), max over
                the repeats. CUDA: torch.cuda.max_memory_allocated. CPU: peak RSS (VmHWM, reset through
                /proc/self/clear_refs after malloc_trim) minus RSS before the step: activations, gradients and
                optimizer temporaries as the OS sees them
  prefill ms    one no-grad forward over the whole batch with use_cache=True
  decode tok/s  HF generate, greedy, KV cache, --decode_tokens new tokens per row after a seq_len prompt:
                batch*(tokens-1) / time between the first and the last new token (a stopping criterion
                stamps each step), i.e. pure decode steps including generate's own per-step work
Mixed precision (--dtype bfloat16/float16) means fp32 weights under autocast, as the trainers run.
With --use_moe 1 the Llama row stays dense (same hidden/layers/intermediate), i.e. it is the dense reference.

    python scripts/bench_model.py --hidden_size 512 --num_hidden_layers 8 --batch_size 4 --seq_len 256 --repeats 5
"""

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MiniMind vs Llama speed/memory / 速度与显存对比")
    p.add_argument("--hidden_size", type=int, default=512, help="隐藏层维度 / hidden size")
    p.add_argument("--num_hidden_layers", type=int, default=8, help="层数 / number of layers")
    p.add_argument("--use_moe", type=int, default=0, choices=[0, 1], help="MiniMind uses MoE FFN (Llama stays dense)")
    p.add_argument("--headwise_attn_output_gate", type=int, default=0, choices=[0, 1],
                   help="head-wise attention output gate (Qiu et al. 2025) in MiniMind; Llama has none")
    p.add_argument("--batch_size", type=int, default=4, help="batch size")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per row for training and prefill")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="float32, or autocast to bfloat16/float16 over fp32 weights")
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu", help="cpu / cuda / cuda:N")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before each measurement")
    p.add_argument("--decode_tokens", type=int, default=32, help="new tokens per row in the decode measurement")
    p.add_argument("--compile", type=int, default=0, choices=[0, 1], help="torch.compile the training forward")
    return p.parse_args(argv)


def _cuda_available():
    import torch

    return torch.cuda.is_available()


def build(name, args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

    torch.manual_seed(0)
    cfg = MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                         use_moe=bool(args.use_moe), headwise_attn_output_gate=bool(args.headwise_attn_output_gate))
    if name == "minimind":
        return MiniMindForCausalLM(cfg)
    llama = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM._from_config(llama, attn_implementation="sdpa")


def rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


class Runner:
    """One model with its optimizer and the three workloads as zero-argument callables."""

    def __init__(self, name, args, device, amp):
        import torch

        self.model = build(name, args).to(device)
        self.params = sum(p.numel() for p in self.model.parameters())
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, self.model.config.vocab_size, (args.batch_size, args.seq_len), generator=g)
        self.ids = self.ids.to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "float16")
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.amp, self.new_tokens = amp, args.decode_tokens

    def train_step(self):
        self.model.train()
        with self.amp():
            out = self.forward(input_ids=self.ids, labels=self.ids)
            aux = getattr(out, "aux_loss", None)
            loss = out.loss + (aux if aux is not None else 0)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)

    def prefill(self):
        import torch

        self.model.eval()
        with torch.no_grad(), self.amp():
            self.model(input_ids=self.ids, use_cache=True)

    def generate(self):
        """Returns the seconds spent in decode steps (after the first new token), timed inside generate."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Clock(StoppingCriteria):
            # generate calls this once per new token; never asks to stop
            def __init__(self):
                self.stamps = []

            def __call__(self, input_ids, scores, **kwargs):
                self.stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        clock = Clock()
        self.model.eval()
        n = self.new_tokens
        with torch.no_grad(), self.amp():
            out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=2,
                                      stopping_criteria=StoppingCriteriaList([clock]))
        assert out.shape[1] == self.ids.shape[1] + n and len(clock.stamps) == n
        return clock.stamps[-1] - clock.stamps[0]


def run_all(args):
    """Times every workload for both models, alternating A/B runs so that load from other processes hits both."""
    import ctypes
    import torch

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    libc = None if cuda else ctypes.CDLL("libc.so.6")
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    runners = {name: Runner(name, args, device, amp) for name in ["minimind", "llama"]}

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def once(fn, track_memory=False):
        if track_memory:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            else:
                libc.malloc_trim(0)  # hand freed blocks back so the RSS baseline is what is live
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM (peak RSS) to the current RSS
                base = rss_bytes("VmRSS")
        sync()
        t0 = time.perf_counter()
        inner = fn()
        sync()
        elapsed = time.perf_counter() - t0 if inner is None else inner
        peak = None
        if track_memory:
            peak = (torch.cuda.max_memory_allocated(device) if cuda else rss_bytes("VmHWM")) - base
        return elapsed, peak

    results = {name: dict(params=r.params) for name, r in runners.items()}
    for workload in ["train_step", "prefill", "generate"]:
        times = {name: [] for name in runners}
        peaks = {name: [] for name in runners}
        for i in range(args.warmup + args.repeats):
            for name, r in runners.items():
                elapsed, peak = once(getattr(r, workload), track_memory=workload == "train_step")
                if i >= args.warmup:
                    times[name].append(elapsed)
                    peaks[name].append(peak)
        for name in runners:
            results[name][workload] = statistics.median(times[name])
            if workload == "train_step":
                results[name]["peak_mib"] = max(peaks[name]) / 2**20
    for r in results.values():
        r["train_tps"] = args.batch_size * args.seq_len / r["train_step"]
        r["prefill_ms"] = r["prefill"] * 1e3
        r["decode_tps"] = args.batch_size * (args.decode_tokens - 1) / r["generate"]
    return results


def main():
    args = parse_args()
    results = run_all(args)
    mem_what = "CUDA max_memory_allocated" if args.device.startswith("cuda") else "CPU peak RSS growth"
    ours = "MiniMind" + (" MoE" if args.use_moe else "") + (" +gate" if args.headwise_attn_output_gate else "")
    peer = "Llama (HF, sdpa)" + (" dense" if args.use_moe else "")
    print(f"\nhidden {args.hidden_size} x {args.num_hidden_layers} layers, "
          f"batch {args.batch_size} x seq {args.seq_len}, {args.dtype}, {args.device}, "
          f"median of {args.repeats}" + (", compiled" if args.compile else ""))
    print(f"\n| model | params | train tok/s | peak mem MiB ({mem_what}, train step) | prefill ms | decode tok/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in [(ours, results["minimind"]), (peer, results["llama"])]:
        print(f"| {label} | {r['params'] / 1e6:.2f}M | {r['train_tps']:.0f} | {r['peak_mib']:.0f} | "
              f"{r['prefill_ms']:.1f} | {r['decode_tps']:.1f} |")
    if args.use_moe:
        print("\nLlama has no MoE: its row is the dense model of the same hidden size and depth.")


if __name__ == "__main__":
    main()
