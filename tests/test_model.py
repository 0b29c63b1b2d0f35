"""Model invariants: MiniMind-compatible sizes/keys, KV cache, padding, MoE routing and aux loss, HF integration.

    python -m pytest tests/test_model.py -q
"""
import io
import math
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.model_minimind import (  # noqa: E402
    Attention,
    MiniMindConfig,
    MiniMindForCausalLM,
    count_params,
    rope_inv_freq,
)

VOCAB = 128


def tiny_config(**kw):
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    base.update(kw)
    return MiniMindConfig(**base)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(tiny_config(**kw)).eval()


def meta_model(**kw):
    with torch.device("meta"):
        return MiniMindForCausalLM(MiniMindConfig(**kw))


def random_ids(batch, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


VARIANTS = [dict(use_moe=False, headwise_attn_output_gate=False), dict(use_moe=False, headwise_attn_output_gate=True),
            dict(use_moe=True, headwise_attn_output_gate=False), dict(use_moe=True, headwise_attn_output_gate=True)]
VARIANT_IDS = ["dense", "dense-gate", "moe", "moe-gate"]


# ---------------------------------------------------------------------------------------------- sizes and keys


def reference_state_dict_shapes(layers=8, moe=False):
    """MiniMind 512x8 state_dict as listed in the reference (§5.3), written out independently of the model code."""
    shapes = {"model.embed_tokens.weight": (6400, 512), "model.norm.weight": (512,), "lm_head.weight": (6400, 512)}
    ffn = {"gate_proj": (1408, 512), "down_proj": (512, 1408), "up_proj": (1408, 512)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (512, 512), p + "self_attn.k_proj.weight": (128, 512),
                       p + "self_attn.v_proj.weight": (128, 512), p + "self_attn.o_proj.weight": (512, 512),
                       p + "input_layernorm.weight": (512,), p + "post_attention_layernorm.weight": (512,)})
        if moe:
            shapes[p + "mlp.gate.weight"] = (4, 512)
            for name in [f"experts.{e}" for e in range(4)] + ["shared_experts.0"]:
                shapes.update({f"{p}mlp.{name}.{k}.weight": v for k, v in ffn.items()})
        else:
            shapes.update({f"{p}mlp.{k}.weight": v for k, v in ffn.items()})
    return shapes


@pytest.mark.parametrize("moe,n_keys,n_params,label", [(False, 75, 25_829_888, "25.83M"),
                                                       (True, 179, 95_052_288, "95.05M-A60.45M")])
def test_reference_sizes_keys_and_counts(moe, n_keys, n_params, label):
    model = meta_model(hidden_size=512, num_hidden_layers=8, use_moe=moe)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == reference_state_dict_shapes(moe=moe)
    assert len(shapes) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params  # tied embedding counted once
    assert model.lm_head.weight is model.model.embed_tokens.weight
    total, active = count_params(model)
    assert (f"{total:.2f}M-A{active:.2f}M" if moe else f"{total:.2f}M") == label


def test_other_named_sizes():
    assert f"{count_params(meta_model(hidden_size=768, num_hidden_layers=16))[0]:.2f}" == "104.03"
    assert f"{count_params(meta_model(hidden_size=640, use_moe=True))[0]:.2f}" == "145.03"


@pytest.mark.parametrize("kw", [dict(hidden_size=512, num_hidden_layers=8), dict(hidden_size=512, use_moe=True),
                                dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2)])
def test_gate_adds_heads_times_hidden_per_layer(kw):
    off = sum(p.numel() for p in meta_model(**kw).parameters())
    on_model = meta_model(headwise_attn_output_gate=True, **kw)
    on = sum(p.numel() for p in on_model.parameters())
    c = on_model.config
    assert on - off == c.num_hidden_layers * c.num_attention_heads * c.hidden_size
    q = on_model.model.layers[0].self_attn.q_proj.weight
    assert tuple(q.shape) == (c.hidden_size + c.num_attention_heads, c.hidden_size)


def test_config_defaults_and_extra_kwargs():
    c = MiniMindConfig(max_seq_len=340)
    assert c.max_seq_len == 340 and c.intermediate_size == 1408 and c.rope_scaling is None
    assert MiniMindConfig(hidden_size=640).intermediate_size == 1728
    assert MiniMindConfig(hidden_size=768).intermediate_size == 2048
    assert not c.headwise_attn_output_gate and not c.use_moe and c.rope_theta == 1e6
    assert MiniMindConfig(inference_rope_scaling=True).rope_scaling["factor"] == 16


