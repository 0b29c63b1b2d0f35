"""model/model_stats.py: gate, attention-sink, activation and expert statistics against hand-computed values, with
padding and packed rows, and a model that runs exactly as before outside ModelStats.

    python -m pytest tests/test_model_stats.py -q
"""
import math

import pytest
import torch
import torch.nn.functional as F

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.model_stats import ModelStats


def tiny(gate=True, moe=True, seed=0):
    torch.manual_seed(seed)
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, use_moe=moe, headwise_attn_output_gate=gate)
    return MiniMindForCausalLM(config).eval()


def batch(seed=1):
    """Two rows of length 7: the second left-padded by 3 (pad id 0, never used as a real token here)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 6400, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def gate_rows(attn):
    """Row indices of q_proj that produce the gate scores: per KV group [n_rep queries | n_rep gates]."""
    group = attn.n_rep * attn.head_dim + attn.n_rep
    return torch.tensor([g * group + attn.n_rep * attn.head_dim + r for g in range(attn.n_kv) for r in range(attn.n_rep)])


def query_rows(attn):
    rows = set(range(attn.q_proj.weight.shape[0])) - (set(gate_rows(attn).tolist()) if attn.gated else set())
    return torch.tensor(sorted(rows))


@pytest.mark.parametrize("gate,moe", [(True, True), (False, False)])
def test_same_output_inside_and_exactly_the_same_after(gate, moe):
    model = tiny(gate, moe)
    ids, mask = batch()
    packed_pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])  # two segments in one row
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        before_packed = model(ids[:1], position_ids=packed_pos).logits
        with ModelStats(model) as st:
            inside = model(ids, attention_mask=mask).logits
            inside_packed = model(ids[:1], position_ids=packed_pos).logits
        after = model(ids, attention_mask=mask).logits
    # the probe only reads: the layers' outputs are the ordinary attention's, padded and packed
    assert torch.equal(inside, before) and torch.equal(inside_packed, before_packed)
    assert torch.equal(after, before)
    assert all(m.self_attn.stats_probe is None for m in model.model.layers)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    keys = set(st.summary())
    assert {"sink_share", "act_max", "layers/sink_share_L1", "layers/act_max_L0"} <= keys
    assert ("gate_mean" in keys and "layers/gate_sparsity_L1" in keys) == gate
    assert ("expert_load_cv" in keys and "layers/expert_load_L1_E3" in keys) == moe


def test_rows_in_chunks_give_the_same_output_and_statistics(monkeypatch):
    """The probe bounds its recomputed fp32 probabilities (PROBS_BUDGET): one batch row at a time must give the
    whole batch's statistics, padded row included."""
    import model.model_stats as ms
    model = tiny(gate=True, moe=True)
    ids, mask = batch()

    def run():
        with torch.no_grad(), ModelStats(model) as st:
            logits = model(ids, attention_mask=mask).logits
        return logits, st.summary()

    whole, whole_stats = run()
    monkeypatch.setattr(ms, "PROBS_BUDGET", 1)  # -> one row per chunk
    chunked, chunked_stats = run()
    assert torch.equal(chunked, whole)
    assert chunked_stats.keys() == whole_stats.keys()
    assert all(math.isclose(chunked_stats[k], whole_stats[k], rel_tol=1e-9, abs_tol=1e-12) for k in whole_stats)


def test_an_evaluation_with_stats_does_not_recompile_the_training_model():
    """--use_compile 1: the eval pass runs the unwrapped model inside ModelStats between compiled training steps; after
    it the compiled training forward still hits its cached graph (no new frame)."""
    from torch._dynamo.testing import CompileCounter
    model = tiny(gate=True, moe=False).train()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    ids, mask = batch()
    torch._dynamo.reset()
    try:
        for _ in range(2):
            compiled(ids, attention_mask=mask, labels=ids).loss.backward()
        warm = counter.frame_count
        model.eval()
        with torch.no_grad(), ModelStats(model) as st:
            model(ids, attention_mask=mask)
        model.train()
        compiled(ids, attention_mask=mask, labels=ids).loss.backward()
        assert warm > 0 and counter.frame_count == warm
        assert "sink_share" in st.summary()
    finally:
        torch._dynamo.reset()


