"""rl_utils: prompt shortening keeps the chat markup, left-padded log-probs equal unpadded ones, policy and reference
agree when their weights do, the chunked fp32 log-softmax is exact, a compiled policy does not recompile as the
prompt/completion lengths change, every reward source scores as documented (including a trust_remote_code reward
model with get_score, the way internlm2-1_8b-reward loads, and the one-line message when its code fails), and a run
that could never be paid a reward stops at start-up.

    python -m pytest tests/test_rl_utils.py -q
"""
import json
import sys
from argparse import Namespace

import pytest
import torch

from conftest import ROOT
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.rl_utils import (DEFAULT_REWARD_MODEL_PATH, RewardScorer, answer_reward, check_reward_source,
                              completion_logprobs, completion_mask_from_ids, encode_prompts, final_answer, fit_prompt,
                              concat_rollouts, format_reward, frozen_copy, k3_kl, load_rl_dataset, masked_mean,
                              prompt_messages, rollout, selected_logprobs)
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


REMOTE_CONFIG = """from transformers import PretrainedConfig


class TinyRMConfig(PretrainedConfig):
    model_type = "tinyrm"

    def __init__(self, vocab_size=6400, hidden_size=8, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(**kwargs)
"""

REMOTE_MODELING = """import torch
from torch import nn
from transformers import PreTrainedModel{extra_import}

from .configuration_tinyrm import TinyRMConfig


class TinyRewardModel(PreTrainedModel):
    config_class = TinyRMConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.v_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    def forward(self, input_ids):
        return self.v_head(self.embed(input_ids).mean(dim=1)).squeeze(-1)

    @torch.no_grad()
    def get_score(self, tokenizer, conversation):{extra_call}
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.device)
        return self.forward(ids)[0].item()
"""


def make_remote_code_reward_model(path, tokenizer, extra_import="", extra_call="", seed=0):
    """A reward model that loads only through trust_remote_code, like internlm2-1_8b-reward: its own config.json
    with auto_map, configuration_tinyrm.py and modeling_tinyrm.py (a PreTrainedModel with get_score(tokenizer,
    chat)), safetensors weights and a tokenizer (ours). Score = v_head . mean of the token embeddings.
    Returns (path, embed [V, 8], v_head [1, 8])."""
    from safetensors.torch import save_file
    path.mkdir(parents=True)
    (path / "configuration_tinyrm.py").write_text(REMOTE_CONFIG)
    (path / "modeling_tinyrm.py").write_text(REMOTE_MODELING.format(extra_import=extra_import, extra_call=extra_call))
    tokenizer.save_pretrained(path)
    (path / "config.json").write_text(json.dumps({
        "model_type": "tinyrm", "architectures": ["TinyRewardModel"], "vocab_size": len(tokenizer), "hidden_size": 8,
        "auto_map": {"AutoConfig": "configuration_tinyrm.TinyRMConfig",
                     "AutoModel": "modeling_tinyrm.TinyRewardModel"}}))
    g = torch.Generator().manual_seed(seed)
    embed, v_head = torch.randn(len(tokenizer), 8, generator=g), torch.randn(1, 8, generator=g)
    save_file({"embed.weight": embed, "v_head.weight": v_head}, str(path / "model.safetensors"))
    return path, embed, v_head


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
    # the system turn and the markup alone longer than the budget: one line naming the flag (chat_format's rule)
    with pytest.raises(UserError, match="does not fit --max_seq_len 12: the system prompt"):
        fit_prompt(tok, long, 12)


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


