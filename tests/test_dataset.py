"""Datasets and collate functions: loss masks, BOS/EOS, padding, DPO layout, RL prompts, errors, demo files.

    python -m pytest tests/test_dataset.py -q
"""
import functools
import json
import math
import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "dataset" / "demo"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from dataset.lm_dataset import (BYTES_PER_TOKEN, GROUP_FILL, DataFormatError, DPODataset,  # noqa: E402
                                PretrainDataset, RLAIFDataset, SFTDataset, best_fit_decreasing, collate_dpo,
                                collate_dpo_packed, collate_lm, collate_packed, collate_pretrain_packed, collate_rl,
                                group_by_length, grouped, pack_rows, real_token_fraction, split_pack, split_share,
                                synthetic_lengths)

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "3+4=?"}, {"role": "assistant", "content": "3+4=7。"},
        {"role": "user", "content": "And in words?"}, {"role": "assistant", "content": "Seven."}]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(ROOT / "model"))


@pytest.fixture(scope="module")
def char_tok():
    """A different ChatML tokenizer: one token per character, other ids, and a template that injects a default
    system prompt. "\\n答" is an added token, so one token straddles the assistant header and its content."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,?!:+=<>/{}\"'_-。？答案是七你好"
    vocab = {"<unk>": 0, "<pad>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    core.add_tokens(["\n答"])
    t = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                pad_token="<pad>", unk_token="<unk>")
    t.chat_template = ("{% if messages[0].role != 'system' %}<|im_start|>system\nDefault.<|im_end|>\n{% endif %}"
                       "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return t


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def supervised_runs(tokenizer, input_ids, labels):
    """Decoded text of each maximal run of supervised positions; labels must equal the ids where supervised."""
    keep = labels != -100
    assert torch.equal(labels[keep], input_ids[keep])
    runs, current = [], []
    for token, k in zip(input_ids.tolist(), keep.tolist()):
        if k:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


# ------------------------------------------------------------------------------------------------------------------
# SFT masks

def test_sft_mask_multi_turn(tok, tmp_path):
    item = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CHAT}]), tok)[0]
    assert supervised_runs(tok, item["input_ids"], item["labels"]) == ["3+4=7。<|im_end|>", "Seven.<|im_end|>"]
    assert tok.decode(item["input_ids"]) == tok.apply_chat_template(CHAT, tokenize=False)


def test_sft_mask_tools_and_reasoning(tok, tmp_path):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    convo = [{"role": "user", "content": "Add 2 and 5."},
             {"role": "assistant", "content": "", "tool_calls": json.dumps([{"name": "add",
                                                                              "arguments": {"a": 2, "b": 5}}])},
             {"role": "tool", "content": "7"},
             {"role": "assistant", "content": "<answer>\n7\n</answer>", "reasoning_content": "The tool said 7."}]
    item = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": convo, "tools": tools}]), tok)[0]
    assert supervised_runs(tok, item["input_ids"], item["labels"]) == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 5}}\n</tool_call><|im_end|>',
        "<think>\nThe tool said 7.\n</think>\n<answer>\n7\n</answer><|im_end|>"]


def test_sft_mask_other_chatml_tokenizer(char_tok, tmp_path):
    convo = [{"role": "user", "content": "3+4=?"}, {"role": "assistant", "content": "答案是七。"},
             {"role": "user", "content": "ok?"}, {"role": "assistant", "content": "Yes, 7."}]
    item = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": convo}]), char_tok)[0]
    text = char_tok.decode(item["input_ids"])
    assert text.startswith("<|im_start|>system\nDefault.<|im_end|>\n")
    # The "\n答" token overlaps the first answer, so it is supervised (the model must learn to emit "答").
    assert supervised_runs(char_tok, item["input_ids"], item["labels"]) == ["\n答案是七。<|im_end|>",
                                                                           "Yes, 7.<|im_end|>"]


def test_sft_truncation(tok, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CHAT}])
    full = SFTDataset(path, tok)[0]
    n = len(full["input_ids"])
    # Cut off the last "<|im_end|>\n": the kept answer stays supervised, the labels are the full ones' prefix.
    cut = n - 2
    part = SFTDataset(path, tok, max_length=cut)[0]
    assert len(part["input_ids"]) == cut
    assert torch.equal(part["labels"], full["labels"][:cut])
    assert supervised_runs(tok, part["input_ids"], part["labels"]) == ["3+4=7。<|im_end|>", "Seven."]
    # Cut before any answer: every label is -100 (allowed; the loss code guards an empty mask).
    first_answer = int((full["labels"] != -100).nonzero()[0])
    early = SFTDataset(path, tok, max_length=first_answer)[0]
    assert len(early["input_ids"]) == first_answer and bool((early["labels"] == -100).all())


# ------------------------------------------------------------------------------------------------------------------
# Pretrain, DPO, RLAIF and collate

def test_pretrain_bos_eos_truncation_and_collate(tok, tmp_path):
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": "你好"}, "", {"text": "Hello world, 3 plus 4 equals 7."}])
    ds = PretrainDataset(path, tok, max_length=8)
    assert len(ds) == 2  # blank line skipped
    short, long = ds[0], ds[1]
    assert short["input_ids"].tolist() == [1] + tok.encode("你好") + [2]
    assert torch.equal(short["labels"], short["input_ids"])
    # Truncation keeps the first max_length tokens (BOS first, EOS dropped).
    full_long = [1] + tok.encode("Hello world, 3 plus 4 equals 7.") + [2]
    assert long["input_ids"].tolist() == full_long[:8]
    batch = collate_lm([short, long])
    n = len(short["input_ids"])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0, n:].tolist() == [0] * (8 - n)
    assert batch["labels"][0, n:].tolist() == [-100] * (8 - n)
    assert batch["labels"][0, :n].tolist() == short["input_ids"].tolist()


def test_pretrain_boundary_tokens_only_when_absent(tok, tmp_path):
    """MiniMind's pretrain_hq.jsonl texts carry their own <|im_start|>...<|im_end|> turns: nothing is doubled."""
    hq = "<|im_start|>鉴别一组中文文章的风格。<|im_end|> <|im_start|>好的，今天天气晴。<|im_end|>"
    texts = [hq, "<|im_start|>半句", "半句<|im_end|>"]
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": t} for t in texts])
    ds = PretrainDataset(path, tok)
    ids = ds[0]["input_ids"].tolist()
    assert ids == tok.encode(hq) and ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 2 and ids.count(2) == 2
    assert ds[1]["input_ids"].tolist() == tok.encode("<|im_start|>半句") + [2]
    assert ds[2]["input_ids"].tolist() == [1] + tok.encode("半句<|im_end|>")
    assert ds[0]["supervised"] == len(ids) - 1


