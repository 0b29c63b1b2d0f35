"""FLOPs per token of a MiniMind config, and the bf16 dense peak of common GPUs, for the trainers' MFU.

    from model.flops import training_flops, peak_flops
    f = training_flops(config)               # Flops(per_token, per_token_seq)
    f.at(340)                                # training FLOPs of one token in a row of 340 tokens
    peak_flops(torch.cuda.get_device_name()) # FLOP/s, or None for a device not in the table

Convention (nanochat's, from Kaplan et al. 2020 / the PaLM paper's MFU appendix):
- matmul FLOPs: a token costs 2 FLOPs per weight it is multiplied with in the forward pass, 4 more in the backward
  (gradient of the input and of the weight): 6 x N, where N counts the matmul weights a token actually uses: q_proj
  (widened by one gate score per head when headwise_attn_output_gate is on), k/v/o_proj, the SwiGLU FFN, or for MoE
  the router, the top-k routed experts and the shared experts (not all experts), and lm_head. The embedding lookup is
  no matmul and is left out (lm_head is counted even though its weight is tied to the embedding). Norms, RoPE,
  softmax and the activation are left out (a few percent at these sizes).
- attention scores and values: per layer, query head and key position, q.k and p.v take 2 x head_dim FLOPs each:
  4 x heads x head_dim x seq per token forward, 12 with the backward. `seq` is the row width the kernel computes over;
  causal masking is not halved (nanochat's convention: MFU then compares with what a dense kernel does).
- Frozen weights (LoRA's base, DPO's reference, a distillation teacher): the forward only (2N), plus the input
  gradient (another 2N) where a backward passes through them (LoRA's base); see lora_training_flops.
Test: python -m pytest tests/test_flops.py -q
"""
from __future__ import annotations

from dataclasses import dataclass

# bf16 dense tensor-core peaks (no sparsity, fp32 accumulation as torch uses), TFLOP/s, from the vendors' data
# sheets; matched against torch.cuda.get_device_name() in this order (first substring found wins).
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.5), ("H200", 989.4),
    ("H100 NVL", 835.5), ("H100 PCIe", 756.5), ("H100", 989.4),
    ("A100", 312.0),
    ("RTX 4090", 165.2), ("RTX 3090", 71.0),
)


@dataclass(frozen=True)
class Flops:
    """FLOPs of one token in a row of `seq` positions: per_token + per_token_seq * seq (both parts are linear in the
    number of tokens, so a batch's total is per_token x tokens + per_token_seq x sum over tokens of their row width)."""
    per_token: float
    per_token_seq: float

    def at(self, seq: float) -> float:
        return self.per_token + self.per_token_seq * seq

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.per_token + other.per_token, self.per_token_seq + other.per_token_seq)


def matmul_params(config) -> int:
    """Matmul weights one token uses in a forward pass (MoE: router + top-k routed + shared experts; lm_head in,
    embedding lookup out)."""
    h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d = h // heads
    q_out = heads * d + (heads if getattr(config, "headwise_attn_output_gate", False) else 0)
    attn = h * q_out + 2 * h * kv * d + heads * d * h
    ffn = 3 * h * config.intermediate_size
    if getattr(config, "use_moe", False):
        mlp = h * config.n_routed_experts + (config.num_experts_per_tok + config.n_shared_experts) * ffn
    else:
        mlp = ffn
    return config.num_hidden_layers * (attn + mlp) + h * config.vocab_size


def attention_flops_per_token_seq(config) -> int:
    """Forward FLOPs of attention scores and values per token per key position: 4 x layers x heads x head_dim."""
    return 4 * config.num_hidden_layers * config.hidden_size


def forward_flops(config) -> Flops:
    """A forward pass (frozen reference model, teacher): 2N + 4 L H d seq per token."""
    return Flops(2 * matmul_params(config), attention_flops_per_token_seq(config))


def training_flops(config) -> Flops:
    """Forward + backward of a fully trained model: 6N + 12 L H d seq per token."""
    return Flops(6 * matmul_params(config), 3 * attention_flops_per_token_seq(config))


def lora_training_flops(config, lora_params: int) -> Flops:
    """LoRA: the frozen base runs forward and the input gradient of its backward (4N, no weight gradients), the
    adapters train fully (6 x their parameters); attention needs both gradients of q.k and p.v as in full training
    (the adapters sit below it), 12 L H d seq."""
    return Flops(4 * matmul_params(config) + 6 * lora_params, 3 * attention_flops_per_token_seq(config))


def peak_flops(device_name: str) -> float | None:
    """bf16 dense peak FLOP/s of a GPU by its torch.cuda.get_device_name(), None when it is not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None