def test_gate_scores_of_hand_set_weights():
    model = tiny(gate=True, moe=False)
    ids, mask = batch()
    for layer in model.model.layers:
        with torch.no_grad():
            layer.self_attn.q_proj.weight[gate_rows(layer.self_attn)] = 0
    with torch.no_grad(), ModelStats(model) as st:
        model(ids, attention_mask=mask)
    s = st.summary()
    assert s["gate_mean"] == 0.5 and s["gate_sparsity"] == 0.0  # sigmoid(0) everywhere
    assert s["layers/gate_mean_L1"] == 0.5

    # layer 0 by hand: scores = sigmoid(gate rows of q_proj(norm(embedding))) over the real tokens
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.weight[gate_rows(attn)] = torch.randn(len(gate_rows(attn)), 64) * 0.5
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        scores = torch.sigmoid(x @ attn.q_proj.weight[gate_rows(attn)].t())[mask.bool()]  # [real tokens, heads]
    with torch.no_grad(), ModelStats(model) as st:
        model(ids, attention_mask=mask)
    s = st.summary()
    assert 0.05 < (scores < 0.1).float().mean() < 0.95  # the hand case has both open and closed gates
    assert s["layers/gate_mean_L0"] == pytest.approx(scores.mean().item(), rel=1e-6)
    assert s["layers/gate_sparsity_L0"] == pytest.approx((scores < 0.1).float().mean().item(), rel=1e-6)
    assert s["gate_mean"] == pytest.approx((scores.mean().item() + 0.5) / 2, rel=1e-6)


def test_sink_share_of_uniform_attention():
    # zero queries: every visible key gets the same score, so query position t puts 1/(t+1) on the first token
    model = tiny(gate=True, moe=True)
    for layer in model.model.layers:
        with torch.no_grad():
            layer.self_attn.q_proj.weight[query_rows(layer.self_attn)] = 0
    ids, mask = batch()
    with torch.no_grad(), ModelStats(model) as st:
        model(ids, attention_mask=mask)  # rows with 7 and (left-padded) 4 real tokens
        model(ids[:1], position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]]))  # packed: segments of 3 and 4
    shares = [1 / (t + 1) for t in range(1, 7)] + [1 / (t + 1) for t in range(1, 4)] + \
             [1 / (t + 1) for t in range(1, 3)] + [1 / (t + 1) for t in range(1, 4)]  # position 0 left out
    hand = sum(shares) / len(shares)
    s = st.summary()
    assert s["sink_share"] == pytest.approx(hand, rel=1e-6)
    assert s["layers/sink_share_L0"] == pytest.approx(hand, rel=1e-6)
    assert s["layers/sink_share_L1"] == pytest.approx(hand, rel=1e-6)


def test_act_max_against_a_hand_forward():
    model = tiny(gate=True, moe=True)
    ids, mask = batch()
    with torch.no_grad():
        model.model.embed_tokens.weight[0] = 1000.0  # the pad token: would dominate if pads counted
        base = model.model
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cos, sin = base.rope(pos)
        attn_mask = base.build_mask(mask, 0, ids.shape[1], ids.device, None)
        x, hand = base.embed_tokens(ids), []
        for layer in base.layers:
            x, _ = layer(x, cos, sin, attn_mask, mask)
            hand.append(x[mask.bool()].abs().max().item())
        with ModelStats(model) as st:
            model(ids, attention_mask=mask)
    s = st.summary()
    assert hand[0] < 100  # the huge pad rows were left out
    assert [s["layers/act_max_L0"], s["layers/act_max_L1"]] == pytest.approx(hand, rel=1e-5)
    assert s["act_max"] == pytest.approx(max(hand), rel=1e-5)