def test_samples_without_targets_are_counted_at_startup(tok, tmp_path, capsys):
    answer = {"role": "assistant", "content": "好"}
    long_prompt = [{"role": "user", "content": "一二三四五六七八九十" * 20}, answer]
    short = [{"role": "user", "content": "hi"}, answer]
    records = [{"conversations": long_prompt if i % 4 == 0 else short} for i in range(40)]  # 10 of 40 cut
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    ds = SFTDataset(path, tok, max_length=64)
    assert ds.no_target_sample == (10, 40)
    assert [ds[i]["supervised"] == 0 for i in range(40)] == [i % 4 == 0 for i in range(40)]
    assert ds[1]["supervised"] == 2  # "好" + <|im_end|>
    assert f"{path}: 10 of the 40 records keep no supervised token within max_length=64" in capsys.readouterr().out
    # A sample of 20 records: an estimate for the file, and the exact per-batch count from the collate.
    part = SFTDataset(path, tok, max_length=64, target_sample=20)
    found, sampled = part.no_target_sample
    assert sampled == 20 and 0 < found < 20
    assert f"{found} of 20 randomly sampled records (~{found * 2} of 40)" in capsys.readouterr().out
    assert collate_lm([ds[i] for i in range(8)])["supervised"].tolist() == [0, 2, 2, 2, 0, 2, 2, 2]
    assert SFTDataset(path, tok, max_length=512).no_target_sample == (0, 40)
    assert capsys.readouterr().out == ""