# ---------------------------------------------------------------------------------------------- KV cache, padding


@pytest.mark.parametrize("kw", VARIANTS, ids=VARIANT_IDS)
def test_kv_cache_decode_equals_full_forward(kw):
    from transformers import DynamicCache

    model = tiny_model(**kw)
    ids = random_ids(2, 13)
    with torch.no_grad():
        full = model(ids).logits
        cache, steps = DynamicCache(), []
        for t in range(ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        # multi-token chunks on top of a cache (chunked prefill / speculative verification)
        cache, chunks = DynamicCache(), []
        for a, b in [(0, 4), (4, 5), (5, 11), (11, 13)]:
            chunks.append(model(ids[:, a:b], past_key_values=cache, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)
        assert cache.get_seq_length() == 13


def left_padded_batch():
    rows = [random_ids(1, 9, seed=3)[0], random_ids(1, 5, seed=4)[0], random_ids(1, 7, seed=5)[0]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return rows, ids, mask


@pytest.mark.parametrize("kw", VARIANTS, ids=VARIANT_IDS)
def test_left_padded_rows_match_rows_alone(kw):
    from transformers import DynamicCache

    model = tiny_model(**kw)
    rows, ids, mask = left_padded_batch()
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask).logits
        # the same padded batch fed as two chunks on a cache
        cache = DynamicCache()
        first = model(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache, use_cache=True).logits
        second = model(ids[:, 6:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
        chunked = torch.cat([first, second], 1)
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            torch.testing.assert_close(batch_logits[i, -len(r):], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(chunked[i, -len(r):], alone, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(batch_logits).all()


def test_left_padded_greedy_generate_matches_rows_alone():
    model = tiny_model(use_moe=True, headwise_attn_output_gate=True)
    rows, ids, mask = left_padded_batch()
    new = 6
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=new, do_sample=False, pad_token_id=0)
        assert torch.equal(out[i, ids.shape[1]:], alone[0, len(r):])


def test_position_ids_follow_attention_mask_with_cache_offset():
    # RoPE is relative, so shifted rows give the same logits; check the derived positions themselves
    from transformers import DynamicCache

    model = tiny_model()
    _, ids, mask = left_padded_batch()
    seen = []
    rope = model.model.rope
    model.model.rope = lambda pos: (seen.append(pos), rope(pos))[1]
    expected = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(ids, attention_mask=mask)
        cache = DynamicCache()
        model(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache, use_cache=True)
        model(ids[:, 6:], attention_mask=mask, past_key_values=cache, use_cache=True)
        model(ids[:, :4], past_key_values=DynamicCache(), use_cache=True)
    assert torch.equal(seen[0], expected)
    assert torch.equal(torch.cat([seen[1], seen[2]], 1), expected)
    assert torch.equal(seen[3], torch.arange(4)[None])
    assert expected[1, -1] == 4  # the 5-token row counts from its first real token


def test_right_padding_needs_no_mask():
    model = tiny_model()
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = model(ids).logits
    torch.testing.assert_close(a[1, :6], b[1, :6])
    torch.testing.assert_close(a[0], b[0])


def test_position_ids_are_used_and_rope_is_relative():
    model = tiny_model()
    ids = random_ids(1, 6)
    with torch.no_grad():
        plain = model(ids).logits
        shifted = model(ids, position_ids=torch.arange(3, 9)[None]).logits
        gapped = model(ids, position_ids=torch.tensor([[0, 1, 2, 10, 11, 12]])).logits
    torch.testing.assert_close(shifted, plain, atol=1e-5, rtol=1e-5)  # RoPE only sees relative distances
    torch.testing.assert_close(gapped[:, :3], plain[:, :3])
    assert not torch.allclose(gapped[:, 3:], plain[:, 3:], atol=1e-4)


# ---------------------------------------------------------------------------------------------- MoE


def test_moe_train_and_eval_routing_identical():
    model = tiny_model(use_moe=True)
    ids = random_ids(3, 11)
    model.train()
    train_out = model(ids)
    model.eval()
    with torch.no_grad():
        eval_out = model(ids)
    torch.testing.assert_close(train_out.logits, eval_out.logits, atol=0, rtol=0)
    assert train_out.aux_loss.dim() == 0 and train_out.aux_loss.item() > 0
    assert eval_out.aux_loss.item() == 0


def test_moe_unused_expert_still_in_graph():
    # DDP without find_unused_parameters needs a gradient on every parameter every step
    model = tiny_model(use_moe=True).train()
    for layer in model.model.layers:
        gate = layer.mlp.gate
        original = gate.forward

        def forced(x, original=original):
            scores, topw, topi = original(x)
            return scores, topw, topi % 2  # only experts 0 and 1 receive tokens
        gate.forward = forced
    ids = random_ids(2, 8)
    out = model(ids, labels=ids)
    out.loss.backward()
    for layer in model.model.layers:
        for e in (2, 3):
            for p in layer.mlp.experts[e].parameters():
                assert p.grad is not None and torch.count_nonzero(p.grad) == 0
        for p in layer.mlp.experts[0].parameters():
            assert torch.count_nonzero(p.grad) > 0


def test_aux_loss_of_left_padded_batch_ignores_pads():
    # seq_aux averages per-sequence terms, so with pads excluded it is the mean of the rows' own aux losses
    model = tiny_model(use_moe=True).train()
    rows, ids, mask = left_padded_batch()
    batch_aux = model(ids, attention_mask=mask).aux_loss
    alone = torch.stack([model(r[None]).aux_loss for r in rows]).mean()
    torch.testing.assert_close(batch_aux, alone, atol=1e-6, rtol=1e-5)
    assert abs(model(ids).aux_loss.item() - alone.item()) > 1e-5  # without the mask the pads count


def hand_aux_loss(scores, topi, n_experts, k, alpha, lengths):
    """Sequence-level aux loss from nested Python loops: alpha * mean_b sum_e f_be * P_be."""
    per_seq = []
    for b, length in enumerate(lengths):
        total = 0.0
        for e in range(n_experts):
            count = sum(int(topi[b][t][j] == e) for t in range(length) for j in range(k))
            f = count / (length * k / n_experts)
            p = sum(scores[b][t][e] for t in range(length)) / length
            total += f * p
        per_seq.append(total)
    return alpha * sum(per_seq) / len(per_seq)


def test_aux_loss_matches_hand_computation_and_ignores_pads():
    from model.model_minimind import MoEFeedForward

    cfg = tiny_config(hidden_size=4, num_attention_heads=1, num_key_value_heads=1, use_moe=True,
                      aux_loss_alpha=0.1)
    moe = MoEFeedForward(cfg).train()
    with torch.no_grad():
        moe.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0.5, -0.5, 0.5, 0]]))
    x = torch.tensor([[[2.0, 0, 0, 1], [0, 2.0, 1, 0], [0, 0, 2.0, 0]],
                      [[1.0, 0.5, 0, 0], [0.5, 0, 0, 3.0], [9.0, 3, 1, 0]]])  # no ties in the top-2
    lengths = [3, 2]  # the last token of row 1 is padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # router by hand: softmax over x . w_e, top-2 ids
    scores, topi = [], []
    for b in range(2):
        srow, irow = [], []
        for t in range(3):
            logits = [sum(x[b, t, i].item() * moe.gate.weight[e, i].item() for i in range(4)) for e in range(4)]
            z = sum(math.exp(v) for v in logits)
            probs = [math.exp(v) / z for v in logits]
            srow.append(probs)
            irow.append(sorted(range(4), key=lambda e: -probs[e])[:2])
        scores.append(srow)
        topi.append(irow)
    expected = hand_aux_loss(scores, topi, 4, 2, 0.1, lengths)
    _, aux = moe(x, token_mask=mask)
    assert aux.item() == pytest.approx(expected, rel=1e-5)
    _, aux_with_pad = moe(x)
    assert aux_with_pad.item() == pytest.approx(hand_aux_loss(scores, topi, 4, 2, 0.1, [3, 3]), rel=1e-5)
    assert abs(aux_with_pad.item() - expected) > 1e-4  # the pad token really changed the statistic
    moe.eval()
    assert moe(x)[1] is None


def test_aux_loss_summed_over_layers_and_zero_for_dense():
    model = tiny_model(use_moe=True).train()
    ids = random_ids(2, 7)
    per_layer = []
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda m, i, o: per_layer.append(o[1]))
    out = model(ids)
    torch.testing.assert_close(out.aux_loss, torch.stack(per_layer).sum())
    dense = tiny_model().train()
    aux = dense(ids).aux_loss
    assert aux.dim() == 0 and aux.item() == 0.0