def test_selected_rows_drop_shared_padding_and_score_the_same(tok):
    """Rollout.select (the update's chunks) trims columns that are padding in every chosen row; the log-probs of the
    rows do not change; concat_rollouts re-pads parts into one batch (dynamic sampling)."""
    model = tiny_model()
    torch.manual_seed(0)
    ro = rollout(model, tok, PROMPTS, num_return_sequences=2, max_new_tokens=8, max_prompt_len=200)
    assert ro.truncated.tolist() == [not bool((row == tok.eos_token_id).any()) for row in ro.completion_ids]
    logp, _ = completion_logprobs(model, ro)
    short = ro.select(torch.tensor([0, 1]))  # the short prompt's rows: its left padding goes
    assert short.prompt_len == int(ro.attention_mask[0, :ro.prompt_len].sum()) < ro.prompt_len
    sub_logp, _ = completion_logprobs(model, short)
    n = short.completion_ids.shape[1]
    torch.testing.assert_close(sub_logp, logp[:2, :n], atol=1e-5, rtol=1e-5)
    both = concat_rollouts([short, ro.select(torch.tensor([2, 3]))], pad_id=tok.pad_token_id)
    assert both.prompt_len == ro.prompt_len and both.completions == ro.completions
    again, _ = completion_logprobs(model, both)
    m = both.completion_mask
    torch.testing.assert_close(again * m, logp[:, :again.shape[1]] * m, atol=1e-5, rtol=1e-5)


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


