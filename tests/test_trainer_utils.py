"""Unit tests of the training spine: schedule, data order, atomic writes, step mechanics, resume.

    python -m pytest tests/test_trainer_utils.py -q
"""
import os
import signal

import pytest
import torch

from conftest import signal_after_step
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.trainer_utils import (SkipBatchSampler, TrainingStopped, TrainLoop, UserError, atomic_save,
                                   build_optimizer, build_parser, get_lr, init_run, load_weights, parse_args,
                                   save_weights)


def test_get_lr_cosine_endpoints_and_warmup():
    assert get_lr(0, 100, 1.0) == pytest.approx(1.0)
    assert get_lr(50, 100, 1.0) == pytest.approx(0.55)
    assert get_lr(100, 100, 1.0) == pytest.approx(0.1)
    assert get_lr(0, 100, 1.0, warmup=4) == pytest.approx(0.25)
    assert get_lr(3, 100, 1.0, warmup=4) == pytest.approx(1.0)


def _epoch(sampler_kwargs, ranks):
    return [list(SkipBatchSampler(**sampler_kwargs, rank=r, world_size=ranks)) for r in range(ranks)]


def test_sampler_covers_every_sample_once_and_pads_evenly():
    per_rank = _epoch(dict(num_samples=11, batch_size=2, epoch=3, seed=7), ranks=2)
    assert len(per_rank[0]) == len(per_rank[1]) == 3  # 11 padded to 12, 4 per global batch
    flat = [i for r in per_rank for b in r for i in b]
    assert sorted(set(flat)) == list(range(11)) and len(flat) == 12
    # seeded by seed+epoch, the same order on every rank; another epoch gives another order
    again = _epoch(dict(num_samples=11, batch_size=2, epoch=3, seed=7), ranks=2)
    other = _epoch(dict(num_samples=11, batch_size=2, epoch=4, seed=7), ranks=2)
    assert again == per_rank and other != per_rank


def test_sampler_resume_continues_the_same_order_after_world_size_change():
    full = list(SkipBatchSampler(20, 2, epoch=0, seed=1))  # one rank: the reference order
    order = [i for b in full for i in b]
    one = SkipBatchSampler(20, 2, epoch=0, seed=1)
    consumed = one.samples_after(3)  # 3 batches of 2 on 1 rank
    assert consumed == 6
    two = _epoch(dict(num_samples=20, batch_size=2, epoch=0, seed=1, skip_samples=consumed), ranks=2)
    first_global = two[0][0] + two[1][0]
    assert sorted(first_global) == sorted(order[6:10])
    rest = [i for step in zip(*two) for b in step for i in b]
    assert sorted(rest) == sorted(order[6:]) and len(rest) == 14


def flat_order(batches_per_rank):
    """The global order a multi-rank epoch consumed: global batch k = rank 0's k-th batch, rank 1's, ..."""
    return [i for step in zip(*batches_per_rank) for b in step for i in b]