# ---------------------------------------------------------------------------------------------- gate, loss, rope


def split_gated_q(weight, n_kv, n_rep, head_dim):
    """Gated q_proj rows -> (query rows in head order, gate rows in head order), per the paper's group layout."""
    w = weight.view(n_kv, n_rep * head_dim + n_rep, -1)
    return w[:, : n_rep * head_dim].reshape(n_kv * n_rep * head_dim, -1), w[:, n_rep * head_dim:].reshape(
        n_kv * n_rep, -1)


def test_gate_layout_per_head():
    torch.manual_seed(0)
    gated = Attention(tiny_config(headwise_attn_output_gate=True), 0)
    plain = Attention(tiny_config(), 0)
    q_rows, _ = split_gated_q(gated.q_proj.weight.data, 2, 2, 16)
    gate_rows = torch.zeros(4, 64)
    # input feature 0 is a constant 1, so gate_h = sigmoid(c_h): heads 0, 2, 3 pass (c=40), head 1 is closed (c=-40)
    gate_rows[:, 0] = torch.tensor([40.0, -40.0, 40.0, 40.0])
    w = torch.cat([q_rows.view(2, 32, 64), gate_rows.view(2, 2, 64)], dim=1).reshape(-1, 64)
    gated.q_proj.weight.data.copy_(w)
    for name in ["k_proj", "v_proj", "o_proj"]:
        getattr(plain, name).weight.data.copy_(getattr(gated, name).weight.data)
    plain.q_proj.weight.data.copy_(q_rows)
    plain.o_proj.weight.data[:, 16:32] = 0  # head 1's columns
    x = torch.randn(2, 5, 64)
    x[..., 0] = 1.0
    pos = torch.arange(5)[None].float()[..., None] * rope_inv_freq(tiny_config())[0]
    emb = torch.cat([pos, pos], -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    torch.testing.assert_close(gated(x, cos, sin, "causal", None), plain(x, cos, sin, "causal", None),
                               atol=1e-5, rtol=1e-5)


def test_gate_zero_halves_attention_output():
    gated = tiny_model(headwise_attn_output_gate=True)
    plain = tiny_model(seed=1)
    sd = {}
    for k, v in gated.state_dict().items():
        if k.endswith("q_proj.weight"):
            v = split_gated_q(v, 2, 2, 16)[0]
        elif k.endswith("o_proj.weight"):
            v = v * 0.5  # sigmoid(0) = 0.5 on every head
        sd[k] = v
    for layer in gated.model.layers:
        w = layer.self_attn.q_proj.weight.data.view(2, 34, 64)
        w[:, 32:] = 0
    plain.load_state_dict(sd, strict=True)
    ids = random_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(gated(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)


def test_labels_loss_equals_manual_cross_entropy():
    model = tiny_model()
    ids = random_ids(2, 10)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 7:] = -100
    out = model(ids, labels=labels)
    logits = out.logits.float()
    terms = []
    for b in range(2):
        for t in range(9):
            target = labels[b, t + 1].item()
            if target != -100:
                terms.append(-torch.log_softmax(logits[b, t], -1)[target])
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())
    assert torch.isfinite(model(ids, labels=torch.full_like(ids, -100)).loss)


