"""MiniMind decoder-only LM: config, dense/MoE blocks, optional head-wise gated attention, HF integration.

State-dict keys and shapes equal MiniMind's (jingyaogong/minimind @ 42a4e8c) when the attention output gate is off,
so MiniMind `.pth` weights load with strict=True. Used by every trainer script:

    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=512, num_hidden_layers=8, use_moe=False))

Quick self-check (prints parameter counts of the named sizes):

    python model/model_minimind.py
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as hf_init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast


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


# --------------------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (bf16 mean of squares loses too much), return the input dtype like MiniMind
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed


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

    def forward(self, x, cos, sin, mask, past_key_values):
        B, T, _ = x.shape
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

        dropout_p = self.dropout if self.training else 0.0
        if isinstance(mask, str):
            # "causal": fresh sequence, no left padding; "full": one query over an unpadded cache
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=(mask == "causal"), dropout_p=dropout_p, enable_gqa=self.n_rep > 1
            )
        else:
            # explicit masks: expand KV heads ourselves, fused GQA kernels on CUDA only take mask=None
            if self.n_rep > 1:
                k = k.repeat_interleave(self.n_rep, dim=1)
                v = v.repeat_interleave(self.n_rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = out.transpose(1, 2)
        if gate is not None:
            out = out * torch.sigmoid(gate).to(out.dtype)
        out = self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim))
        if dropout_p > 0:
            out = F.dropout(out, dropout_p, True)
        return out


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.dropout = config.dropout

    def forward(self, x):
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


class MoEFeedForward(nn.Module):
    """Routed top-k SwiGLU experts plus always-on shared experts.

    Dispatch sorts the (token, slot) pairs by expert id and runs each expert once on its contiguous slice. Train and
    eval use this same path; an expert that got no tokens still runs on an empty slice, so its weights are in the
    autograd graph with zero gradient (DDP without find_unused_parameters works).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_routed_experts)])
        self.gate = MoEGate(config)
        self.shared_experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_shared_experts)])

    def forward(self, x, token_mask=None):
        B, T, H = x.shape
        k = self.gate.top_k
        flat = x.reshape(-1, H)
        scores, topw, topi = self.gate(flat)
        slot_expert = topi.reshape(-1)  # [N*k], slot s belongs to token s // k
        order = torch.argsort(slot_expert, stable=True)
        counts = torch.bincount(slot_expert, minlength=self.gate.n_experts).tolist()
        routed_in = flat[order // k]
        routed_out = torch.cat(
            [expert(chunk) for expert, chunk in zip(self.experts, routed_in.split(counts))], dim=0
        )
        # back to (token, slot) order with a gather (deterministic, unlike index_add on CUDA)
        routed_out = routed_out[torch.argsort(order)].view(-1, k, H)
        y = (routed_out * topw.to(routed_out.dtype).unsqueeze(-1)).sum(dim=1).view(B, T, H)
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


class MiniMindBlock(nn.Module):
    def __init__(self, layer_idx, config):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, cos, sin, mask, past_key_values, token_mask):
        # out-of-place adds keep the residual in the embedding dtype under autocast (MiniMind's += made it bf16)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, past_key_values)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoEFeedForward):
            m, aux = self.mlp(h, token_mask)
        else:
            m, aux = self.mlp(h), None
        return x + m, aux


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
        (MiniMind's tables came back zero), and positions are per row anyway for left padding.
        """
        inv_freq, attention_factor = rope_inv_freq(self.config, device=position_ids.device)
        freqs = position_ids.float()[..., None] * inv_freq  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if attention_factor != 1.0:
            cos, sin = cos * attention_factor, sin * attention_factor
        return cos[:, None], sin[:, None]

    def build_mask(self, attention_mask, past_len, q_len, device):
        """Mask for SDPA: 'causal', 'full', or a bool tensor [B, 1, q_len, past_len + q_len] (True = attend)."""
        total = past_len + q_len
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask
        padded = False
        if attention_mask is not None:
            if attention_mask.shape[-1] != total:
                raise ValueError(
                    f"attention_mask has length {attention_mask.shape[-1]} but the cache holds {past_len} tokens and "
                    f"the input {q_len}; expected a mask over all {total} positions"
                )
            padded = not bool(attention_mask.all())
        # flash_attn=False (MiniMind's switch) always takes the explicit-mask path
        if self.config.flash_attn and not padded:
            if past_len == 0:
                return "causal" if q_len > 1 else "full"
            if q_len == 1:
                return "full"
        if self.config.flash_attn and padded and past_len == 0 and q_len > 1:
            # right padding only (no 0 -> 1 step along a row): pads sit after every real token, causal is exact
            if not bool((attention_mask.diff(dim=-1) > 0).any()):
                return "causal"
        q_pos = torch.arange(past_len, total, device=device)[:, None]
        k_pos = torch.arange(total, device=device)[None, :]
        mask = (k_pos <= q_pos)[None, None]  # causal, offset by the cache length
        if padded:
            mask = mask & attention_mask.bool()[:, None, None, :]
            # a pad query would see no key at all (softmax NaN -> NaN values leak through 0-weighted V)
            mask = mask | (k_pos == q_pos)[None, None]
        return mask

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, inputs_embeds=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
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
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0

        mask2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if position_ids is None:
            if mask2d is not None:
                # left padding: each row counts positions from its first real token
                position_ids = (mask2d.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past_len, past_len + T, device=x.device)[None]
        cos, sin = self.rope(position_ids)
        mask = self.build_mask(attention_mask, past_len, T, x.device)
        token_mask = mask2d[:, -T:] if mask2d is not None else None

        aux_loss = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, aux = layer(x, cos, sin, mask, past_key_values, token_mask)
            if aux is not None:
                aux_loss = aux_loss + aux
        x = self.norm(x)
        return MiniMindModelOutput(last_hidden_state=x, past_key_values=past_key_values, aux_loss=aux_loss)


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
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
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, inputs_embeds=inputs_embeds,
        )
        h = out.last_hidden_state
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
