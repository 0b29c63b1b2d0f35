"""Gate, attention-sink, activation and expert statistics of a MiniMind model, recorded during ordinary forwards.

    from model.model_stats import ModelStats
    model.eval()
    with torch.no_grad(), ModelStats(model) as st:
        for batch in batches:
            model(input_ids=batch.ids, attention_mask=batch.mask)
    st.all_reduce()        # sums / maxima over ranks under torch.distributed; a no-op otherwise
    st.summary()           # {"gate_mean": ..., "sink_share": ..., "layers/sink_share_L0": ..., ...}

What is measured, per layer (pad tokens, i.e. attention_mask == 0, never count):
- gate (models with the head-wise attention output gate, Qiu et al. 2025): the score sigmoid(g) of every head at
  every token; `gate_mean` and `gate_sparsity`, the share of scores below 0.1 (the paper reports sparse scores);
- attention sink: the attention probability each query puts on the first token of its sequence (the segment start
  in packed rows, the first real token under left padding), averaged over heads and query positions. Position 0
  itself is left out (it can only attend to itself: its share is 1 by construction);
- massive activations: the largest |value| of the residual stream, i.e. of each decoder layer's output;
- experts (MoE): each routed expert's share of the routed (token, slot) pairs (sums to 1 per layer), the coefficient
  of variation of those shares (population std / mean; 0 = perfectly balanced, sqrt(E - 1) = one expert takes all),
  and the mean entropy of the router's softmax in nats (ln E = uniform).
Summary scalars (no "/" in the key) pool the layers: means weight every layer equally (each layer sees the same
tokens), act_max is the maximum over layers, expert_load_cv and expert_entropy are the means of the per-layer values.
Per-layer values go under one section: layers/gate_mean_L0, layers/gate_sparsity_L0, layers/sink_share_L0,
layers/act_max_L0, layers/expert_load_L0_E3, layers/expert_load_cv_L0, layers/expert_entropy_L0.

How: inside the `with`, each attention layer's `stats_probe` is set: after its ordinary attention (whose output is
used unchanged, so losses measured inside equal those outside bit for bit) the layer hands q, k and the gate scores
to the probe, which recomputes softmax(QK^T / sqrt(d) + mask) in fp32 to read the probabilities. Forward hooks read
the decoder layers' outputs and the MoE routers; a pre-hook on the base model reads the attention mask and position
ids. On exit everything is removed: outside the `with` the model runs exactly as before. The recomputed
probabilities are held for at most PROBS_BUDGET elements at a time (batch rows in chunks).
Full forwards only (no KV cache), own attention implementations only (sdpa/eager), no dropout. Accumulators stay on
the model's device, so recording costs no host synchronisation; summary() reads them once.
"""
import inspect

import torch

from .model_minimind import OWN_ATTENTION

GATE_LOW = 0.1  # a gate score below this counts as "closed" (gate_sparsity)
PROBS_BUDGET = 1 << 26  # fp32 attention probabilities held at once by the probe (256 MiB)
# columns of the per-layer sums
GATE_SUM, GATE_LOW_N, GATE_N, SINK_SUM, SINK_N, ENT_SUM, ENT_N = range(7)


def base_model(model):
    """The decoder stack (an object with .layers) under DDP / torch.compile / CausalLM wrappers. Found by structure,
    not by class, so a transformers folder's remote-code copy of model_minimind.py works too."""
    m = model
    while hasattr(m, "module") or hasattr(m, "_orig_mod"):
        m = getattr(m, "module", None) or m._orig_mod
    if hasattr(m, "model") and hasattr(m.model, "layers"):
        m = m.model
    if not hasattr(m, "layers") or not all(hasattr(layer, "self_attn") for layer in m.layers):
        raise TypeError(f"ModelStats needs a MiniMind model, got {type(model).__name__}")
    return m


