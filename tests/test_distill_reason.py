"""Reasoning distillation: tag weighting lands exactly on the answer's tags (single- and multi-token tags), the loss
is the weighted mean it claims to be, and the script trains, resumes and runs under torchrun.

    python -m pytest tests/test_distill_reason.py -q
"""
import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import DEMO, ROOT, TINY, dirs, read_metrics, run_script, run_torchrun
from dataset.lm_dataset import SFTDataset
from trainer.train_distill_reason import TAGS, tag_id_sequences, tag_positions, tag_weighted_ce, tag_weights
from trainer.trainer_utils import load_tokenizer

# Tags (and their pieces: '<', '</', 'think', 'answer', '>') also in the system and user prompts, which must not be
# weighted; the answer uses the pieces outside tags too ("I think", "a < b > c").
SYSTEM = "Reply as <think>reasoning</think><answer>result</answer>; think first."
USER = "Is 3 < 5? Show <think> and </answer> tags."
ANSWER = ("<think>\nI think 3 < 5 > 2, so the answer is yes.\n</think>\n<answer>\nyes, answer: <b>\n</answer>")


def _rendered(tokenizer, tmp_path):
    """input_ids, labels and the char-offset oracle of the tag tokens inside the assistant answer."""
    path = tmp_path / "one.jsonl"
    conv = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
            {"role": "assistant", "content": ANSWER}]
    path.write_text(json.dumps({"conversations": conv}) + "\n")
    item = SFTDataset(path, tokenizer, max_length=1024)[0]
    text = tokenizer.apply_chat_template(conv, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == item["input_ids"].tolist()
    base = text.index(ANSWER)  # the answer occurs once; the prompts hold other text
    tag_chars = set()
    for tag in TAGS:
        for m in re.finditer(re.escape(tag), ANSWER):
            tag_chars.update(range(base + m.start(), base + m.end()))
    expected = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and set(range(a, b)) <= tag_chars]
    return item["input_ids"], item["labels"], expected


def _check_positions(tokenizer, tmp_path):
    ids, labels, expected = _rendered(tokenizer, tmp_path)
    seqs = tag_id_sequences(tokenizer)
    assert len(expected) == sum(len(s) for s in seqs)  # each tag occurs once in the answer
    w = tag_weights(labels[None], seqs, 10.0)[0]
    assert torch.nonzero(w == 10.0).flatten().tolist() == expected
    assert torch.equal(w == 1.0, (labels != -100) & (w != 10.0))
    assert torch.equal(w == 0.0, labels == -100)
    # the prompts really do contain the tag ids (unsupervised there), so the test would catch weighting them
    prompt_ids = ids[labels == -100].tolist()
    assert all(any(prompt_ids[i:i + len(s)] == s for i in range(len(prompt_ids))) for s in seqs[:2])
    return ids, labels, seqs, w


def test_tag_weights_hit_exactly_the_answer_tags_shipped_tokenizer(tmp_path):
    tok = load_tokenizer(str(ROOT / "model"))
    seqs = tag_id_sequences(tok)
    assert all(len(s) == 1 for s in seqs)
    _check_positions(tok, tmp_path)