def test_dpo_collate_layout(tok, tmp_path):
    def pair(q, good, bad):
        user = {"role": "user", "content": q}
        return {"chosen": [user, {"role": "assistant", "content": good}],
                "rejected": [user, {"role": "assistant", "content": bad}]}

    path = write_jsonl(tmp_path / "dpo.jsonl", [pair("1+1=?", "2", "3"), pair("2+2=?", "2+2=4, a longer answer", "5")])
    ds = DPODataset(path, tok)
    items = [ds[0], ds[1]]
    batch = collate_dpo(items)
    assert batch["input_ids"].shape[0] == 4
    for row, (k, side) in enumerate([(0, "chosen"), (1, "chosen"), (0, "rejected"), (1, "rejected")]):
        ids = items[k][f"{side}_input_ids"]
        assert batch["input_ids"][row, :len(ids)].tolist() == ids.tolist()
        assert bool((batch["input_ids"][row, len(ids):] == 0).all())
        assert bool((batch["labels"][row, len(ids):] == -100).all())
    runs = [supervised_runs(tok, batch["input_ids"][r], batch["labels"][r]) for r in range(4)]
    assert runs == [["2<|im_end|>"], ["2+2=4, a longer answer<|im_end|>"], ["3<|im_end|>"], ["5<|im_end|>"]]


# ------------------------------------------------------------------------------------------------------------------
# Packing

def lm_item(ids, labels=None):
    ids = torch.tensor(ids)
    return {"input_ids": ids, "labels": ids.clone() if labels is None else torch.tensor(labels)}


def test_best_fit_decreasing_by_hand():
    assert best_fit_decreasing([5, 4, 3, 2, 1], 6) == [[0, 4], [1, 3], [2]]
    assert best_fit_decreasing([6, 1, 6], 6) == [[0], [2], [1]]  # a sample of exactly max_len fills a row alone
    assert best_fit_decreasing([3, 3, 3], 6) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="does not fit a packed row of 6"):
        best_fit_decreasing([7], 6)
    assert best_fit_decreasing([4, 4, 3, 3, 2], 6) == [[0, 4], [1], [2, 3]]  # the fullest bin that fits: 4+2, not 3+2
    # real tokens / computed positions: padded 15 / (5 x 5); packed: rows of capacity 5 hold all 15 in 3 x 5
    # (capacity 6, the widest allowed, would compute 3 x 6)
    assert real_token_fraction([5, 4, 3, 2, 1], 5, 6) == (15 / 25, 15 / 15)


def test_pack_rows_chooses_the_cheapest_row_width():
    # 5, 4, 3, 3 (15 tokens) under 9: capacity 9 gives [5,4] [3,3] = 2 x 9 = 18; capacity 8: [5,3] [4,3] = 2 x 8 = 16
    assert pack_rows([5, 4, 3, 3], 9) == ([[0, 2], [1, 3]], 8)
    # 4 x 3 under 8: 2 rows of 6 or 4 rows of 3 compute 12 positions each; the narrower rows win (less attention)
    assert pack_rows([3, 3, 3, 3], 8) == ([[0], [1], [2], [3]], 3)
    assert pack_rows([3, 3, 2, 2], 8) == ([[0, 2], [1, 3]], 5)  # 2 full rows of 5 (the width of r = 2 full rows)
    assert pack_rows([7], 9) == ([[0]], 7)


def test_collate_packed_by_hand():
    items = [lm_item([10, 11, 12, 13, 14]), lm_item([20, 21, 22, 23], [-100, -100, 22, 23]), lm_item([30, 31, 32]),
             lm_item([40, 41]), lm_item([50])]
    batch = collate_packed(items, max_len=6)  # 15 tokens: 3 full rows of 5 (width 6 would leave a third empty)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14], [20, 21, 22, 23, 50], [30, 31, 32, 40, 41]]
    assert batch["labels"].tolist() == [[-100, 11, 12, 13, 14], [-100, -100, 22, 23, -100],
                                        [-100, 31, 32, -100, 41]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1] * 5] * 3
    assert batch["supervised"].tolist() == [4, 2, 2, 1, 0]
    assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids", "supervised"}
    two = collate_packed([items[0], items[2]], max_len=6)  # 5 and 3 do not share a row of 6: pad the 3
    assert two["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert two["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]


