"""MiniMind decoder-only LM: config, dense/MoE blocks, optional head-wise gated attention, HF integration.

State-dict keys and shapes equal MiniMind's (jingyaogong/minimind @ 42a4e8c) when the attention output gate is off,
so MiniMind `.pth` weights load with strict=True. Used by every trainer script:

    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=512, num_hidden_layers=8, use_moe=False))

Speed and memory (docs/notes_model.md has the measurements):
- training: MoE experts run as one autograd function over tokens sorted by expert (grouped GEMM on CUDA bf16, no
  host sync; torch.compile traces it without graph breaks), SwiGLU and RMSNorm keep half of their activations and
  recompute the rest, forward(labels=...) in train mode computes the loss chunk by chunk without [B, T, vocab]
  logits, packed rows (position_ids restarting at 0) attend within their segment, model.gradient_checkpointing_enable()
  recomputes each decoder layer;
- generation: model.generate() runs MiniMind's own decode loop over a preallocated KV buffer (transformers' own loop
  for anything it does not cover; model/fast_generate.py, which overrides transformers' private
  GenerationMixin._sample), and grouped KV heads are never repeated.

Quick self-check (prints parameter counts of the named sizes):

    python -m model.model_minimind
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as hf_init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# relative: a transformers-format export copies this module beside model_minimind.py (trust_remote_code)
from .fast_generate import FastGenerationMixin


# attn_implementation values served by attend() below (transformers' default is "sdpa"; None: a bare Attention
# module outside a model). Any other value is a function from transformers' attention registry, e.g. vLLM's "vllm"
# (docs/deploy.md), which gets transformers' arguments and manages masking itself.
OWN_ATTENTION = (None, "sdpa", "eager")

# MiniMind's YaRN settings for inference_rope_scaling (reference §5.5): 16x over 2048 trained positions
YARN = dict(beta_fast=32, beta_slow=1, factor=16, original_max_position_embeddings=2048, attention_factor=1.0,
            type="yarn")


class MiniMindConfig(PretrainedConfig):
    """Fields and defaults of MiniMind (reference §5.1) plus `headwise_attn_output_gate`.

    Unknown keyword arguments (the scripts pass e.g. `max_seq_len`) are stored as attributes.
    `rope_scaling` is derived from `inference_rope_scaling` (YaRN, factor 16 over 2048 positions).
    """

    model_type = "minimind"

    dropout: float = 0.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    hidden_act: str = "silu"
    hidden_size: int = 512
    intermediate_size: int | None = None
    max_position_embeddings: int = 32768
    num_attention_heads: int = 8
    num_hidden_layers: int = 8
    num_key_value_heads: int = 2
    vocab_size: int = 6400
    rms_norm_eps: float = 1e-05
    rope_theta: float = 1000000.0
    inference_rope_scaling: bool = False
    flash_attn: bool = True
    use_moe: bool = False
    num_experts_per_tok: int = 2
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.01
    seq_aux: bool = True
    norm_topk_prob: bool = True
    headwise_attn_output_gate: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        # rope_scaling is derived state; a value in a saved config.json must not override inference_rope_scaling
        kwargs.pop("rope_scaling", None)
        kwargs.pop("rope_parameters", None)
        if self.intermediate_size is None:
            self.intermediate_size = 64 * ((int(self.hidden_size * 8 / 3) + 63) // 64)
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_attention_heads {self.num_attention_heads}, "
                f"which must be divisible by num_key_value_heads {self.num_key_value_heads}"
            )
        if self.scoring_func != "softmax":
            raise ValueError(f"scoring_func {self.scoring_func!r} is not supported; expected 'softmax'")
        # PretrainedConfig.rope_scaling is a read-only view of rope_parameters in transformers 5
        self.rope_parameters = dict(YARN) if self.inference_rope_scaling else None


# Config fields that decide the state_dict layout, and the command-line flag that sets each (error messages name it).
ARCH_FLAGS = {"hidden_size": "--hidden_size", "num_hidden_layers": "--num_hidden_layers", "use_moe": "--use_moe",
              "headwise_attn_output_gate": "--headwise_attn_output_gate"}


# --------------------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNormFunction(torch.autograd.Function):
    """weight * rms_norm(x) that keeps only x and the per-row 1/rms for backward (autograd would also keep the
    normalised x for the weight gradient: one more [tokens, hidden] tensor per norm, two per layer)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        n = x.float() * rstd
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy.float() * n.to(x.dtype).float()).reshape(-1, n.shape[-1]).sum(dim=0).to(weight.dtype)
        dn = dy.float() * weight.float()
        dx = rstd * (dn - n * (dn * n).mean(dim=-1, keepdim=True))
        return dx.to(x.dtype), dw, None


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (bf16 mean of squares loses too much), return the input dtype like MiniMind
        if torch.is_grad_enabled():
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(config, device=None):
    """RoPE inverse frequencies (fp32), YaRN-scaled when config.inference_rope_scaling (reference §5.5)."""
    dim = config.hidden_size // config.num_attention_heads
    theta = config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))
    attention_factor = 1.0
    # inference_rope_scaling is the switch (scripts may flip it on a loaded config); rope_scaling holds the numbers
    scaling = (config.rope_scaling or YARN) if config.inference_rope_scaling else None
    if scaling is not None:
        orig = scaling["original_max_position_embeddings"]
        factor = scaling["factor"]
        attention_factor = scaling.get("attention_factor", 1.0)
        if config.max_position_embeddings / orig > 1:
            def inv_dim(b):
                return dim * math.log(orig / (b * 2 * math.pi)) / (2 * math.log(theta))

            low = max(math.floor(inv_dim(scaling["beta_fast"])), 0)
            high = min(math.ceil(inv_dim(scaling["beta_slow"])), dim // 2 - 1)
            idx = torch.arange(dim // 2, device=device).float()
            ramp = ((idx - low) / max(high - low, 0.001)).clamp(0, 1)
            inv_freq = inv_freq * (1 - ramp + ramp / factor)
    return inv_freq, attention_factor


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x [B, heads, T, d]; cos/sin [B or 1, 1, T, d] in fp32
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def compute_dtype(x):
    """The dtype matmuls run in: the autocast dtype when autocast is on for x's device, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def attend(q, k, v, mask, dropout_p=0.0):
    """SDPA over grouped KV heads without copying them.

    q [B, H, Tq, d]; k, v [B, Hkv, Tk, d] (H = n_rep * Hkv, query head h reads KV head h // n_rep);
    mask: "causal" (fresh rows, no padding), "full" (every key visible) or bool [B|1, 1, Tq, Tk], True = attend.
    """
    n_rep = q.shape[1] // k.shape[1]
    B, H, Tq, d = q.shape
    if Tq == 1 and n_rep > 1:
        # decode step: the n_rep query heads of a KV head become n_rep queries of that head, so a padding mask
        # [B, 1, 1, Tk] broadcasts and no backend repeats the cache (every step, on every device); also 4-9x faster
        # than enable_gqa for one bf16 query on CPU (measured)
        out = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], n_rep, d), k, v,
                                             attn_mask=None if isinstance(mask, str) else mask, dropout_p=dropout_p)
        return out.reshape(B, H, 1, d)
    if isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask == "causal", dropout_p=dropout_p,
                                              enable_gqa=n_rep > 1)
    if n_rep == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if q.device.type == "cpu":
        # the CPU flash kernel takes an explicit mask together with enable_gqa
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=True)
    # CUDA: the fused kernels that accept a mask do not implement enable_gqa (SDPA would drop to the math path, which
    # materialises fp32 [B, H, Tq, Tk] scores), so expand KV heads for the memory-efficient kernel instead
    k = k[:, :, None].expand(-1, -1, n_rep, -1, -1).reshape(B, H, k.shape[2], d)
    v = v[:, :, None].expand(-1, -1, n_rep, -1, -1).reshape(B, H, v.shape[2], d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.n_rep = self.n_heads // self.n_kv
        self.head_dim = config.hidden_size // self.n_heads
        self.gated = bool(config.headwise_attn_output_gate)
        q_out = self.n_heads * self.head_dim + (self.n_heads if self.gated else 0)
        self.q_proj = nn.Linear(config.hidden_size, q_out, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.dropout = config.dropout
        # read by transformers' attention registry functions (and by vLLM's Transformers backend)
        self.config = config
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        self.num_key_value_groups = self.n_rep
        # set only inside model/model_stats.py's ModelStats: recomputes the attention probabilities to record them
        self.stats_probe = None

    def forward(self, x, cos, sin, mask, past_key_values=None, kv_len=None, **kwargs):
        B, T, _ = x.shape
        # cast once under autocast: q/k/v would each cast (and, training, each keep) their own bf16 copy of x
        x = x.to(compute_dtype(x))
        q = self.q_proj(x)
        gate = None
        if self.gated:
            # per KV group: [queries of its n_rep heads | gate scores of those heads] (Qiu et al. 2025, G1)
            q = q.view(B, T, self.n_kv, self.n_rep * self.head_dim + self.n_rep)
            q, gate = q.split([self.n_rep * self.head_dim, self.n_rep], dim=-1)
            gate = gate.reshape(B, T, self.n_heads, 1)
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
            # transformers' StaticCache returns its whole preallocated buffer: keep the filled prefix, unless
            # generate passed a 4-D mask over the whole buffer (its static-cache decode steps)
            whole_buffer_mask = torch.is_tensor(mask) and mask.shape[-1] == k.shape[2]
            if kv_len is not None and k.shape[2] > kv_len and not whole_buffer_mask:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]

        dropout_p = self.dropout if self.training else 0.0
        if self.config._attn_implementation in OWN_ATTENTION:
            out = attend(q, k, v, mask, dropout_p).transpose(1, 2)
            if self.stats_probe is not None:  # records what the layer attends to; the output stays attend()'s
                self.stats_probe(self, q, k, v, mask, gate)
        else:
            # a registry backend: `mask` is whatever the caller passed (the model builds none for it), kwargs are
            # the backend's own (vLLM's KV cache handles); it returns [B, T, H, d] or [B*T, H*d]
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
            out, _ = attention_interface(self, q, k, v, mask, dropout=dropout_p, scaling=self.scaling, **kwargs)
            out = out.reshape(B, T, self.n_heads, self.head_dim)
        if gate is not None:
            # outside the attention function, so every backend gets the gate: per head, before o_proj
            out = out * torch.sigmoid(gate).to(out.dtype)
        out = self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim))
        if dropout_p > 0:
            out = F.dropout(out, dropout_p, True)
        return out


# ------------------------------------------------------------------------------------------------ SwiGLU experts


def grouped_mm_ok(x, dtype):
    """torch's grouped GEMM (one kernel for all experts, no host sync) where torch.compile also accepts it: CUDA bf16
    on sm80+. Elsewhere experts run as a loop over row slices whose bounds are read once on the host (free on CPU;
    the CPU grouped GEMM is no faster and its compile-time shape check wants bf16)."""
    return (x.device.type == "cuda" and dtype == torch.bfloat16 and hasattr(F, "grouped_mm")
            and torch.cuda.get_device_capability(x.device)[0] >= 8)


def _stack(weights, dtype):
    # [E, out, in] in the compute dtype, cast and stacked in one copy per expert
    out = torch.empty((len(weights), *weights[0].shape), dtype=dtype, device=weights[0].device)
    for e, w in enumerate(weights):
        out[e].copy_(w)
    return out


def _seg_mm(x, weights, offs, transpose):
    """x[rows of group e] @ (W_e^T if transpose else W_e), groups ending at offs (one host read of offs)."""
    bounds = [0] + offs.tolist()
    return torch.cat([x[a:b] @ (w.t() if transpose else w) for w, a, b in zip(weights, bounds[:-1], bounds[1:])])


def _seg_wgrad(dy, x, offs):
    """dy_e^T @ x_e per group -> one [out, in] weight gradient per group (zeros for an empty group)."""
    bounds = [0] + offs.tolist()
    return [dy[a:b].t() @ x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _register_seg_ops():
    """The two loops above as opaque custom ops, so torch.compile(fullgraph=True) traces the MoE without a graph
    break (their output shapes do not depend on the data). Skipped when another copy of this file (a transformers
    folder's remote code) registered them already."""
    if hasattr(torch.ops.minimind, "seg_mm"):
        return
    torch.library.custom_op("minimind::seg_mm", _seg_mm, mutates_args=(),
                            schema="(Tensor x, Tensor[] weights, Tensor offs, bool transpose) -> Tensor")
    torch.library.register_fake("minimind::seg_mm", lambda x, weights, offs, transpose: x.new_empty(
        x.shape[0], weights[0].shape[0 if transpose else 1]))
    torch.library.custom_op("minimind::seg_wgrad", _seg_wgrad, mutates_args=(),
                            schema="(Tensor dy, Tensor x, Tensor offs) -> Tensor[]")
    torch.library.register_fake("minimind::seg_wgrad", lambda dy, x, offs: [
        dy.new_empty(dy.shape[1], x.shape[1]) for _ in range(offs.shape[0])])


_register_seg_ops()


def _mm_wt(x, weights, offs, grouped):
    """x @ W_e^T on each expert's row group -> [rows, out]."""
    if len(weights) == 1:
        return x @ weights[0].t()
    if grouped:
        return F.grouped_mm(x, weights.transpose(1, 2), offs=offs)
    seg = torch.ops.minimind.seg_mm if torch.compiler.is_compiling() else _seg_mm
    return seg(x, weights, offs, True)


def _mm_w(dy, weights, offs, grouped):
    """dy @ W_e on each row group -> [rows, in] (the input gradient of x @ W_e^T)."""
    if len(weights) == 1:
        return dy @ weights[0]
    if grouped:
        return F.grouped_mm(dy, weights, offs=offs)
    seg = torch.ops.minimind.seg_mm if torch.compiler.is_compiling() else _seg_mm
    return seg(dy, weights, offs, False)


def _wgrad(dy, x, offs, grouped, n):
    """dy_e^T @ x_e per row group -> n weight gradients [out, in]."""
    if n == 1:
        return [dy.t() @ x]
    if grouped:
        return list(F.grouped_mm(dy.t(), x, offs=offs).unbind(0))
    seg = torch.ops.minimind.seg_wgrad if torch.compiler.is_compiling() else _seg_wgrad
    return list(seg(dy, x, offs))


class SwiGLUFunction(torch.autograd.Function):
    """scale * down(silu(x Wg^T) * (x Wu^T)) for one FFN or for E experts over contiguous row groups (offs = group
    ends); scale is an optional per-row factor (the MoE routing weights) or None.

    Memory: saves x, g = x Wg^T and u = x Wu^T; backward recomputes silu(g) and the product. Autograd would also keep
    silu(g) and the product (two more [rows, intermediate] tensors per FFN, the largest activations of the model)
    and, for the routing weights, the unscaled expert output. Under autocast the weights are cast to the compute
    dtype here and again in backward instead of being kept: the bf16 copies of all expert weights would otherwise
    stay alive from forward to backward.
    Expert groups run either as torch's grouped GEMM (no host sync) or as a loop over row slices whose bounds are
    read once on the host (free on CPU); both give the same numbers as per-expert nn.Linear calls.
    """

    @staticmethod
    def forward(ctx, x, scale, offs, dtype, grouped, *weights):
        n = len(weights) // 3
        ws = [_stack(weights[i * n:(i + 1) * n], dtype) if grouped else
              [w.to(dtype) for w in weights[i * n:(i + 1) * n]] for i in range(3)]
        xc = x.to(dtype)
        g = _mm_wt(xc, ws[0], offs, grouped)
        u = _mm_wt(xc, ws[1], offs, grouped)
        y = _mm_wt(F.silu(g) * u, ws[2], offs, grouped)
        if scale is not None:
            y = y * scale.to(dtype)[:, None]
        ctx.save_for_backward(xc, g, u, scale, offs, *weights)
        ctx.n, ctx.dtype, ctx.grouped, ctx.x_dtype = n, dtype, grouped, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, g, u, scale, offs, *weights = ctx.saved_tensors
        n, dtype, grouped = ctx.n, ctx.dtype, ctx.grouped
        wg, wu, wd = [_stack(weights[i * n:(i + 1) * n], dtype) if grouped else
                      [w.to(dtype) for w in weights[i * n:(i + 1) * n]] for i in range(3)]
        need_x, need_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_w = any(ctx.needs_input_grad[5:])  # False for frozen FFNs (LoRA on attention only)
        dy = dy.to(dtype)
        s = F.silu(g)
        h = s * u
        sc = scale.to(dtype)[:, None] if scale is not None else None
        d_wd = _wgrad(dy * sc if sc is not None else dy, h, offs, grouped, n) if need_w else [None] * n
        dh = _mm_w(dy, wd, offs, grouped)  # gradient of the unscaled output's input h
        d_scale = None
        if sc is not None:
            if need_scale:
                # d scale_r = <dy_r, down(h_r)> = <h_r, dy_r Wd>: no extra matmul
                d_scale = (h * dh).sum(dim=-1).to(scale.dtype)
            dh.mul_(sc)
        del h
        du = dh * s
        del s
        dg = torch.ops.aten.silu_backward(dh.mul_(u), g)  # the op autograd itself uses for silu
        del dh
        dx = (_mm_w(dg, wg, offs, grouped) + _mm_w(du, wu, offs, grouped)).to(ctx.x_dtype) if need_x else None
        d_wg = _wgrad(dg, xc, offs, grouped, n) if need_w else [None] * n
        d_wu = _wgrad(du, xc, offs, grouped, n) if need_w else [None] * n
        grads = [None if d is None else d.to(w.dtype) for d, w in zip(d_wg + d_wu + d_wd, weights)]
        return (dx, d_scale, None, None, None, *grads)


def fusable(ffns):
    """The memory-light SwiGLU path needs plain bias-free nn.Linear projections (LoRA-wrapped ones take the module
    path, so their adapters are applied)."""
    return all(type(m) is nn.Linear and m.bias is None
               for f in ffns for m in (f.gate_proj, f.up_proj, f.down_proj))


def swiglu_train(ffns, x, counts=None, scale=None):
    """Training-time SwiGLU of one FFN (counts None) or of len(ffns) experts over x's rows grouped by expert, each
    output row times scale (optional)."""
    dtype = compute_dtype(x)
    grouped = counts is not None and grouped_mm_ok(x, dtype)
    offs = counts.cumsum(0).to(torch.int32) if counts is not None else None
    weights = [f.gate_proj.weight for f in ffns] + [f.up_proj.weight for f in ffns] + \
              [f.down_proj.weight for f in ffns]
    return SwiGLUFunction.apply(x, scale, offs, dtype, grouped, *weights)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.dropout = config.dropout

    def forward(self, x):
        if torch.is_grad_enabled() and fusable([self]):
            out = swiglu_train([self], x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
        else:
            # inference: plain modules, so autocast's weight-cast cache serves every decode step
            out = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.dropout > 0 and self.training:
            out = F.dropout(out, self.dropout, True)
        return out


class MoEGate(nn.Module):
    """Softmax router; weight [n_routed_experts, hidden] like MiniMind's `mlp.gate.weight`."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x):
        # x [N, H] -> scores [N, E] fp32, top-k weights [N, k] fp32 and expert ids [N, k]
        scores = F.linear(x, self.weight).float().softmax(dim=-1)
        topw, topi = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topw = topw / (topw.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, topw, topi


def load_balance_loss(scores, topi, n_experts, top_k, alpha, seq_aux, token_mask=None):
    """MiniMind's auxiliary load-balancing loss (reference §5.4), pad tokens excluded.

    scores [B, T, E] fp32, topi [B, T, k], token_mask [B, T] (1 = real token) or None.
    seq_aux: alpha * mean_b sum_e f_be * P_be with f_be = count_be / (L_b*k/E), P_be = mean score over the sequence.
    otherwise: alpha * sum_e f_e * P_e over all tokens of the batch.
    A packed row counts as one sequence here: its statistics pool the samples packed into it.
    """
    B, T, E = scores.shape
    m = scores.new_ones(B, T) if token_mask is None else token_mask.to(scores.dtype)
    onehot = F.one_hot(topi, n_experts).to(scores.dtype).sum(dim=2) * m[..., None]  # [B, T, E] slot counts
    if seq_aux:
        length = m.sum(dim=1)  # [B]
        counts = onehot.sum(dim=1)  # [B, E]
        f = counts / (length.clamp(min=1) * top_k / n_experts)[:, None]
        p = (scores * m[..., None]).sum(dim=1) / length.clamp(min=1)[:, None]
        per_seq = (f * p).sum(dim=1)
        has_tokens = (length > 0).to(scores.dtype)
        return alpha * (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)
    n = m.sum().clamp(min=1)
    f = onehot.sum(dim=(0, 1)) / (n * top_k) * n_experts
    p = (scores * m[..., None]).sum(dim=(0, 1)) / n
    return alpha * (f * p).sum()


def dispatch_order(top_k_index, n_experts):
    """Sort the (token, slot) pairs of top_k_index [N, k] by expert id -> (order, tokens per expert, inverse): row
    order[j] // k of the input feeds sorted slot j, and sorted_output[inverse] is back in (token, slot) order."""
    slot_expert = top_k_index.reshape(-1)  # [N*k], slot s belongs to token s // k
    order = torch.argsort(slot_expert, stable=True)
    # scatter_add has a static output shape (bincount's depends on the data: a graph break)
    counts = torch.zeros(n_experts, dtype=torch.long, device=top_k_index.device).scatter_add_(
        0, slot_expert, torch.ones_like(slot_expert))
    # a gather through the inverse permutation (deterministic, unlike index_add on CUDA)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, counts, inverse


class MoEExperts(nn.ModuleList):
    """The routed experts (a ModuleList of SwiGLU FFNs: state-dict keys experts.{i}.gate_proj.weight as MiniMind's),
    callable with transformers' experts signature, which vLLM's Transformers backend replaces by its fused MoE."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """hidden_states [N, H], top_k_index [N, k] expert ids, top_k_weights [N, k] -> sum_k weight * expert(x)."""
        N, H = hidden_states.shape
        k = top_k_index.shape[1]
        order, counts, inverse = dispatch_order(top_k_index, len(self))
        routed_in = hidden_states[order // k]
        routed_out = torch.cat([expert(chunk) for expert, chunk in zip(self, routed_in.split(counts.tolist()))], dim=0)
        routed_out = routed_out[inverse].view(N, k, H)
        return (routed_out * top_k_weights.to(routed_out.dtype).unsqueeze(-1)).sum(dim=1)


class MoEFeedForward(nn.Module):
    """Routed top-k SwiGLU experts plus always-on shared experts.

    Dispatch sorts the (token, slot) pairs by expert id and runs each expert once on its contiguous slice of rows.
    Training runs all experts through SwiGLUFunction (grouped GEMM where torch has one for the device, else a loop
    over slices); inference calls self.experts(x, top_k_index, top_k_weights) (MoEExperts). Every expert runs, on an
    empty slice if it got no tokens, so its weights are in the autograd graph with zero gradient (DDP without
    find_unused_parameters works).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.experts = MoEExperts([FeedForward(config) for _ in range(config.n_routed_experts)])
        self.gate = MoEGate(config)
        self.shared_experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_shared_experts)])

    def forward(self, x, token_mask=None):
        B, T, H = x.shape
        k = self.gate.top_k
        flat = x.reshape(-1, H)
        scores, topw, topi = self.gate(flat)
        if torch.is_grad_enabled() and fusable(self.experts):
            order, counts, inverse = dispatch_order(topi, self.gate.n_experts)
            # routing weights applied inside the function, which then needs no copy of the unweighted outputs
            routed_out = swiglu_train(self.experts, flat[order // k], counts, scale=topw.reshape(-1)[order])
            y = routed_out[inverse].view(-1, k, H).sum(dim=1).view(B, T, H)
        else:
            y = self.experts(flat, topi, topw).view(B, T, H)
        for shared in self.shared_experts:
            y = y + shared(x)
        if self.training and self.config.aux_loss_alpha > 0:
            aux = load_balance_loss(
                scores.view(B, T, -1), topi.view(B, T, k), self.gate.n_experts, k,
                self.config.aux_loss_alpha, self.config.seq_aux, token_mask,
            )
        else:
            aux = None
        return y, aux


class MiniMindBlock(GradientCheckpointingLayer):
    """Pre-norm decoder layer. model.gradient_checkpointing_enable() recomputes it in backward (transformers'
    GradientCheckpointingLayer; every argument but the cache is positional so it reaches the checkpoint)."""

    def __init__(self, layer_idx, config):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, cos, sin, mask, token_mask=None, past_key_values=None, kv_len=None, **kwargs):
        # out-of-place adds keep the residual in the embedding dtype under autocast (MiniMind's += made it bf16)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, past_key_values, kv_len, **kwargs)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoEFeedForward):
            m, aux = self.mlp(h, token_mask)
        else:
            m, aux = self.mlp(h), None
        return x + m, aux


# --------------------------------------------------------------------------------------------------------------------
# Loss


def _lce_forward(hc, w, targets, chunk):
    """Sum over rows of cross_entropy(hc @ w^T, targets) and each row's logsumexp, chunk rows at a time."""
    valid = targets != -100
    safe = targets.clamp(min=0)
    lse = torch.empty(hc.shape[0], dtype=torch.float32, device=hc.device)
    total = torch.zeros((), dtype=torch.float32, device=hc.device)
    for s in range(0, hc.shape[0], chunk):
        logits = (hc[s:s + chunk] @ w.t()).float()
        lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, safe[s:s + chunk, None]).squeeze(1)
        total = total + ((lse[s:s + chunk] - picked) * valid[s:s + chunk]).sum()
    return total, lse


def _lce_backward(hc, w, targets, lse, grad, chunk, need_w):
    """(d loss / d hc, d loss / d w in fp32, or an empty tensor when need_w is False), recomputing each chunk's
    logits and turning them into softmax - onehot in place."""
    valid, safe = targets != -100, targets.clamp(min=0)
    dh = torch.empty_like(hc)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else w.new_empty(0, dtype=torch.float32)
    scale = valid.to(torch.float32) * grad
    for s in range(0, hc.shape[0], chunk):
        e = min(s + chunk, hc.shape[0])
        p = (hc[s:e] @ w.t()).float().sub_(lse[s:e, None]).exp_()
        p[torch.arange(e - s, device=p.device), safe[s:e]] -= 1.0
        p = p.mul_(scale[s:e, None]).to(hc.dtype)
        dh[s:e] = p @ w
        if need_w:
            dw += (p.t() @ hc[s:e]).float()
    return dh, dw


def _register_lce_ops():
    """The two chunk loops as opaque custom ops for torch.compile: traced inline, their trip count (rows / chunk)
    would be a guard, and every batch with a new number of rows would recompile the model's last graph."""
    if hasattr(torch.ops.minimind, "lce_forward"):
        return
    torch.library.custom_op("minimind::lce_forward", _lce_forward, mutates_args=(),
                            schema="(Tensor hc, Tensor w, Tensor targets, int chunk) -> (Tensor, Tensor)")
    torch.library.register_fake("minimind::lce_forward", lambda hc, w, targets, chunk: (
        hc.new_empty((), dtype=torch.float32), hc.new_empty(hc.shape[0], dtype=torch.float32)))
    torch.library.custom_op(
        "minimind::lce_backward", _lce_backward, mutates_args=(),
        schema="(Tensor hc, Tensor w, Tensor targets, Tensor lse, Tensor grad, int chunk, bool need_w) "
               "-> (Tensor, Tensor)")
    torch.library.register_fake("minimind::lce_backward", lambda hc, w, targets, lse, grad, chunk, need_w: (
        torch.empty_like(hc), w.new_empty(w.shape if need_w else 0, dtype=torch.float32)))


_register_lce_ops()


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Sum over rows of cross_entropy(h @ W^T, target) in fp32, computed a chunk of rows at a time.

    The [rows, vocab] logits never exist whole: forward keeps one fp32 logsumexp per row, backward recomputes each
    chunk's logits (one more lm_head matmul) and turns them into softmax - onehot in place. Logits are computed in the
    compute dtype (bf16 under autocast, as the unfused lm_head would) and reduced in fp32. Rows with target -100
    contribute nothing. Under torch.compile the loops run as the custom ops above.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, dtype, chunk):
        hc, w = h.to(dtype), weight.to(dtype)
        fwd = torch.ops.minimind.lce_forward if torch.compiler.is_compiling() else _lce_forward
        total, lse = fwd(hc, w, targets, chunk)
        ctx.save_for_backward(hc, weight, targets, lse)
        ctx.dtype, ctx.chunk, ctx.h_dtype = dtype, chunk, h.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        hc, weight, targets, lse = ctx.saved_tensors
        need_w = ctx.needs_input_grad[1]  # False when the embedding is frozen (LoRA)
        bwd = torch.ops.minimind.lce_backward if torch.compiler.is_compiling() else _lce_backward
        dh, dw = bwd(hc, weight.to(ctx.dtype), targets, lse, grad, ctx.chunk, need_w)
        return dh.to(ctx.h_dtype), dw.to(weight.dtype) if need_w else None, None, None, None


def fused_lm_loss(h, weight, labels, chunk_elems=1 << 22):
    """Mean next-token cross-entropy over labels != -100 (labels shifted by one), without materialising logits."""
    H = h.shape[-1]
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    h = h.reshape(-1, H)
    if not torch.compiler.is_compiling():
        # skip rows without a target (prompts, pads): no lm_head work at all for them (one host read of the count)
        keep = (targets != -100).nonzero().squeeze(1)
        h, targets = h[keep], targets[keep]
    count = (targets != -100).sum()
    chunk = max(1, chunk_elems // weight.shape[0])
    total = LinearCrossEntropyFunction.apply(h, weight, targets, compute_dtype(h), chunk)
    # mean over supervised tokens; a batch without any stays finite (0) instead of NaN
    return total / count.clamp(min=1)


# --------------------------------------------------------------------------------------------------------------------
# HF models


@dataclass
class MiniMindModelOutput(BaseModelOutputWithPast):
    """BaseModelOutputWithPast plus the summed MoE auxiliary loss."""

    aux_loss: torch.FloatTensor | None = None


class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = MiniMindConfig
    base_model_prefix = "model"
    _no_split_modules = ["MiniMindBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    # attention goes through transformers' registry when attn_implementation names another backend (vLLM's
    # Transformers modeling backend requires this flag)
    _supports_attention_backend = True
    supports_gradient_checkpointing = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MoEGate):
            hf_init.normal_(module.weight, mean=0.0, std=0.02)


class MiniMindModel(MiniMindPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = config.dropout
        self.layers = nn.ModuleList([MiniMindBlock(i, config) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def rope(self, position_ids):
        """cos/sin [B|1, 1, T, head_dim] in fp32, computed from the config each call.

        No buffers: transformers 5 builds models on the meta device and never restores non-persistent buffers
        (MiniMind's tables came back zero), and positions are per row anyway for left padding and packed rows.
        """
        inv_freq, attention_factor = rope_inv_freq(self.config, device=position_ids.device)
        freqs = position_ids.float()[..., None] * inv_freq  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if attention_factor != 1.0:
            cos, sin = cos * attention_factor, sin * attention_factor
        return cos[:, None], sin[:, None]

    def build_mask(self, attention_mask, past_len, q_len, device, position_ids=None):
        """Mask for SDPA: 'causal', 'full', or a bool tensor [B, 1, q_len, past_len + q_len] (True = attend).

        Packed rows (position_ids restart at 0 inside a row, fresh input only) attend causally within each segment,
        a segment being a run that starts at a position 0. The data-dependent choices (any padding, any left padding,
        any restart) are read from the device in one transfer, and only when a mask or position_ids are given.
        """
        total = past_len + q_len
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask
        if attention_mask is not None and attention_mask.shape[-1] != total:
            raise ValueError(
                f"attention_mask has length {attention_mask.shape[-1]} but the cache holds {past_len} tokens and "
                f"the input {q_len}; expected a mask over all {total} positions"
            )
        flags = []
        if attention_mask is not None:
            m = attention_mask.bool()
            # any pad; any pad followed by a real token (left or inner padding, which causal alone cannot express)
            flags += [~m.all(), (m[:, 1:] & ~m[:, :-1]).any()]
        check_packed = position_ids is not None and past_len == 0 and q_len > 1
        if check_packed:
            flags.append((position_ids[:, 1:] == 0).any())
        values = torch.stack(flags).tolist() if flags else []
        padded, left_padded = (values[0], values[1]) if attention_mask is not None else (False, False)
        packed = values[-1] if check_packed else False

        q_pos = torch.arange(past_len, total, device=device)[:, None]
        k_pos = torch.arange(total, device=device)[None, :]
        if packed:
            seg = (position_ids == 0).cumsum(dim=-1)  # [B, T]; a row's first token always starts a segment
            mask = (k_pos <= q_pos)[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
            if left_padded:
                mask = (mask & m[:, None, None, :]) | (k_pos == q_pos)[None, None]
            return mask
        # flash_attn=False (MiniMind's switch) always takes the explicit-mask path
        if self.config.flash_attn and not left_padded:
            # no padding, or right padding of fresh rows (pads sit after every real token: causal is exact for them)
            if not padded or (past_len == 0 and q_len > 1):
                if past_len == 0:
                    return "causal" if q_len > 1 else "full"
                if q_len == 1:
                    return "full"
        mask = (k_pos <= q_pos)[None, None]  # causal, offset by the cache length
        if padded:
            mask = mask & m[:, None, None, :]
            # a pad query would see no key at all (softmax NaN -> NaN values leak through 0-weighted V)
            mask = mask | (k_pos == q_pos)[None, None]
        return mask

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, inputs_embeds=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        # the other kwargs go down to the attention function (a registry backend's own arguments, e.g. vLLM's)
        return_dict = kwargs.pop("return_dict", None)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.dropout > 0 and self.training:
            x = F.dropout(x, self.dropout, True)
        B, T = x.shape[:2]

        if use_cache is None:
            use_cache = past_key_values is not None
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise TypeError(f"past_key_values must be a transformers Cache, got {type(past_key_values).__name__}")
        if not use_cache:
            past_key_values = None
        # int(): StaticCache reports its length as a tensor
        past_len = int(past_key_values.get_seq_length()) if past_key_values is not None else 0

        mask2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if self.config._attn_implementation in OWN_ATTENTION:
            mask = self.build_mask(attention_mask, past_len, T, x.device, position_ids)
        else:
            # a registry backend masks by itself (vLLM: causal within each request of its flattened batch)
            mask = attention_mask
        if position_ids is None:
            if mask2d is not None:
                # left padding: each row counts positions from its first real token
                position_ids = (mask2d.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past_len, past_len + T, device=x.device)[None]
        cos, sin = self.rope(position_ids)
        token_mask = mask2d[:, -T:] if mask2d is not None else None

        aux_loss = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, aux = layer(x, cos, sin, mask, token_mask, past_key_values=past_key_values, kv_len=past_len + T,
                           **kwargs)
            if aux is not None:
                aux_loss = aux_loss + aux
        x = self.norm(x)
        out = MiniMindModelOutput(last_hidden_state=x, past_key_values=past_key_values, aux_loss=aux_loss)
        return out if return_dict is not False else out.to_tuple()


class MiniMindForCausalLM(MiniMindPreTrainedModel, FastGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config=None):
        config = config if config is not None else MiniMindConfig()
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        # MiniMind ties unconditionally; do it here too in case a config turned tie_word_embeddings off
        self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, labels=None, logits_to_keep=0, inputs_embeds=None, **kwargs):
        """HF causal LM forward; `labels` -> mean next-token CE over labels != -100 (shifted by one inside).

        In training mode with labels the loss is computed by a chunked linear + cross-entropy that never builds the
        [B, T, vocab] logits, and `logits` is None (as Liger-style fused losses do); in eval mode logits come back
        alongside the loss.
        """
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, inputs_embeds=inputs_embeds,
        )
        h = out.last_hidden_state
        if labels is not None and self.training and type(self.lm_head) is nn.Linear:
            loss = fused_lm_loss(h, self.lm_head.weight, labels)
            return MoeCausalLMOutputWithPast(loss=loss, aux_loss=out.aux_loss, logits=None,
                                             past_key_values=out.past_key_values, hidden_states=h)
        if isinstance(logits_to_keep, int):
            kept = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            kept = h[:, logits_to_keep]
        logits = self.lm_head(kept)

        loss = None
        if labels is not None:
            if kept.shape[1] != h.shape[1]:
                raise ValueError("labels need the logits of every position; call with logits_to_keep=0")
            # shift the labels, not the logits: slicing [B, T, V] logits would copy them
            targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
            token_loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100, reduction="sum"
            )
            # mean over supervised tokens; a batch without any stays finite (0) instead of NaN
            loss = token_loss / (targets != -100).sum().clamp(min=1)
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=out.aux_loss, logits=logits, past_key_values=out.past_key_values,
            hidden_states=h,
        )


def count_params(model):
    """(total, active) parameters in millions, as MiniMind's get_model_params (reference §2).

    Active counts, for MoE, the shared part plus num_experts_per_tok routed experts per layer.
    """
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    config = model.config
    if not getattr(config, "use_moe", False):
        return total / 1e6, total / 1e6
    expert = sum(p.numel() for n, p in named.items() if "mlp.experts.0." in n)
    shared = sum(p.numel() for n, p in named.items() if "mlp.shared_experts.0." in n)
    base = total - config.n_routed_experts * expert - config.n_shared_experts * shared
    active = base + config.num_experts_per_tok * expert + config.n_shared_experts * shared
    return total / 1e6, active / 1e6


def _register():
    # exist_ok: the module may be imported twice (as a script and as model.model_minimind)
    AutoConfig.register("minimind", MiniMindConfig, exist_ok=True)
    AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)


_register()


if __name__ == "__main__":
    for name, kw in [("512x8", {}), ("512x8 MoE", {"use_moe": True}), ("768x16", dict(hidden_size=768,
                     num_hidden_layers=16)), ("640x8 MoE", dict(hidden_size=640, use_moe=True))]:
        with torch.device("meta"):
            m = MiniMindForCausalLM(MiniMindConfig(**kw))
        total, active = count_params(m)
        print(f"{name}: {total:.2f}M" + (f"-A{active:.2f}M" if m.config.use_moe else ""))
