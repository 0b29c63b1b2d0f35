"""FLOPs per token from the config (model/flops.py) against hand counts, and the GPU peak table.

    python -m pytest tests/test_flops.py -q
"""
import pytest

from model.flops import Flops, forward_flops, lora_training_flops, matmul_params, peak_flops, training_flops
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

# hidden 64, 8 heads of 8, 2 KV heads, intermediate 64 * ceil(170/64) = 192, vocab 6400, 2 layers
H, HEADS, D, KV, I, V, L = 64, 8, 8, 2, 192, 6400, 2
ATTN = H * H + 2 * H * KV * D + H * H  # q, k, v, o
GATE = H * HEADS  # the head-wise output gate: one more q_proj output per head
FFN = 3 * H * I
LM_HEAD = H * V


def tiny(**kw):
    return MiniMindConfig(hidden_size=64, num_hidden_layers=2, **kw)


def test_dense_gated_flops_by_hand():
    c = tiny(headwise_attn_output_gate=True)
    n = L * (ATTN + GATE + FFN) + LM_HEAD
    assert n == 2 * (10752 + 36864) + 409600 == 504832
    assert matmul_params(c) == n
    f = training_flops(c)
    assert f.per_token == 6 * 504832 == 3028992
    # scores and values: 12 x layers x heads x head_dim per key position (forward 4, backward 8)
    assert f.per_token_seq == 12 * L * HEADS * D == 1536
    assert f.at(128) == 3028992 + 1536 * 128
    assert forward_flops(c) == Flops(2 * 504832, 4 * L * HEADS * D)
    assert matmul_params(tiny(headwise_attn_output_gate=False)) == n - L * GATE


def test_moe_counts_the_active_experts_router_and_shared_expert_by_hand():
    c = tiny(use_moe=True, headwise_attn_output_gate=True)  # 4 routed experts, top-2, 1 shared
    per_layer = ATTN + GATE + H * 4 + (2 + 1) * FFN  # router + 2 routed + 1 shared expert, not all four
    assert per_layer == 10752 + 256 + 110592
    assert matmul_params(c) == L * per_layer + LM_HEAD == 652800
    assert training_flops(c).per_token == 6 * 652800


@pytest.mark.parametrize("moe", [False, True])
def test_matmul_params_match_the_model_weights(moe):
    """The count equals the model's 2-D weights (tied embedding counted once, as lm_head) minus, for MoE, the routed
    experts a token does not use."""
    c = tiny(use_moe=moe, headwise_attn_output_gate=True)
    model = MiniMindForCausalLM(c)
    weights = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    unused = L * (c.n_routed_experts - c.num_experts_per_tok) * FFN if moe else 0
    assert matmul_params(c) == weights - unused


def test_lora_frozen_base_costs_forward_and_input_gradient():
    c = tiny(headwise_attn_output_gate=True)
    f = lora_training_flops(c, lora_params=1000)
    assert f == Flops(4 * 504832 + 6 * 1000, 1536)


def test_peak_table_by_device_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe") == 756.5e12
    assert peak_flops("NVIDIA H200") == 989.4e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA GeForce RTX 4090") == 165.2e12
    assert peak_flops("NVIDIA GeForce RTX 3090") == 71e12
    assert peak_flops("Tesla T4") is None