def segments(batch):
    """(row, start, end) of every real segment: runs that start at position_ids == 0, within attention_mask."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        starts = (batch["position_ids"][r] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        out += [(r, a, b) for a, b in zip(starts, starts[1:]) if batch["attention_mask"][r, a]]
    return out


def target_pairs(ids, labels):
    """(previous token, target) of every target, as the shifted loss sees them."""
    keep = labels[:, 1:] != -100
    return sorted(zip(ids[:, :-1][keep].tolist(), labels[:, 1:][keep].tolist()))


@pytest.mark.parametrize("batch_size,max_len", [(16, 64), (32, 100), (7, 40)])
def test_collate_packed_keeps_every_token_once(batch_size, max_len):
    rng = random.Random(batch_size)
    items = []
    for s in range(batch_size):  # token ids encode (sample, position) so every token can be traced back
        n = rng.choice([max_len, 1, 2] + list(range(3, max_len)))
        ids = [1000 * (s + 1) + k for k in range(n)]
        labels = [t if rng.random() < 0.7 else -100 for t in ids]
        items.append(lm_item(ids, labels))
    collate = pickle.loads(pickle.dumps(functools.partial(collate_packed, max_len=max_len, pad_id=7)))
    batch = collate(items)
    assert all(torch.equal(batch[k], v) for k, v in collate_packed(items, max_len, pad_id=7).items())  # deterministic
    ids, labels, pos, mask = batch["input_ids"], batch["labels"], batch["position_ids"], batch["attention_mask"]
    assert ids.shape[1] <= max_len and ids.shape[1] == int(mask.sum(1).max())
    assert ids.shape[0] < batch_size  # some rows hold several samples
    seen = []
    for r, a, b in segments(batch):
        s = int(ids[r, a]) // 1000 - 1
        seen.append(s)
        assert torch.equal(ids[r, a:b], items[s]["input_ids"]) and torch.equal(pos[r, a:b], torch.arange(b - a))
        assert labels[r, a] == -100 and torch.equal(labels[r, a + 1:b], items[s]["labels"][1:])
        if b - a == max_len:
            assert int(mask[r].sum()) == max_len  # a full-length sample fills its row alone
    assert sorted(seen) == list(range(batch_size))
    pads = mask == 0
    assert bool((ids[pads] == 7).all()) and bool((labels[pads] == -100).all())
    for r in range(ids.shape[0]):  # the padding at a row's end restarts its positions
        n = int(mask[r].sum())
        assert torch.equal(pos[r, n:], torch.arange(ids.shape[1] - n))
    # The loss sees the same (context token, target) pairs as with padding, and nothing else.
    padded = collate_lm(items, pad_id=7)
    assert target_pairs(ids, labels) == target_pairs(padded["input_ids"], padded["labels"])
    assert torch.equal(batch["supervised"], padded["supervised"])


def test_split_pack_by_hand():
    # rows of 10: 7 + the first 3 of the 6, then 7 + the other 3; no padding at all
    assert split_pack([7, 7, 6], 10, min_piece=2) == [[(0, 0, 7), (2, 0, 3)], [(1, 0, 7), (2, 3, 6)]]
    # pieces of at least 4: a room of 3 stays padding and the 6 gets a row of its own
    assert split_pack([7, 7, 6], 10, min_piece=4) == [[(0, 0, 7)], [(1, 0, 7)], [(2, 0, 6)]]
    # whole documents first (best fit): 6 + 4 fill a row without a split
    assert split_pack([6, 5, 4], 10, min_piece=2) == [[(0, 0, 6), (2, 0, 4)], [(1, 0, 5)]]
    items = [lm_item(range(10, 17)), lm_item(range(20, 27)), lm_item(range(30, 36))]
    batch = collate_pretrain_packed(items, max_len=10, min_piece=2)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14, 15, 16, 30, 31, 32],
                                           [20, 21, 22, 23, 24, 25, 26, 33, 34, 35]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2]] * 2
    assert batch["labels"].tolist() == [[-100, 11, 12, 13, 14, 15, 16, -100, 31, 32],
                                        [-100, 21, 22, 23, 24, 25, 26, -100, 34, 35]]
    # the split document keeps 4 of its 5 targets: 33 would need 32 as context, which is in another row
    assert batch["supervised"].tolist() == [6, 6, 4]
    assert batch["attention_mask"].tolist() == [[1] * 10] * 2


@pytest.mark.parametrize("batch_size,max_len", [(16, 64), (32, 100)])
def test_collate_pretrain_packed_keeps_every_token_once(batch_size, max_len):
    rng = random.Random(batch_size)
    # mostly documents longer than half a row (they cannot pair up whole), some short ones
    sizes = [rng.randint(1, 10) if rng.random() < 0.2 else rng.randint(max_len // 2, max_len)
             for _ in range(batch_size)]
    items = [lm_item([1000 * (s + 1) + k for k in range(n)]) for s, n in enumerate(sizes)]
    collate = pickle.loads(pickle.dumps(functools.partial(collate_pretrain_packed, max_len=max_len)))
    batch = collate(items)
    ids, labels, pos, mask = batch["input_ids"], batch["labels"], batch["position_ids"], batch["attention_mask"]
    assert ids.shape[1] == max_len
    pieces = {}
    for r, a, b in segments(batch):
        s, first = divmod(int(ids[r, a]), 1000)
        pieces.setdefault(s - 1, []).append((first, b - a))
        assert torch.equal(ids[r, a:b], items[s - 1]["input_ids"][first:first + b - a])
        assert labels[r, a] == -100 and torch.equal(labels[r, a + 1:b], ids[r, a + 1:b])
        assert torch.equal(pos[r, a:b], torch.arange(b - a))
    min_piece = min(32, max_len // 8)
    splits = 0
    for s, ps in pieces.items():  # each document exactly once, in order, as pieces of >= min_piece
        ps.sort()
        assert [f for f, _ in ps] == [sum(n for _, n in ps[:k]) for k in range(len(ps))]
        assert sum(n for _, n in ps) == len(items[s]["input_ids"])
        assert len(ps) == 1 or min(n for _, n in ps) >= min_piece
        splits += len(ps) - 1
    assert sorted(pieces) == list(range(batch_size)) and splits > 0
    # a row ends early only where no piece of >= min_piece could fill it; every row but the last is nearly full
    fill = mask.sum(1).tolist()
    assert all(n > max_len - 2 * min_piece for n in fill[:-1]) and sum(fill) / mask.numel() > 0.9
    assert batch["supervised"].sum() == sum(len(it["input_ids"]) - 1 for it in items) - splits


def test_group_by_length_blocks():
    lengths = [9, 8, 2, 1, 5, 5, 3]
    # packing: best-fit rows of 10 on the estimates, laid out row after row -> blocks of 2 that fill a row each
    out = group_by_length(list(range(7)), lengths, 2, 10, random.Random(0))
    blocks = [out[k:k + 2] for k in range(0, 6, 2)]
    assert sorted(map(sorted, blocks)) == [[0, 3], [1, 2], [4, 5]] and out[6:] == [6]  # a short block stays last
    assert all(sum(lengths[i] for i in b) == 10 for b in blocks)
    # padding: sorted by length -> blocks of similar lengths; shuffled, and the same for the same rng seed
    out = group_by_length(list(range(100, 107)), lengths, 3, 0, random.Random(1))
    assert sorted(map(sorted, [out[:3], out[3:6]])) == [[101, 104, 105], [102, 103, 106]] and out[6:] == [100]
    assert out == group_by_length(list(range(100, 107)), lengths, 3, 0, random.Random(1))


def test_lengths_are_line_bytes_and_bytes_per_token_is_measured(tok, tmp_path):
    lines = [json.dumps({"text": "hello world " * k}) for k in (1, 5, 40)]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n", encoding="utf-8")  # a blank line between
    ds = PretrainDataset(path, tok, max_length=64)
    assert ds.lengths.tolist() == [len(line) + 1 for line in lines]  # bytes incl. the newline
    ratios = [(len(line) + 1) / len(ds[i]["input_ids"]) for i, line in enumerate(lines)
              if len(ds[i]["input_ids"]) < 64]  # the third text is cut at 64 tokens: left out
    assert len(ratios) == 2 and ds.bytes_per_token == sorted(ratios)[1]
    assert PretrainDataset(path, tok, max_length=64, target_sample=0).bytes_per_token == BYTES_PER_TOKEN
    assert DPODataset(DEMO / "dpo.jsonl", tok, max_length=64).sequences == 2


def test_packing_reaches_95_percent_real_tokens_on_minimind_shaped_lengths():
    """The README's claims, on fewer micro-batches than --pack_report uses (2 grouping chunks of 64)."""
    for b in (16, 32):
        rng = random.Random(b)
        raw = synthetic_lengths("sft", b * 128, 1 << 30, rng)
        est = [n * math.exp(rng.gauss(0, 0.1)) for n in raw]  # byte-length estimates, 10% off
        for max_len in (340, 512):
            sft = [min(n, max_len) for n in raw]
            padded, packed = real_token_fraction(sft, b, max_len)
            _, grouped_packed = real_token_fraction(grouped(sft, est, b, GROUP_FILL * max_len), b, max_len)
            assert padded < 0.5 and grouped_packed >= 0.95, (b, max_len, packed, grouped_packed)
        pre = synthetic_lengths("pretrain", b * 128, 340, rng)
        padded, packed = real_token_fraction(pre, b, 340, split=True)
        assert padded < 0.9 and packed >= 0.95 and split_share(pre, b, 340) < 0.1, (b, padded, packed)


