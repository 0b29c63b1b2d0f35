"""Training-path invariants of the fast model code: the MoE dispatch, the memory-light SwiGLU and the chunked
linear + cross-entropy give the same numbers as plain autograd; packed rows equal their samples run alone; gradient
checkpointing gives identical gradients; a tiny MoE model compiles without graph breaks.

    python -m pytest tests/test_model_train.py -q
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model.model_minimind as mm  # noqa: E402
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402

VOCAB = 128


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=VOCAB, **kw)
    return MiniMindForCausalLM(cfg)


def random_ids(batch, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def ffn_reference(ffn, x):
    return ffn.down_proj(F.silu(ffn.gate_proj(x)) * ffn.up_proj(x))


def moe_reference(self, x, token_mask=None):
    """The dispatch as it was: per-expert nn.Linear calls on slices sized by a host-side bincount, plain autograd."""
    B, T, H = x.shape
    k = self.gate.top_k
    flat = x.reshape(-1, H)
    scores, topw, topi = self.gate(flat)
    slot_expert = topi.reshape(-1)
    order = torch.argsort(slot_expert, stable=True)
    counts = torch.bincount(slot_expert, minlength=self.gate.n_experts).tolist()
    routed = torch.cat([ffn_reference(e, c) for e, c in zip(self.experts, flat[order // k].split(counts))])
    routed = routed[torch.argsort(order)].view(-1, k, H)
    y = (routed * topw.to(routed.dtype).unsqueeze(-1)).sum(dim=1).view(B, T, H)
    for shared in self.shared_experts:
        y = y + ffn_reference(shared, x)
    aux = mm.load_balance_loss(scores.view(B, T, -1), topi.view(B, T, k), self.gate.n_experts, k,
                               self.config.aux_loss_alpha, self.config.seq_aux, token_mask)
    return y, aux


def loss_and_grads(model, ids, **kw):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, **kw)
    (out.loss + out.aux_loss).backward()
    return out.loss.detach(), out.aux_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("grouped", [False, True], ids=["slice-loop", "grouped-gemm"])
def test_moe_dispatch_equals_reference_outputs_and_gradients(grouped, monkeypatch):
    # grouped-gemm is the CUDA bf16 path (torch's grouped GEMM also runs fp32 on CPU in eager mode)
    model = tiny_model(use_moe=True, headwise_attn_output_gate=True).train()
    ids = random_ids(3, 11)
    mask = torch.ones_like(ids)
    mask[2, :4] = 0
    monkeypatch.setattr(mm, "grouped_mm_ok", lambda x, dtype: grouped)
    new = loss_and_grads(model, ids, attention_mask=mask)
    monkeypatch.setattr(mm.MoEFeedForward, "forward", moe_reference)
    ref = loss_and_grads(model, ids, attention_mask=mask)
    torch.testing.assert_close(new[0], ref[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(new[1], ref[1], rtol=1e-6, atol=1e-7)
    assert new[2].keys() == ref[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(new[2][name], ref[2][name], rtol=1e-5, atol=1e-7, msg=name)


def test_moe_bf16_autocast_close_to_reference():
    model = tiny_model(use_moe=True).train()
    x = torch.randn(2, 9, 64, requires_grad=True)
    moe = model.model.layers[0].mlp
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = moe(x)
        y_ref, _ = moe_reference(moe, x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.02, atol=0.02)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, [x, moe.experts[0].up_proj.weight], g)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, [x, moe.experts[0].up_proj.weight], g)
    assert dw.dtype == torch.float32 and dx.dtype == torch.float32
    torch.testing.assert_close(dx, dx_ref, rtol=0.05, atol=0.02)
    torch.testing.assert_close(dw, dw_ref, rtol=0.05, atol=0.02)


def saved_bytes(fn):
    """Bytes of distinct storages autograd keeps for backward while fn() runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_swiglu_keeps_two_intermediate_tensors_not_four():
    model = tiny_model().train()
    ffn = model.model.layers[0].mlp
    x = torch.randn(5, 7, 64, requires_grad=True)
    fused_bytes, y = saved_bytes(lambda: ffn(x))
    ref_bytes, y_ref = saved_bytes(lambda: ffn_reference(ffn, x))
    rows, inter = 5 * 7, ffn.up_proj.out_features
    weights = sum(p.numel() for p in ffn.parameters()) * 4
    # plain autograd: x, gate(x), silu(gate(x)), up(x), the product (+ weights); fused: x, gate(x), up(x)
    assert ref_bytes - weights == rows * (64 + 4 * inter) * 4
    assert fused_bytes - weights == rows * (64 + 2 * inter) * 4
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [x, *ffn.parameters()], g),
                    torch.autograd.grad(y_ref, [x, *ffn.parameters()], g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_cross_entropy_equals_logits_path():
    model = tiny_model(use_moe=True)
    ids = random_ids(3, 10)
    labels = ids.clone()
    labels[0, :4] = -100  # prompt
    labels[2, 6:] = -100  # pads
    model.train()
    fused = model(ids, labels=labels)
    assert fused.logits is None  # training with labels never builds [B, T, vocab] logits
    grads = torch.autograd.grad(fused.loss, list(model.parameters()))
    model.eval()  # same function (dropout 0, routing identical), loss from full logits
    out = model(ids, labels=labels)
    targets = labels[:, 1:]
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(fused.loss, ref)
    torch.testing.assert_close(out.loss, ref)
    for a, b in zip(grads, torch.autograd.grad(ref, list(model.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    model.train()
    empty = model(ids, labels=torch.full_like(ids, -100)).loss
    assert empty.item() == 0.0 and empty.requires_grad


def test_frozen_weights_get_no_gradient_and_the_rest_is_unchanged(monkeypatch):
    # LoRA-style: only attention trains; the memory-light functions skip weight gradients nobody needs
    model = tiny_model(use_moe=True).train()
    for name, p in model.named_parameters():
        p.requires_grad_("self_attn" in name)
    ids = random_ids(2, 9)
    new = loss_and_grads_of_trainable(model, ids)
    monkeypatch.setattr(mm.MoEFeedForward, "forward", moe_reference)
    monkeypatch.setattr(mm.RMSNorm, "forward",
                        lambda self, x: self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps))
    model.eval()  # logits path: plain cross-entropy on full logits (same function, dropout 0)
    out = model(ids)
    ref_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    ref = torch.autograd.grad(ref_loss, [p for p in model.parameters() if p.requires_grad])
    for a, b in zip(new, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def loss_and_grads_of_trainable(model, ids):
    out = model(ids, labels=ids)
    out.loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_fused_cross_entropy_chunks_and_bf16():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 9, 32, generator=g, requires_grad=True)
    w = torch.randn(50, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (4, 9), generator=g)
    labels[1, 3:] = -100
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    for amp in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            fused = mm.fused_lm_loss(h, w, labels, chunk_elems=50 * 5)  # 5-row chunks
            ref = F.cross_entropy(F.linear(h, w).reshape(-1, 50).float(), targets, ignore_index=-100)
        torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
        tol = dict(rtol=0.02, atol=1e-3) if amp else dict(rtol=1e-5, atol=1e-7)
        for a, b in zip(torch.autograd.grad(fused, [h, w]), torch.autograd.grad(ref, [h, w])):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, **tol)


def packed_batch(lengths=(5, 7, 3), pad=2, seed=3):
    """One packed row as the collates build it: samples back to back, positions restarting at 0, labels -100 on the
    first token of every segment, trailing pads as their own segment."""
    g = torch.Generator().manual_seed(seed)
    samples = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    ids = torch.cat(samples + [torch.zeros(pad, dtype=torch.long)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(pad)])[None]
    labels = ids.clone()
    labels[pos == 0] = -100
    labels[0, sum(lengths):] = -100
    mask = torch.ones_like(ids)
    mask[0, sum(lengths):] = 0
    return samples, ids, pos, labels, mask


@pytest.mark.parametrize("kw", [dict(), dict(use_moe=True, headwise_attn_output_gate=True)], ids=["dense", "moe"])
def test_packed_row_segments_equal_samples_alone(kw):
    model = tiny_model(**kw).eval()
    samples, ids, pos, labels, mask = packed_batch()
    with torch.no_grad():
        packed = model(ids, position_ids=pos, attention_mask=mask).logits[0]
        off, token_losses = 0, []
        for s in samples:
            alone = model(s[None]).logits[0]
            torch.testing.assert_close(packed[off:off + len(s)], alone, rtol=1e-5, atol=1e-5)
            token_losses.append(F.cross_entropy(alone[:-1], s[1:], reduction="none"))
            per_token = F.cross_entropy(packed[off:off + len(s) - 1], s[1:], reduction="none")
            torch.testing.assert_close(per_token, token_losses[-1], rtol=1e-5, atol=1e-5)
            off += len(s)
        assert torch.isfinite(packed).all()  # the pad segment at the row end attends to itself only
        # no position restarts -> plain causal attention, so the row differs once samples see each other
        unpacked = model(ids).logits[0]
        assert not torch.allclose(unpacked[5:12], packed[5:12], atol=1e-4)
    # the training loss of the packed row (labels -100 on each segment start) = token mean over the samples alone
    model.train()
    loss = model(ids, position_ids=pos, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, torch.cat(token_losses).mean(), rtol=1e-5, atol=1e-6)


def test_packed_pretrain_loss_equals_padded_and_a_split_document_loses_only_its_heads_context():
    """collate_pretrain_packed: documents that fit whole rows train exactly like padding; a document split across
    rows trains like its pieces padded as documents of their own (the tail is predicted without the head's context
    and its first token is no target), which is the documented difference."""
    from dataset.lm_dataset import collate_lm, collate_pretrain_packed
    model = tiny_model(use_moe=True).train()  # train mode: the fused loss
    docs = [random_ids(1, n, seed=n)[0] for n in (7, 6, 5, 3)]
    items = [{"input_ids": d, "labels": d.clone()} for d in docs]

    def loss(batch):
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch.get("position_ids"), labels=batch["labels"])
        return out.loss
    padded = loss(collate_lm(items))
    whole = collate_pretrain_packed(items, max_len=12)  # 7+5, 6+3: no document crosses a row
    assert whole["input_ids"].shape == (2, 12) and int(whole["position_ids"].eq(0).sum()) == 5  # 4 docs + 1 pad run
    torch.testing.assert_close(loss(whole), padded, rtol=1e-5, atol=1e-6)
    split = collate_pretrain_packed(items, max_len=8, min_piece=2)  # rows: [7 | pad], [6, 5[:2]], [5[2:], 3]
    assert split["input_ids"].shape == (3, 8) and split["supervised"].tolist() == [6, 5, 3, 2]  # 5 keeps 3 of 4
    pieces = [{"input_ids": d, "labels": d.clone()} for d in (docs[0], docs[1], docs[2][:2], docs[2][2:], docs[3])]
    torch.testing.assert_close(loss(split), loss(collate_lm(pieces)), rtol=1e-5, atol=1e-6)
    assert abs(loss(split).item() - padded.item()) > 1e-4  # 4e-4 for this random model: 40x the tolerance above


@pytest.mark.parametrize("kw", [dict(), dict(use_moe=True, headwise_attn_output_gate=True)], ids=["dense", "moe"])
def test_gradient_checkpointing_same_gradients_less_saved(kw):
    model = tiny_model(**kw).train()
    ids = random_ids(2, 12)
    plain_bytes, plain = saved_bytes(lambda: loss_and_grads(model, ids))
    model.activation_checkpointing_enable()  # transformers 5's name (gradient_checkpointing_* warn)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    ckpt_bytes, ckpt = saved_bytes(lambda: loss_and_grads(model, ids))
    model.activation_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    torch.testing.assert_close(ckpt[0], plain[0], rtol=0, atol=0)
    for name in plain[2]:
        torch.testing.assert_close(ckpt[2][name], plain[2][name], rtol=0, atol=0, msg=name)
    # checkpointed layers keep only their inputs; the rest is recomputed in backward
    assert ckpt_bytes < 0.6 * plain_bytes


def test_tiny_moe_traces_without_graph_breaks():
    model = tiny_model(use_moe=True, headwise_attn_output_gate=True).train()
    ids = random_ids(2, 16)

    def step(ids):
        out = model(ids, labels=ids)
        return out.loss + out.aux_loss

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_training_forward_does_not_recompile_as_batches_change():
    """--use_compile 1 with packing: every micro-batch has its own number of rows and width. With the loop's dynamic
    marks (trainer.spine.loop._mark_dynamic) and the loss's chunk loops as custom ops, batches of new shapes add no
    compiled frame after a warm-up, and the compiled loss and gradients (aot_eager: the traced backward, custom ops
    included) equal eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from trainer.spine.loop import _mark_dynamic
    model = tiny_model(use_moe=True, headwise_attn_output_gate=True).train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)

    def batch(rows, width, seed):
        ids = random_ids(rows, width, seed)
        labels = ids.clone()
        labels[:, :3] = -100  # an unsupervised prompt
        mask = torch.ones_like(ids)
        mask[-1, width - 5:] = 0  # the last row ends in padding
        labels[-1, width - 5:] = -100
        half = width // 2  # every row packs two segments
        pos = torch.cat([torch.arange(half), torch.arange(width - half)]).expand(rows, -1).contiguous()
        return dict(input_ids=ids, labels=labels, attention_mask=mask, position_ids=pos)

    def step(m, b):
        m.zero_grad(set_to_none=True)
        out = m(**b)
        (out.loss + out.aux_loss).backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    torch._dynamo.reset()
    try:
        for shape in [(3, 40), (4, 38), (3, 37)]:
            step(compiled, _mark_dynamic(batch(*shape, seed=sum(shape))))
        warm = counter.frame_count
        for shape in [(4, 40), (2, 33), (5, 39), (3, 24)]:
            b = _mark_dynamic(batch(*shape, seed=sum(shape)))
            loss, grads = step(compiled, b)
        assert counter.frame_count == warm
        loss_ref, grads_ref = step(model, b)
        torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
        for g, r in zip(grads, grads_ref):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    finally:
        torch._dynamo.reset()