class ModelStats:
    """Context manager that records per-layer statistics of the forwards run inside it (see the module docstring)."""

    def __init__(self, model):
        self.base = base_model(model)
        self.layers = list(self.base.layers)
        first = self.layers[0].self_attn
        if not hasattr(first, "stats_probe"):
            raise TypeError("this model's code has no stats_probe (an older model_minimind.py); re-export the "
                        "transformers folder with scripts/convert_model.py")
        self.gated = bool(first.gated)
        self.n_heads = first.n_heads
        self.moe = [hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts") for layer in self.layers]
        self.n_experts = self.layers[self.moe.index(True)].mlp.gate.n_experts if any(self.moe) else 0
        device = next(self.base.parameters()).device
        L = len(self.layers)
        self.sums = torch.zeros(L, 7, dtype=torch.float64, device=device)
        self.expert_counts = torch.zeros(L, max(self.n_experts, 1), dtype=torch.float64, device=device)
        self.act = torch.full((L,), float("-inf"), dtype=torch.float64, device=device)
        self.handles = []
        self.token_ok = self.sink_idx = self.query_ok = None

    # ---------------------------------------------------------------------------------------------------- lifecycle

    @staticmethod
    def cannot_measure(model) -> str | None:
        """Why ModelStats cannot record this model (None: it can); for callers that skip statistics up front."""
        impl = getattr(base_model(model).config, "_attn_implementation", None)
        if impl not in OWN_ATTENTION:
            return (f"ModelStats computes attention itself; attn_implementation {impl!r} is not supported "
                    "(load the model with the default sdpa)")
        return None

    def __enter__(self):
        reason = self.cannot_measure(self.base)
        if reason:
            raise ValueError(reason)
        if any(layer.self_attn.stats_probe is not None for layer in self.layers):
            raise RuntimeError("ModelStats is already active on this model (nested use)")
        try:
            self.handles.append(self.base.register_forward_pre_hook(self._read_inputs, with_kwargs=True))
            for i, layer in enumerate(self.layers):
                layer.self_attn.stats_probe = self._attention
                self.handles.append(layer.register_forward_hook(self._layer_output(i)))
                if self.moe[i]:
                    self.handles.append(layer.mlp.gate.register_forward_hook(self._router(i)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc):
        self._remove()
        return False

    def _remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        for layer in self.layers:
            layer.self_attn.stats_probe = None
        self.token_ok = self.sink_idx = self.query_ok = None

    # ---------------------------------------------------------------------------------------------------- recording

    def _read_inputs(self, module, args, kwargs):
        """Which tokens are real, and for each query the index of its sequence's first token (the sink)."""
        a = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        cache = a.get("past_key_values")
        if cache is not None and int(cache.get_seq_length()) > 0:
            raise ValueError("ModelStats measures full forwards; this forward continues a KV cache")
        x = a.get("input_ids") if a.get("input_ids") is not None else a.get("inputs_embeds")
        B, T = x.shape[:2]
        mask, pos = a.get("attention_mask"), a.get("position_ids")
        if mask is not None and mask.dim() != 2:
            raise ValueError("ModelStats needs a 2-D attention_mask [batch, seq] (1 = real token) to tell pads apart")
        token_ok = mask.bool() if mask is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
        if pos is None:
            # what the model itself derives (MiniMindModel.forward): positions count from each row's first real token
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0) if mask is not None else torch.arange(T, device=x.device)
        pos = pos.expand(B, T)
        starts = token_ok & (pos == 0)  # a sequence (or a packed segment) begins here
        idx = torch.arange(T, device=x.device).expand(B, T)
        self.sink_idx = torch.where(starts, idx, -1).cummax(dim=-1).values
        self.query_ok = token_ok & ~starts & (self.sink_idx >= 0)
        self.token_ok = token_ok

    def _attention(self, attn, q, k, v, mask, gate):
        """Records the sink share (from softmax(QK^T * scale + mask) in fp32) and the gate scores. The layer's output
        is still its ordinary attention: metrics computed inside ModelStats equal those computed outside."""
        if attn.training and attn.dropout > 0:
            raise RuntimeError("ModelStats runs without attention dropout; call model.eval() first")
        B, H, T, _ = q.shape
        k = k.repeat_interleave(attn.n_rep, dim=1)  # query head h reads KV head h // n_rep
        # fp32 even under autocast: the probabilities are what gets measured. Batch rows go in chunks so the
        # [rows, H, T, T] probabilities stay under PROBS_BUDGET elements (an eval batch of long rows beside a
        # training run's resident memory must not run out of memory)
        rows = max(1, PROBS_BUDGET // (H * T * T))
        L = attn.layer_idx
        for b0 in range(0, B, rows):
            sl = slice(b0, b0 + rows)
            n = q[sl].shape[0]
            with torch.autocast(q.device.type, enabled=False):
                scores = (q[sl].float() @ k[sl].float().transpose(-1, -2)) * attn.scaling
                if isinstance(mask, str):
                    if mask == "causal":
                        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
                        scores = scores.masked_fill(~causal, float("-inf"))
                else:
                    scores = scores.masked_fill(~(mask[sl] if mask.shape[0] == B else mask), float("-inf"))
                probs = scores.softmax(dim=-1)
            sink = probs.gather(-1, self.sink_idx[sl].clamp(min=0)[:, None, :, None].expand(n, H, T, 1)).squeeze(-1)
            qok = self.query_ok[sl, None, :].to(torch.float64)
            self.sums[L, SINK_SUM] += (sink.double() * qok).sum()
            self.sums[L, SINK_N] += qok.sum() * H
            del scores, probs
        if gate is not None:
            s = torch.sigmoid(gate.detach().float()).squeeze(-1)  # [B, T, H]
            tok = self.token_ok[..., None].to(torch.float64)
            self.sums[L, GATE_SUM] += (s.double() * tok).sum()
            self.sums[L, GATE_LOW_N] += ((s < GATE_LOW).double() * tok).sum()
            self.sums[L, GATE_N] += tok.sum() * H

    def _layer_output(self, i):
        def hook(module, args, output):
            x = output[0].detach()
            self.act[i] = torch.maximum(self.act[i], x.abs().masked_fill(~self.token_ok[..., None], 0).amax().double())
        return hook

    def _router(self, i):
        def hook(module, args, output):
            scores, _, topi = output  # [N, E] softmax, [N, k] expert ids; rows are the flattened [B, T] tokens
            tok = self.token_ok.reshape(-1).to(torch.float64)
            self.expert_counts[i].index_add_(0, topi.reshape(-1), tok.repeat_interleave(topi.shape[1]))
            entropy = torch.special.entr(scores.detach().double()).sum(dim=-1)
            self.sums[i, ENT_SUM] += (entropy * tok).sum()
            self.sums[i, ENT_N] += tok.sum()
        return hook

    # ------------------------------------------------------------------------------------------------------ results

    def all_reduce(self):
        """Sum the counters and take the max of act over ranks (every rank must call it); no-op without a group."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        flat = torch.cat([self.sums.reshape(-1), self.expert_counts.reshape(-1)])
        torch.distributed.all_reduce(flat)
        self.sums.copy_(flat[:self.sums.numel()].view_as(self.sums))
        self.expert_counts.copy_(flat[self.sums.numel():].view_as(self.expert_counts))
        torch.distributed.all_reduce(self.act, op=torch.distributed.ReduceOp.MAX)

    def per_layer(self) -> list[dict]:
        """One dict per layer: gate_mean, gate_sparsity (gated models), sink_share, act_max, and for MoE layers
        expert_load (list, sums to 1), expert_load_cv, expert_entropy. A value is left out when nothing counted
        (e.g. sink_share of one-token sequences)."""
        sums, counts, act = self.sums.tolist(), self.expert_counts.tolist(), self.act.tolist()
        rows = []
        for i, s in enumerate(sums):
            row = {}
            if self.gated and s[GATE_N] > 0:
                row["gate_mean"] = s[GATE_SUM] / s[GATE_N]
                row["gate_sparsity"] = s[GATE_LOW_N] / s[GATE_N]
            if s[SINK_N] > 0:
                row["sink_share"] = s[SINK_SUM] / s[SINK_N]
            if act[i] > float("-inf"):
                row["act_max"] = act[i]
            total = sum(counts[i])
            if self.moe[i] and total > 0:
                load = [c / total for c in counts[i]]
                mean = 1 / len(load)
                row["expert_load"] = load
                row["expert_load_cv"] = (sum((x - mean) ** 2 for x in load) / len(load)) ** 0.5 / mean
                row["expert_entropy"] = s[ENT_SUM] / s[ENT_N]
            rows.append(row)
        return rows

    def summary(self) -> dict[str, float]:
        """Summary scalars (keys without "/") and per-layer values under "layers/" (see the module docstring)."""
        rows = self.per_layer()
        out = {}
        for key in ("gate_mean", "gate_sparsity", "sink_share", "expert_load_cv", "expert_entropy"):
            values = [r[key] for r in rows if key in r]
            if values:
                out[key] = sum(values) / len(values)
        acts = [r["act_max"] for r in rows if "act_max" in r]
        if acts:
            out["act_max"] = max(acts)
        for i, r in enumerate(rows):
            for key, value in r.items():
                if key == "expert_load":
                    out.update({f"layers/expert_load_L{i}_E{e}": x for e, x in enumerate(value)})
                else:
                    out[f"layers/{key}_L{i}"] = value
        return out