@pytest.mark.parametrize("width", [0, 900], ids=["sorted", "pre-packed"])
def test_grouped_sampler_one_order_for_any_world_size_and_exact_resume(width):
    from dataset.lm_dataset import GROUP_CHUNK
    n, b = 2 * GROUP_CHUNK * 3 + 40, 3  # two full chunks of 64 x 3 samples and a short one
    lengths = torch.randint(10, 400, (n,), generator=torch.Generator().manual_seed(0))
    kw = dict(num_samples=n, batch_size=b, epoch=1, seed=5, lengths=lengths, group_size=b, width=width)
    one = list(SkipBatchSampler(**kw))
    order = [i for batch in one for i in batch]
    assert sorted(order) == list(range(n))  # one permutation of the epoch
    assert order != [i for batch in SkipBatchSampler(**{**kw, "group_size": 0}) for i in batch]  # regrouped
    chunk = GROUP_CHUNK * b
    for c in range(0, n, chunk):
        part = [i for i in order[c:c + chunk]]
        blocks = [part[k:k + b] for k in range(0, len(part) - len(part) % b, b)]
        sums = [int(lengths[blk].sum()) for blk in blocks]
        if width:  # pre-packed blocks: nearly every block's samples fit one row of the width
            assert sum(s <= width for s in sums) >= 0.8 * len(sums)
        else:  # sorted blocks: a block's lengths never interleave with another block's of the same chunk
            spans = sorted((int(lengths[blk].min()), int(lengths[blk].max())) for blk in blocks)
            assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))
    for ranks in (2, 4):  # rank r takes block k*W + r: the same order, micro-batch = block
        per_rank = _epoch(kw, ranks)
        assert flat_order(per_rank)[:n] == order
        assert per_rank[1][0] == order[b:2 * b]
    # resume after 5 global batches of 2 ranks, on 3 ranks, and with another batch size (the saved group size)
    done = SkipBatchSampler(**kw, world_size=2).samples_after(5)
    assert done == 30
    rest = flat_order(_epoch({**kw, "skip_samples": done}, 3))
    assert rest[:n - done] == order[done:]
    bigger = flat_order([list(SkipBatchSampler(**{**kw, "batch_size": 4}, skip_samples=done))])
    assert bigger == order[done:]
    # the order depends on seed and epoch
    assert one != list(SkipBatchSampler(**{**kw, "epoch": 2}))


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "w.pth")
    atomic_save({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_save({"a": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["w.pth"]  # no temp file left behind


def tiny_config(**kw):
    return MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          **kw)


def test_load_weights_names_the_flag_to_change(tmp_path):
    gated = MiniMindForCausalLM(tiny_config(headwise_attn_output_gate=True))
    path = str(tmp_path / "pretrain_64.pth")
    save_weights(gated.state_dict(), path, None)  # no sidecar config: diagnose from the tensors
    with pytest.raises(UserError, match="--headwise_attn_output_gate 1"):
        load_weights(MiniMindForCausalLM(tiny_config()), path, tiny_config())
    moe = MiniMindForCausalLM(tiny_config(use_moe=True))
    save_weights(moe.state_dict(), path, tiny_config(use_moe=True))  # with sidecar
    with pytest.raises(UserError, match="--use_moe True|--use_moe 1"):
        load_weights(MiniMindForCausalLM(tiny_config()), path, tiny_config())
    with pytest.raises(UserError, match="not found"):
        load_weights(gated, str(tmp_path / "missing_64.pth"), tiny_config())


class FixedTokens(torch.utils.data.Dataset):
    """Equal-length random sequences: per-batch token means then equal the global mean."""

    def __init__(self, n=10, length=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(3, 200, (n, length), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def train_tiny(tmp_path, *flags, seed=0, seen=None):
    args = parse_args(build_parser("test"), ["--device", "cpu", "--dtype", "float32", "--num_workers", "0",
                                             "--save_dir", str(tmp_path / "out"), "--checkpoint_dir",
                                             str(tmp_path / "ckp"), "--hidden_size", "64", "--log_interval", "1",
                                             "--learning_rate", "1e-2", *flags])
    ctx = init_run(args)
    torch.manual_seed(seed)
    config = tiny_config()
    model = MiniMindForCausalLM(config)
    opt = build_optimizer(model, args.learning_rate, args.weight_decay)
    loop = TrainLoop(args, ctx, model=model, optimizer=opt, dataset=FixedTokens(), collate_fn=collate,
                     config=config, stage="test")
    seen = [] if seen is None else seen
    for batch in loop:
        seen.append(batch["input_ids"][:, 0].tolist())
        out = loop.model(batch["input_ids"], labels=batch["labels"])
        loop.backward(out.loss)
    loop.finish()
    return model, opt, seen


def test_accumulation_matches_a_bigger_batch(tmp_path):
    big, _, _ = train_tiny(tmp_path / "a", "--batch_size", "4", "--accumulation_steps", "1", "--epochs", "2")
    small, _, _ = train_tiny(tmp_path / "b", "--batch_size", "2", "--accumulation_steps", "2", "--epochs", "2")
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name  # float noise ~2e-5; a misaligned window differs by ~0.08


def test_epoch_tail_is_flushed_not_leaked(tmp_path):
    # 10 samples, batch 2 -> 5 micro-steps per epoch; accumulation 2 -> steps after 2, 4 and the tail 5
    _, opt, seen = train_tiny(tmp_path, "--batch_size", "2", "--accumulation_steps", "2", "--epochs", "2")
    assert len(seen) == 10
    state = next(iter(opt.state.values()))
    assert int(state["step"]) == 6  # 3 optimizer steps per epoch, none merged across epochs


def test_stop_signal_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    full, _, seen_full = train_tiny(tmp_path / "full", "--batch_size", "2", "--accumulation_steps", "1",
                                    "--epochs", "2")
    part_dir = tmp_path / "part"
    seen_a = []
    signal_after_step(monkeypatch, 7)
    with pytest.raises(TrainingStopped) as stop:
        train_tiny(part_dir, "--batch_size", "2", "--epochs", "2", seen=seen_a)
    assert stop.value.code == 130 and "stopped at step 7; resume with --from_resume 1" in str(stop.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the loop put the handler back
    monkeypatch.undo()
    resumed, _, seen_b = train_tiny(part_dir, "--batch_size", "2", "--epochs", "2", "--from_resume", "1", seed=123)
    assert seen_a + seen_b == seen_full  # same sample order, nothing skipped or repeated
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