def test_logits_to_keep():
    model = tiny_model()
    ids = random_ids(2, 8)
    with torch.no_grad():
        full = model(ids).logits
        torch.testing.assert_close(model(ids, logits_to_keep=1).logits, full[:, -1:])
        torch.testing.assert_close(model(ids, logits_to_keep=torch.tensor([0, 5])).logits, full[:, [0, 5]])


def test_yarn_scales_frequencies_like_reference():
    plain, _ = rope_inv_freq(MiniMindConfig())
    yarn, factor = rope_inv_freq(MiniMindConfig(inference_rope_scaling=True))
    assert plain.shape == (32,) and factor == 1.0
    torch.testing.assert_close(plain, 1.0 / 1e6 ** (torch.arange(0, 64, 2).float() / 64))
    ratio = yarn / plain
    torch.testing.assert_close(ratio[:6], torch.ones(6))  # low = 5
    torch.testing.assert_close(ratio[14:], torch.full((18,), 1 / 16))  # high = 14
    for i in range(6, 14):
        ramp = (i - 5) / (14 - 5)
        assert ratio[i].item() == pytest.approx(1 - ramp + ramp / 16, rel=1e-5)
    ids = random_ids(1, 12)
    a = tiny_model()
    b = tiny_model(inference_rope_scaling=True)
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    torch.testing.assert_close(la[:, 0], lb[:, 0])  # position 0 is not rotated
    assert not torch.allclose(la[:, 1:], lb[:, 1:], atol=1e-5)


