"""rl_utils: prompt shortening keeps the chat markup, left-padded log-probs equal unpadded ones, policy and reference
agree when their weights do, the chunked fp32 log-softmax is exact, and every reward source scores as documented.

    python -m pytest tests/test_rl_utils.py -q
"""
import sys
from argparse import Namespace

import pytest
import torch

from conftest import ROOT
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.rl_utils import (DEFAULT_REWARD_MODEL_PATH, RewardScorer, answer_reward, completion_logprobs,
                              completion_mask_from_ids, encode_prompts, final_answer, fit_prompt, format_reward,
                              frozen_copy, k3_kl, masked_mean, prompt_messages, rollout, selected_logprobs)
from trainer.trainer_utils import UserError, load_tokenizer

PROMPTS = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>system\nYou are a patient math tutor.<|im_end|>\n<|im_start|>user\nCompute 3+5, then add "
           "the result to itself.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(ROOT / "model"))


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, num_hidden_layers=2, headwise_attn_output_gate=True)
    cfg.update(kw)
    return MiniMindForCausalLM(MiniMindConfig(**cfg))


def make_reward_model(path, tokenizer, seed=0):
    """A tiny LlamaForSequenceClassification (1 score) + our tokenizer, saved like any HF reward model."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id,
                      max_position_embeddings=512)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        model.score.weight.normal_(0, 20.0)  # scores well outside [-3, 3], so clipping is exercised
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class LengthScore:
    """An InternLM-style scorer: get_score(tokenizer, chat) -> float; here the reply length minus 5."""

    def __init__(self):
        self.chats = []

    def get_score(self, tokenizer, chat):
        self.chats.append(chat)
        return float(len(chat[-1]["content"]) - 5)


def run_main_in_process(module, monkeypatch, *argv, reward_model=None):
    """Run a stage script's main() in this process (fast: no interpreter start); reward_model is handed to its
    RewardScorer (e.g. an object exposing get_score)."""
    if reward_model is not None:
        monkeypatch.setattr(module, "RewardScorer",
                            lambda args, tok, device: RewardScorer(args, tok, device, reward_model=reward_model))
    monkeypatch.setattr(sys, "argv", [module.__file__, *map(str, argv)])
    module.main()


def rl_args(**kw):
    a = dict(reasoning=0, reward_model_path="none", answer_reward=1.0)
    a.update(kw)
    return Namespace(**a)


# ------------------------------------------------------------------------------------------------ prompts

def test_short_prompt_untouched_and_long_prompt_keeps_markup(tok):
    ids, cut = fit_prompt(tok, PROMPTS[1], 200)
    assert not cut and tok.decode(ids) == PROMPTS[1]
    long = PROMPTS[1].replace("Compute 3+5", "Compute 3+5 " + "and think about it carefully " * 20)
    ids, cut = fit_prompt(tok, long, 40)
    text = tok.decode(ids)
    assert cut and len(ids) == 40
    assert text.startswith("<|im_start|>system\nYou are a patient math tutor.<|im_end|>\n<|im_start|>user\nCompute")
    assert text.endswith("to itself.<|im_end|>\n<|im_start|>assistant\n")
    # markup + earlier turns longer than the budget: first header line and the end survive
    ids, cut = fit_prompt(tok, long, 12)
    text = tok.decode(ids)
    assert len(ids) == 12 and text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_encode_prompts_left_pads(tok):
    enc = encode_prompts(tok, PROMPTS, 200, "cpu")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n0 = len(tok(PROMPTS[0], add_special_tokens=False)["input_ids"])
    assert mask[0].tolist() == [0] * (ids.shape[1] - n0) + [1] * n0 and mask[1].all()
    assert (ids[0, :ids.shape[1] - n0] == tok.pad_token_id).all()
    assert tok.decode(ids[0][mask[0].bool()]) == PROMPTS[0]


def test_completion_mask_up_to_first_eos():
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9]])
    assert completion_mask_from_ids(ids, 2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


# ------------------------------------------------------------------------------------------------ log-probs

def test_selected_logprobs_exact_values_and_gradient():
    x = torch.randn(2, 3, 11, dtype=torch.double, requires_grad=True)
    t = torch.randint(0, 11, (2, 3))
    ref = torch.log_softmax(x, -1).gather(-1, t[..., None]).squeeze(-1)
    assert torch.allclose(selected_logprobs(x, t, chunk_rows=4), ref, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: selected_logprobs(v, t, chunk_rows=4), (x,))
    # the sampling temperature: log_softmax(logits / T)
    ref_t = torch.log_softmax(x / 0.7, -1).gather(-1, t[..., None]).squeeze(-1)
    assert torch.allclose(selected_logprobs(x, t, chunk_rows=4, temperature=0.7), ref_t, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: selected_logprobs(v, t, chunk_rows=5, temperature=0.7), (x,))
    # bf16 logits: fp32 math, a bf16 gradient
    xb = x.detach().to(torch.bfloat16).requires_grad_(True)
    out = selected_logprobs(xb, t, chunk_rows=5)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.log_softmax(xb.float(), -1).gather(-1, t[..., None]).squeeze(-1), atol=1e-6)
    out.sum().backward()
    assert xb.grad.dtype == torch.bfloat16


def test_left_padded_logprobs_equal_each_sequence_alone(tok):
    model = tiny_model()
    ro = rollout(model, tok, PROMPTS, num_return_sequences=2, max_new_tokens=6, max_prompt_len=200)
    assert model.training  # train mode restored
    assert ro.input_ids.shape[0] == 4 and ro.prompts[:2] == [PROMPTS[0]] * 2
    assert (ro.attention_mask[:2, :ro.prompt_len] == 0).any()  # the short prompt really is left-padded
    logp, aux = completion_logprobs(model, ro)
    assert logp.shape == ro.completion_ids.shape and float(aux) == 0.0
    for i in range(4):
        keep = ro.attention_mask[i].bool()
        ids = ro.input_ids[i][keep][None]
        p = int(ro.attention_mask[i, :ro.prompt_len].sum())
        alone, _ = completion_logprobs(model, ids, torch.ones_like(ids), p)
        n = int(ro.completion_mask[i].sum())
        torch.testing.assert_close(logp[i, :n], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("moe,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_policy_and_reference_agree_when_weights_do(tok, moe, dtype):
    model = tiny_model(use_moe=moe)
    ref = frozen_copy(model)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    ro = rollout(model, tok, PROMPTS, num_return_sequences=2, max_new_tokens=5, max_prompt_len=200)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logp, aux = completion_logprobs(model, ro, temperature=0.8)  # train mode (MoE aux from this forward)
        with torch.no_grad():
            ref_logp, _ = completion_logprobs(ref, ro, temperature=0.8)
    assert torch.equal(logp.detach(), ref_logp)
    assert float(masked_mean(k3_kl(logp.detach(), ref_logp), ro.completion_mask)) == 0.0
    assert torch.equal(torch.exp(logp - ref_logp), torch.ones_like(logp))
    assert (float(aux.detach()) > 0) == moe


# ------------------------------------------------------------------------------------------------ rewards

def test_format_and_answer_rules():
    good = "<think>\nadd them\n</think>\n<answer>\n8\n</answer>"
    assert format_reward(good) == 1.5
    assert format_reward(good.replace("</think>\n", "</think>\n\n")) == 1.5
    assert format_reward("<think>\nx\n</think> 8") == 0.5  # two tags, no format
    assert format_reward("<answer>1</answer><answer>2</answer>") == 0.0
    assert final_answer("5+4=9.") == 9 and final_answer("2+9=11, not 12") == 12
    assert final_answer("<think>\n7 or 9?\n</think>\n<answer>\n 7 \n</answer> 9") == 7
    assert answer_reward("3+5=8.", "8") == 1.0 and answer_reward("It is 9", "8") == 0.0
    assert answer_reward("no number", "8") == 0.0 and answer_reward("8", "a sentence") is None
    assert answer_reward("The total is 1,024", "1024") == 1.0 and answer_reward("-2", "-2") == 1.0
    msgs = prompt_messages(PROMPTS[1])
    assert [m["role"] for m in msgs] == ["system", "user"] and msgs[1]["content"].startswith("Compute 3+5")


def test_scorer_without_reward_model(tok, capsys):
    scorer = RewardScorer(rl_args(reasoning=1), tok, "cpu")
    comps = ["<think>\nx\n</think>\n<answer>\n8\n</answer>", "it is 7", "8"]
    r, m = scorer([PROMPTS[1]] * 3, comps, ["8", "8", "not a number"])
    assert r.tolist() == [2.5, 0.0, 0.0]
    assert m == pytest.approx({"reward_format": 0.5, "reward_answer": 1 / 3})
    assert scorer.reward_range == (0.0, 2.5)
    assert "no reward model" in capsys.readouterr().out


def test_scorer_reward_model_path_rules(tok, tmp_path, capsys):
    with pytest.raises(UserError, match="does not exist"):
        RewardScorer(rl_args(reward_model_path=str(tmp_path / "missing")), tok, "cpu")
    # the default path (absent on this machine) falls back with a notice
    scorer = RewardScorer(rl_args(reward_model_path=DEFAULT_REWARD_MODEL_PATH), tok, "cpu")
    assert not scorer.has_reward_model and "rule-based rewards only" in capsys.readouterr().out
    with pytest.raises(UserError, match="no reward source"):
        RewardScorer(rl_args(answer_reward=0.0), tok, "cpu")


def test_scorer_get_score_object_clips_and_mixes_answer(tok):
    rm = LengthScore()
    scorer = RewardScorer(rl_args(reasoning=1, answer_reward=0.0), tok, "cpu", reward_model=rm)
    comps = ["abcdef", "x" * 40, "<think>\nhm\n</think>\n<answer>\n8\n</answer>"]
    r, m = scorer([PROMPTS[1]] * 3, comps, ["8"] * 3)
    full3 = min(len(comps[2]) - 5, 3.0)
    expected = [1.0, 3.0, 1.5 + 0.4 * full3 + 0.6 * max(1 - 5, -3.0)]  # each score clipped
    assert r.tolist() == pytest.approx(expected)
    assert rm.chats[0][:-1] == prompt_messages(PROMPTS[1]) and rm.chats[0][-1] == {"role": "assistant",
                                                                                     "content": "abcdef"}
    assert rm.chats[-1][-1]["content"] == "8"  # the answer alone, scored separately
    assert scorer.reward_range == (-3.0, 4.5) and "reward_model" in m


def test_scorer_sequence_classifier_dir(tok, tmp_path):
    from transformers import AutoModelForSequenceClassification
    path = make_reward_model(tmp_path / "rm", tok)
    scorer = RewardScorer(rl_args(reward_model_path=str(path), answer_reward=0.0), tok, "cpu")
    assert scorer.rm is not None and scorer.rm_kind == "classifier"  # loaded (and tried) at start-up
    comps = ["Eight.", "3+5=8, and 8+8=16.", "no"]
    r, _ = scorer([PROMPTS[1], PROMPTS[1], PROMPTS[0]], comps, ["16"] * 3)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    expected = []
    for p, c in zip([PROMPTS[1], PROMPTS[1], PROMPTS[0]], comps):
        text = tok.apply_chat_template(prompt_messages(p) + [{"role": "assistant", "content": c}], tokenize=False)
        with torch.no_grad():
            expected.append(model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item())
    assert r.tolist() == pytest.approx([max(-3.0, min(3.0, e)) for e in expected], abs=1e-4)
    assert any(abs(e) > 3 for e in expected)  # clipping happened