def test_dpo_collates_carry_sample_index(tok):
    ds = DPODataset(DEMO / "dpo.jsonl", tok, max_length=48)
    items = [ds[i] for i in range(6)]
    seqs = [it["chosen_input_ids"] for it in items] + [it["rejected_input_ids"] for it in items]
    labs = [it["chosen_labels"] for it in items] + [it["rejected_labels"] for it in items]
    padded = collate_dpo(items)
    for s, seq in enumerate(seqs):
        assert padded["sample_index"][s].tolist() == [s] * len(seq) + [-1] * (padded["input_ids"].shape[1] - len(seq))
    packed = collate_dpo_packed(items, max_len=96)
    assert packed["input_ids"].shape[0] < 12
    idx = packed["sample_index"]
    assert bool((packed["attention_mask"].bool() == (idx >= 0)).all())
    for s, (seq, lab) in enumerate(zip(seqs, labs)):
        where = idx == s
        assert torch.equal(packed["input_ids"][where], seq) and torch.equal(packed["position_ids"][where],
                                                                           torch.arange(len(seq)))
        assert packed["labels"][where][0] == -100 and torch.equal(packed["labels"][where][1:], lab[1:])
    assert packed["supervised"].tolist() == padded["supervised"].tolist() == [int((x[1:] != -100).sum()) for x in labs]
    assert target_pairs(packed["input_ids"], packed["labels"]) == target_pairs(padded["input_ids"], padded["labels"])