def test_bf16_autocast_keeps_fp32_residual():
    model = tiny_model(use_moe=True, headwise_attn_output_gate=True)
    dtypes = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda m, i, o: dtypes.append(o[0].dtype))
    ids = random_ids(2, 9)
    with torch.no_grad():
        ref = model(ids).logits
        dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids)
    assert dtypes == [torch.float32, torch.float32]
    assert out.hidden_states.dtype == torch.float32
    torch.testing.assert_close(out.logits.float(), ref, atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------------------------- HF integration


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


def test_generate_sampling_streamer_and_num_return_sequences():
    from transformers import TextStreamer

    tok = word_tokenizer()
    model = tiny_model(use_moe=True, headwise_attn_output_gate=True)
    prompt = tok("w5 w6 w7", return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**prompt, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.1,
                         num_return_sequences=3, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    assert out.shape == (3, 3 + 6)
    assert torch.equal(out[:, :3], prompt["input_ids"].expand(3, -1))
    buf = io.StringIO()
    with redirect_stdout(buf):
        streamed = model.generate(**prompt, streamer=TextStreamer(tok, skip_prompt=True), max_new_tokens=5,
                                  min_new_tokens=5, do_sample=True, top_p=0.8, pad_token_id=0)
    assert buf.getvalue().strip() == tok.decode(streamed[0, 3:]).strip()
    assert len(buf.getvalue().split()) == 5


def test_save_pretrained_round_trip_with_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny_model(use_moe=True, headwise_attn_output_gate=True, inference_rope_scaling=True, max_seq_len=77)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is MiniMindConfig and config.max_seq_len == 77 and config.headwise_attn_output_gate
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MiniMindForCausalLM
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = random_ids(2, 9)
    with torch.no_grad():
        # from_pretrained builds on the meta device: RoPE must not depend on buffers lost there
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert loaded.config.rope_scaling["factor"] == 16


def test_minimind_style_state_dict_loads_strict():
    src = tiny_model(seed=3)
    half = {k: v.half() for k, v in src.state_dict().items()}  # MiniMind's .pth files are fp16 copies
    dst = tiny_model(seed=4)
    dst.load_state_dict(half, strict=True)
    ids = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(dst(ids).logits, src.half().float()(ids).logits)


def test_bench_compares_with_a_peer_checkout(tmp_path, capsys):
    # a MiniMind-layout "checkout" whose model file re-exports this repo's classes: same function, so the bench's
    # logits check passes and every row and ratio gets printed
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_minimind.py").write_text(
        "from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: F401\n")
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_model

    bench_model.main(["--peer", str(tmp_path), "--configs", "32x1_moe,32x1_moe_gate", "--batch_size", "1",
                      "--seq_len", "16", "--decode_prompt", "4", "--decode_tokens", "3", "--repeats", "2",
                      "--warmup", "0", "--dtype", "bfloat16", "--device", "cpu", "--clock", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in lines if line.startswith("| ")}
    assert {"ours bf16", "ours fp32", "MiniMind fp32", "ours bf16 / MiniMind fp32",
            "ours fp32 / MiniMind fp32"} <= rows.keys()
    assert len(rows["ours bf16"]) == 5  # train, prefill, decode, rollout, memory
    assert all(float(cell.split()[0]) > 0 for cell in rows["MiniMind fp32"])
    assert all(cell.strip().endswith("x") for cell in rows["ours fp32 / MiniMind fp32"])
    assert "### 32x1_moe_gate" in "\n".join(lines)  # the gate-on model runs ours only: no peer row after it
    assert not [line for line in lines[lines.index(next(x for x in lines if "32x1_moe_gate" in x)):]
                if line.startswith("| MiniMind")]