def _char_tokenizer(path):
    """A byte-level tokenizer without merges: every tag is 7-9 tokens and its pieces are ordinary tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    shipped = load_tokenizer(str(ROOT / "model"))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = shipped.chat_template
    tok.save_pretrained(path)
    return load_tokenizer(str(path))


def test_tag_weights_match_whole_sequences_for_multi_token_tags(tmp_path):
    tok = _char_tokenizer(tmp_path / "tok")
    seqs = tag_id_sequences(tok)
    assert [len(s) for s in seqs] == [len(t) for t in TAGS]
    ids, labels, seqs, w = _check_positions(tok, tmp_path)
    # the reference's bug (a set of sub-word ids) would weight many more answer tokens ('t','h','<',...)
    pieces = {i for s in seqs for i in s}
    assert sum(1 for x in labels.tolist() if x in pieces) > (w == 10.0).sum() + 10


def test_weighted_loss_equals_hand_computed_mean():
    torch.manual_seed(0)
    V, tag = 11, [[7, 8], [9]]
    labels = torch.tensor([[-100, -100, 3, 7, 8, 4, 9, 2, -100],
                           [-100, 7, 8, -100, 5, 9, 9, -100, -100]])  # the 7,8 at 1-2 of row 2 is a tag too
    logits = torch.randn(2, 9, V)
    loss, ce, frac = tag_weighted_ce(logits, labels, tag, 4.0)
    num = den = plain = n = tags = 0.0
    for b in range(2):
        for t in range(8):
            y = labels[b, t + 1].item()
            if y == -100:
                continue
            ce_t = -torch.log_softmax(logits[b, t], -1)[y].item()
            row = labels[b].tolist()
            j = t + 1
            is_tag = y == 9 or (y == 7 and row[j + 1:j + 2] == [8]) or (y == 8 and row[j - 1] == 7)
            wt = 4.0 if is_tag else 1.0
            num, den, plain, n, tags = num + wt * ce_t, den + wt, plain + ce_t, n + 1, tags + is_tag
    assert loss.item() == pytest.approx(num / den, rel=1e-5)
    assert ce.item() == pytest.approx(plain / n, rel=1e-5) and frac.item() == pytest.approx(tags / n)
    # weight 1 is plain SFT: the model's own shifted CE
    same, _, _ = tag_weighted_ce(logits, labels, tag, 1.0)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert same.item() == pytest.approx(ref.item(), rel=1e-5)
    # no supervised token: 0, not NaN
    empty = tag_weighted_ce(logits, torch.full_like(labels, -100), tag, 4.0)
    assert all(x.item() == 0.0 for x in empty)
    assert tag_positions(labels, tag)[1].tolist() == [False, True, True, False, False, True, True, False, False]


def test_packed_batch_gives_the_padded_weighted_loss_and_units():
    from dataset.lm_dataset import collate_lm, collate_packed
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    tok = load_tokenizer(ROOT / "model")
    items = [SFTDataset(DEMO / "reason.jsonl", tok, max_length=96, target_sample=0)[i] for i in range(8)]
    seqs = tag_id_sequences(tok)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2))
    results = []
    for batch in (collate_lm(items), collate_packed(items, max_len=192)):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch.get("position_ids")).logits
        units = tag_weights(batch["labels"][:, 1:], seqs, 10.0).sum()  # the loop's unit count for this stage
        results.append((units, *tag_weighted_ce(logits, batch["labels"], seqs, 10.0)))
    assert results[0][3].item() > 0  # tags were found and weighted
    for packed, padded in zip(results[1], results[0]):  # units, loss, ce, tag fraction
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)


def _from_dpo(folder):
    """The stage starts from dpo: the tiny SFT model stands in for it."""
    for ext in (".pth", ".json"):
        shutil.copy(folder / "out" / f"full_sft_64{ext}", folder / "out" / f"dpo_64{ext}")


def test_trains_from_dpo_and_resumes(sft_copy):
    _from_dpo(sft_copy)
    common = [*TINY, *dirs(sft_copy), "--data_path", DEMO / "reason.jsonl", "--batch_size", "4",
              "--log_interval", "2", "--learning_rate", "1e-4"]
    proc = run_script("trainer/train_distill_reason.py", *common, "--max_steps", "4", tmp=sft_copy)
    assert "<think> -> [" in proc.stdout
    assert (sft_copy / "out" / "reason_64.pth").exists() and (sft_copy / "out" / "reason_64.json").exists()
    proc = run_script("trainer/train_distill_reason.py", *common, "--max_steps", "6", "--from_resume", "1",
                      tmp=sft_copy)
    assert "resumed from" in proc.stdout
    rows = read_metrics(sft_copy, "reason")
    assert [r["global_step"] for r in rows] == [2, 4, 6]
    for r in rows:
        assert 0.02 < r["tag_tokens"] < 0.5 and r["logits_loss"] > 0 and r["ce_loss"] > 0
        assert r["loss"] == pytest.approx(r["logits_loss"] + r["aux_loss"], rel=1e-5)
    side = json.loads((sft_copy / "out" / "reason_64.json").read_text())
    assert side["global_step"] == 6 and side["args"]["tag_weight"] == 10.0


def test_multi_token_tokenizer_end_to_end(tmp_path):
    _char_tokenizer(tmp_path / "tok")
    run_script("trainer/train_distill_reason.py", *TINY, *dirs(tmp_path), "--data_path", DEMO / "reason.jsonl",
               "--tokenizer_path", tmp_path / "tok", "--from_weight", "none", "--batch_size", "2",
               "--max_steps", "2", "--log_interval", "1", tmp=tmp_path)
    rows = read_metrics(tmp_path, "reason")
    assert len(rows) == 2 and all(r["tag_tokens"] > 0.05 for r in rows)


def test_torchrun_two_ranks(sft_copy):
    _from_dpo(sft_copy)
    out = run_torchrun("trainer/train_distill_reason.py", *TINY, *dirs(sft_copy), "--data_path",
                       DEMO / "reason.jsonl", "--batch_size", "2", "--max_steps", "3", "--log_interval", "1",
                       tmp=sft_copy, cwd=ROOT / "trainer")
    assert "weights identical on all 2 ranks" in out
    assert (sft_copy / "out" / "reason_64.pth").exists()