def test_rlaif_prompt_answer_uses_real_roles(tok, tmp_path):
    convo = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "3+4=?"},
             {"role": "assistant", "content": "7"}]
    ds = RLAIFDataset(write_jsonl(tmp_path / "rl.jsonl", [{"conversations": convo}]), tok)
    item = ds[0]
    assert item == {"prompt": "<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\n3+4=?<|im_end|>\n"
                              "<|im_start|>assistant\n", "answer": "7"}
    assert collate_rl([item, item]) == {"prompt": [item["prompt"]] * 2, "answer": ["7", "7"]}


# ------------------------------------------------------------------------------------------------------------------
# Errors

def quoted_line(text, prefix):
    return next(line for line in text.splitlines() if line.startswith("  " + prefix))


GOOD = {"text": "fine", "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize("cls,line,message", [
    (PretrainDataset, '{"text": "ok"', "not valid JSON (Expecting ',' delimiter at the end of the line)"),
    (PretrainDataset, '{"txt": "ok"}', 'no string field "text"'),
    (PretrainDataset, b'{"text": "\xff"}', "not UTF-8 text"),
    (SFTDataset, '{"conversations": []}', "empty"),
    (SFTDataset, '{"conversations": [{"role": "robot", "content": "hi"}]}', "role 'robot'"),
    (SFTDataset, '{"conversations": [{"role": ["user"], "content": "hi"}]}', "role ['user']"),
    (SFTDataset, '{"conversations": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    (SFTDataset, '{"conversations": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', 'no "content"'),
    (SFTDataset, '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", '
                 '"tool_calls": "[{\\"arguments\\": {}}]"}]}', "tool_calls must be a list"),
    (SFTDataset, '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
                 '"tools": {"name": "add"}}', '"tools"/"functions" must be a list'),
    (DPODataset, '{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
                 '"rejected": []}', '"rejected" is missing, empty'),
    (RLAIFDataset, '{"conversations": [{"role": "assistant", "content": "7"}]}', "prompt message"),
    (RLAIFDataset, '[1, 2]', "a JSON list, not an object"),
])
def test_bad_line_found_at_startup_or_skipped(tok, tmp_path, capsys, cls, line, message):
    """Every line is checked when the dataset is built; the error names file:line and the way out, and
    skip_bad_lines drops the line from the index and says so."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join((r if isinstance(r, bytes) else
                               (r if isinstance(r, str) else json.dumps(r)).encode()) + b"\n"
                              for r in [GOOD, "", line, GOOD]))
    with pytest.raises(DataFormatError) as e:
        cls(path, tok)
    text = str(e.value)
    assert f"1 bad line of 4 in {path}" in text and message in quoted_line(text, f"{path}:3: ")
    assert "--skip_bad_lines 1" in text
    ds = cls(path, tok, skip_bad_lines=True)
    assert len(ds) == 2 and ds.skipped_lines == 1
    assert ds[0] == ds[1] if cls is RLAIFDataset else torch.equal(ds[0][next(iter(ds[0]))], ds[1][next(iter(ds[1]))])
    out = capsys.readouterr().out
    assert out.count(f"skipped 1 bad line of 4 in {path}") == 1 and message in quoted_line(out, f"{path}:3: ")


def test_bad_line_late_in_file_lists_first_five_and_counts_all(tok, tmp_path):
    records = [{"text": f"doc {i}"} for i in range(2000)]
    for i in (1800, 1850, 1900, 1901, 1950, 1990, 1999):  # 0-based records -> lines i + 1
        records[i] = {"text": i}
    path = write_jsonl(tmp_path / "pre.jsonl", records)
    with pytest.raises(DataFormatError) as e:
        PretrainDataset(path, tok)
    text = str(e.value)
    assert text.startswith(f"7 bad lines of 2000 in {path}")
    assert re.findall(r":(\d+): ", text) == ["1801", "1851", "1901", "1902", "1951"]
    ds = PretrainDataset(path, tok, skip_bad_lines=True, target_sample=0)
    assert len(ds) == 1993 and ds.skipped_lines == 7
    assert tok.decode(ds[1992]["input_ids"]) == "<|im_start|>doc 1998<|im_end|>"


def test_wrong_file_for_the_stage_stops_early(tok, tmp_path):
    path = write_jsonl(tmp_path / "pretrain.jsonl", [{"text": "x"}] * 1500)
    with pytest.raises(DataFormatError) as e:
        SFTDataset(path, tok, skip_bad_lines=True)
    assert "1000 bad lines of 1000" in str(e.value) and "right file for this stage" in str(e.value)


def test_directory_and_empty_files(tok, tmp_path):
    write_jsonl(tmp_path / "sft_512.jsonl", [GOOD])
    with pytest.raises(DataFormatError, match="is a directory, not a JSONL file .it holds sft_512.jsonl."):
        SFTDataset(tmp_path, tok)
    for content in ("", "\n  \n\n"):
        (tmp_path / "empty.jsonl").write_text(content)
        with pytest.raises(DataFormatError, match=f"{tmp_path / 'empty.jsonl'} has no records: it is empty"):
            PretrainDataset(tmp_path / "empty.jsonl", tok)
    write_jsonl(tmp_path / "allbad.jsonl", ["{", '{"text": 1}'])
    with pytest.raises(DataFormatError, match="no good line is left after skipping 2 bad ones"):
        PretrainDataset(tmp_path / "allbad.jsonl", tok, skip_bad_lines=True)


def test_byte_order_mark_and_crlf_lines(tok, tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "aa"}\r\n\r\n{"text": "bb"}')  # no newline at the end either
    ds = PretrainDataset(path, tok)
    assert [tok.decode(ds[i]["input_ids"]) for i in range(2)] == ["<|im_start|>aa<|im_end|>", "<|im_start|>bb<|im_end|>"]


def test_line_changed_after_startup_still_names_file_and_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": "aa"}, "", "", {"text": "bb"}])
    ds = PretrainDataset(path, tok, target_sample=0)  # (no read before the change: reads are buffered)
    path.write_text(path.read_text().replace('{"text": "bb"}', '{"text": 12}!'))  # same offsets
    ds[0]
    with pytest.raises(DataFormatError) as e:
        ds[1]
    assert str(e.value).startswith(f"{path}:4: not valid JSON (Extra data at character 13)")


def test_missing_file_says_where_data_comes_from(tok, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        SFTDataset(tmp_path / "sft_512.jsonl", tok)
    assert "sft_512.jsonl" in str(e.value) and "dataset/demo" in str(e.value) and "ModelScope" in str(e.value)


def test_dataset_pickles_for_workers(tok):
    ds = SFTDataset(DEMO / "sft.jsonl", tok)
    first = ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0]["input_ids"], first["input_ids"])


# ------------------------------------------------------------------------------------------------------------------
# Demo data

DEMO_SETS = [("pretrain.jsonl", PretrainDataset), ("sft.jsonl", SFTDataset), ("dpo.jsonl", DPODataset),
             ("reason.jsonl", SFTDataset), ("rlaif.jsonl", RLAIFDataset), ("lora_identity.jsonl", SFTDataset)]


@pytest.mark.parametrize("name,cls", DEMO_SETS)
def test_demo_files_parse(tok, name, cls):
    ds = cls(DEMO / name, tok, target_sample=0)  # every item is checked below
    assert len(ds) >= 100
    for i in range(len(ds)):
        item = ds[i]
        if "labels" in item:
            assert bool((item["labels"] != -100).any())


def test_demo_reason_and_rlaif_are_checkable(tok):
    fmt = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.S)
    for line in (DEMO / "reason.jsonl").read_text(encoding="utf-8").splitlines():
        answer = json.loads(line)["conversations"][-1]["content"]
        assert fmt.match(answer), answer
    ds = RLAIFDataset(DEMO / "rlaif.jsonl", tok)
    for i in range(len(ds)):
        item = ds[i]
        a, b = map(int, re.findall(r"\d+", item["prompt"].rsplit("<|im_start|>user\n", 1)[1])[:2])
        assert item["answer"] == str(a + b)


def test_demo_generator_is_deterministic(tmp_path):
    subprocess.run([sys.executable, str(DEMO / "make_demo.py"), "--out_dir", str(tmp_path)], check=True,
                   capture_output=True)
    for name, _ in DEMO_SETS:
        assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes(), name
    assert sum((DEMO / name).stat().st_size for name, _ in DEMO_SETS) < 2_000_000