def test_expert_loads_of_a_hand_routed_model():
    """Residual = embedding at every layer (attention and FFNs output 0); coordinate 0 of the embedding is +1 for
    real tokens and -1 for the pad, and the router scores a_e * h_0: real tokens go to experts 2 and 3, pads to 0
    and 1. Loads over real tokens: [0, 0, 0.5, 0.5] in each layer, CV 1."""
    model = tiny(gate=True, moe=True)
    ids, mask = batch()
    a = torch.tensor([-0.1, -0.2, 0.2, 0.1])  # h_0 is about 8: logits of order 1, a router far from one-hot
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 1.0
        emb[0, 0] = -1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            for ffn in [*layer.mlp.experts, *layer.mlp.shared_experts]:
                ffn.down_proj.weight.zero_()
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[:, 0] = a
        h = F.rms_norm(model.model.embed_tokens(ids), (64,), eps=1e-5)  # post-attention norm, weight 1
        p = (h[..., 0:1] * a).softmax(-1)[mask.bool()]
        hand_entropy = -(p * p.log()).sum(-1).mean().item()
        with ModelStats(model) as st:
            model(ids, attention_mask=mask)
            model(ids[1:, 3:])  # the padded row's real tokens once more, unpadded
    rows = st.per_layer()
    for r in rows:
        assert sum(r["expert_load"]) == pytest.approx(1.0)
        assert r["expert_load"] == pytest.approx([0.0, 0.0, 0.5, 0.5])
        assert r["expert_load_cv"] == pytest.approx(1.0)
    s = st.summary()
    assert s["layers/expert_load_L1_E2"] == pytest.approx(0.5) and s["expert_load_cv"] == pytest.approx(1.0)
    n_a, n_b = mask.sum().item(), 4  # the second forward's tokens weigh in like the first's
    p_b = (F.rms_norm(model.model.embed_tokens(ids[1:, 3:]), (64,), eps=1e-5)[..., 0:1] * a).softmax(-1)
    ent_b = -(p_b * p_b.log()).sum(-1).mean().item()
    assert s["expert_entropy"] == pytest.approx((hand_entropy * n_a + ent_b * n_b) / (n_a + n_b), rel=1e-6)

    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()  # uniform router: entropy ln 4
        with ModelStats(model) as st:
            model(ids, attention_mask=mask)
    assert st.summary()["expert_entropy"] == pytest.approx(math.log(4))
    assert all(sum(r["expert_load"]) == pytest.approx(1.0) for r in st.per_layer())


def test_padding_does_not_count():
    """Stats of a left-padded batch equal those of its rows run one by one without padding."""
    model = tiny(gate=True, moe=True)
    ids, mask = batch()
    with torch.no_grad():
        with ModelStats(model) as padded:
            model(ids, attention_mask=mask)
        with ModelStats(model) as alone:
            model(ids[:1])
            model(ids[1:, 3:])
    a, b = padded.summary(), alone.summary()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_refuses_what_it_cannot_measure():
    model = tiny(gate=True, moe=False)
    ids, _ = batch()
    with torch.no_grad():
        out = model(ids[:, :4], use_cache=True)
        with ModelStats(model):
            with pytest.raises(ValueError, match="KV cache"):
                model(ids[:, 4:5], past_key_values=out.past_key_values, use_cache=True)
            with pytest.raises(RuntimeError, match="already active"):
                ModelStats(model).__enter__()
    assert all(m.self_attn.stats_probe is None for m in model.model.layers)


def _rank_stats(rank, init_file, result_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = tiny(gate=True, moe=True)
    ids, mask = batch()
    with torch.no_grad(), ModelStats(model) as st:
        model(ids[rank:rank + 1], attention_mask=mask[rank:rank + 1])
    st.all_reduce()
    if rank == 0:
        torch.save(st.summary(), result_file)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_over_two_ranks_equals_one_process(tmp_path):
    torch.multiprocessing.spawn(_rank_stats, args=(str(tmp_path / "init"), str(tmp_path / "r.pt")), nprocs=2)
    reduced = torch.load(tmp_path / "r.pt", weights_only=True)
    model = tiny(gate=True, moe=True)
    ids, mask = batch()
    with torch.no_grad(), ModelStats(model) as st:
        model(ids, attention_mask=mask)
    one = st.summary()
    assert reduced.keys() == one.keys()
    for key in one:
        assert reduced[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