def test_compiled_policy_does_not_recompile_as_lengths_change(tok):
    """Every RL step has new prompt/completion lengths; under --use_compile 1 the policy forward must not recompile
    for each of them (dynamo's recompile limit would then drop it back to eager). After a warm-up that has seen two
    lengths and two batch sizes, new lengths, a 1-token completion and a smaller batch add no compiled frame."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    model = tiny_model()
    counter = CompileCounterWithBackend("eager")  # dynamo's guards decide recompiles; no codegen needed to see them
    compiled = torch.compile(model, backend=counter)
    g = torch.Generator().manual_seed(0)

    def step(n, p, r):
        ids = torch.randint(3, 6400, (n, p + r), generator=g)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # one left-padded prompt
        logp, _ = completion_logprobs(compiled, ids, mask, p, temperature=0.8)  # grad mode on, as in training
        return ids, mask, logp

    try:
        for shape in [(4, 20, 10), (4, 23, 12), (3, 25, 16)]:
            step(*shape)
        warm = counter.frame_count
        for shape in [(4, 30, 7), (4, 40, 1), (2, 33, 9), (4, 50, 40)]:
            ids, mask, logp = step(*shape)
        assert counter.frame_count == warm
        eager, _ = completion_logprobs(model, ids, mask, 50, temperature=0.8)
        torch.testing.assert_close(logp, eager, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ remote-code reward

def test_remote_code_reward_model_loads_like_internlm_and_scores(tok, tmp_path):
    path, embed, v_head = make_remote_code_reward_model(tmp_path / "tinyrm_ok", tok)
    scorer = RewardScorer(rl_args(reward_model_path=str(path), answer_reward=0.0), tok, "cpu")
    # AutoModel.from_pretrained(path, trust_remote_code=True): the class is the folder's own, run from HF's module cache
    assert scorer.rm_kind == "get_score" and type(scorer.rm).__name__ == "TinyRewardModel"
    assert type(scorer.rm).__module__.startswith("transformers_modules.")
    prompts, comps = [PROMPTS[1], PROMPTS[1], PROMPTS[0]], ["Eight.", "3+5=8, and 8+8=16.", "no"]
    r, m = scorer(prompts, comps, ["16"] * 3)
    expected = []
    for p, c in zip(prompts, comps):  # get_score got the prompt's messages + the reply and the folder's tokenizer
        text = tok.apply_chat_template(prompt_messages(p) + [{"role": "assistant", "content": c}], tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        expected.append(float(embed[ids].mean(0) @ v_head[0]))
    assert r.tolist() == pytest.approx([max(-3.0, min(3.0, e)) for e in expected], abs=1e-5)
    assert len(set(r.tolist())) == 3 and m["reward_model"] == pytest.approx(sum(r.tolist()) / 3)


@pytest.mark.parametrize("where", ["import", "call", "package"])
def test_remote_code_failing_under_this_transformers_is_one_message(tok, tmp_path, capsys, where):
    import transformers
    if where == "import":  # a name transformers 5 removed, imported by many 4.x-era model repos
        bad = "from transformers.utils.import_utils import is_torch_fx_available"
        kw = dict(extra_import="\n" + bad)
    elif where == "call":  # an API that changed, hit only when the model runs (InternLM2's forward builds its cache so)
        bad = "DynamicCache.from_legacy_cache(None)"
        kw = dict(extra_import="\nfrom transformers import DynamicCache", extra_call="\n        " + bad)
    else:  # a package this environment lacks
        bad = "import einops_not_installed_here"
        kw = dict(extra_import="\n" + bad)
    path, _, _ = make_remote_code_reward_model(tmp_path / f"tinyrm_{where}", tok, **kw)
    with pytest.raises(UserError) as e:
        RewardScorer(rl_args(reward_model_path=str(path)), tok, "cpu")  # at start-up, before any rollout
    msg = str(e.value)
    if where == "package":
        assert "needs a package this environment lacks" in msg and "einops_not_installed_here" in msg
        assert "pip install" in msg
    else:
        line = [s.strip() for s in (path / "modeling_tinyrm.py").read_text().splitlines()].index(bad) + 1
        assert f"at modeling_tinyrm.py line {line}: {bad}" in msg, msg
        assert f"transformers {transformers.__version__}" in msg
        assert ("is_torch_fx_available" if where == "import" else "from_legacy_cache") in msg
        # the ways out: fix that line, a sequence-classifier reward model, another transformers, no reward model
        for fix in (str(path / "modeling_tinyrm.py"), "ForSequenceClassification", "transformers<5",
                    "--reward_model_path none"):
            assert fix in msg, fix
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ reward source

def test_no_reward_source_is_an_error_at_start_up(tok, tmp_path, capsys):
    from dataset.lm_dataset import RLAIFDataset

    def data(answers):
        f = tmp_path / f"rl_{len(answers)}.jsonl"
        f.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"q{i}"},
                                                           {"role": "assistant", "content": a}]}) + "\n"
                             for i, a in enumerate(answers)))
        return RLAIFDataset(f, tok), str(f)

    words, f = data(["Paris.", "A poem about spring", "空"])
    scorer = RewardScorer(rl_args(), tok, "cpu")  # no reward model, --reasoning 0, answer check on
    with pytest.raises(UserError, match="no reward source") as e:
        check_reward_source(scorer, words, f)
    for part in (f, "none of 3 sampled reference answers", "--reward_model_path", "--reasoning 1", "numeric answer"):
        assert part in str(e.value), part
    # a reward model or format rewards pay something: no error
    check_reward_source(RewardScorer(rl_args(reasoning=1), tok, "cpu"), words, f)
    check_reward_source(RewardScorer(rl_args(), tok, "cpu", reward_model=LengthScore()), words, f)
    capsys.readouterr()
    mixed, f = data(["7", "Paris.", "a", "2.5"])
    check_reward_source(scorer, mixed, f)
    assert "2 of 4 sampled prompts have no numeric reference answer" in capsys.readouterr().out


def test_load_rl_dataset_passes_skip_bad_lines_when_the_flag_exists(tok, monkeypatch):
    import dataset.lm_dataset as lm_dataset
    seen = []
    monkeypatch.setattr(lm_dataset, "RLAIFDataset", lambda path, tokenizer, **kw: seen.append((path, kw)))
    load_rl_dataset(Namespace(data_path="rl.jsonl", max_seq_len=66, skip_bad_lines=1), tok)
    load_rl_dataset(Namespace(data_path="rl.jsonl", max_seq_len=66), tok)  # before the common flag exists
    assert seen == [("rl.jsonl", {"max_length": 66, "skip_bad_lines": 1}), ("rl.jsonl", {"max_length": 66})]
