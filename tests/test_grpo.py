"""GRPO: advantages, k3 KL and the loss against hand computations; one update moves a completion's log-prob the
way its advantage says; the script runs under torchrun (tiny classifier reward model), resumes in one process
(no reward model), and runs in-process with a get_score object, all on the demo RL prompts.

    python -m pytest tests/test_grpo.py -q
"""
import math

import pytest
import torch

from conftest import DEMO, ROOT, TINY, dirs, read_metrics, run_script, run_torchrun
from test_rl_utils import PROMPTS, LengthScore, make_reward_model, run_main_in_process, tiny_model
from trainer import train_grpo
from trainer.rl_utils import completion_logprobs, frozen_copy, k3_kl, policy_kl_loss, rollout
from trainer.trainer_utils import build_optimizer, load_tokenizer

RL = ["--data_path", str(DEMO / "rlaif.jsonl"), "--max_gen_len", "10", "--num_generations", "3", "--batch_size",
      "2", "--learning_rate", "1e-4", "--log_interval", "1", "--save_interval", "1"]


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    a = train_grpo.group_advantages(r, 4)
    s3 = math.sqrt((2.25 ** 2 + 3 * 0.75 ** 2) / 4)  # population std of [3, 0, 0, 0] (mean 0.75)
    expected = [0.5 / (0.5 + 1e-4), -0.5 / (0.5 + 1e-4), -0.5 / (0.5 + 1e-4), 0.5 / (0.5 + 1e-4), 0, 0, 0, 0,
                2.25 / (s3 + 1e-4), -0.75 / (s3 + 1e-4), -0.75 / (s3 + 1e-4), -0.75 / (s3 + 1e-4)]
    assert a.tolist() == pytest.approx(expected, rel=1e-6)
    assert train_grpo.group_advantages(torch.tensor([0.3, 2.0]), 1).tolist() == [0.0, 0.0]


def test_k3_and_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, -0.1], [-0.2, -2.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, beta = torch.tensor([0.7, -1.3]), 0.1
    k3 = [[math.exp(r - l) - (r - l) - 1 for l, r in zip(lr, rr)] for lr, rr in zip(logp.tolist(), ref.tolist())]
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor(k3), rtol=1e-6, atol=1e-7)
    n = [3, 2]
    per_seq = [sum(-(adv[i].item() - beta * k3[i][j]) for j in range(n[i])) / n[i] for i in range(2)]
    loss, kl = policy_kl_loss(logp, ref, adv, mask, beta)
    assert loss.item() == pytest.approx(sum(per_seq) / 2, rel=1e-6)
    assert kl.item() == pytest.approx((sum(k3[0]) / 3 + sum(k3[1][:2]) / 2) / 2, rel=1e-6)
    loss.backward()
    # d/dlogp of -(A * ratio - beta * k3) with ratio = exp(logp - sg(logp)): -A + beta * (1 - exp(ref - logp))
    grad = [[(-adv[i].item() + beta * (1 - math.exp(ref[i, j].item() - logp[i, j].item()))) / n[i] / 2
             if mask[i, j] else 0.0 for j in range(3)] for i in range(2)]
    torch.testing.assert_close(logp.grad, torch.tensor(grad), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_one_update_moves_logprob_with_the_advantage(advantage):
    tok = load_tokenizer(str(ROOT / "model"))
    model = tiny_model(seed=1)
    ref = frozen_copy(model)
    ro = rollout(model, tok, PROMPTS[:1], num_return_sequences=1, max_new_tokens=6, max_prompt_len=200)
    opt = build_optimizer(model, 1e-3)
    logp, _ = completion_logprobs(model, ro)
    with torch.no_grad():
        ref_logp, _ = completion_logprobs(ref, ro)
    loss, _ = policy_kl_loss(logp, ref_logp, torch.tensor([advantage]), ro.completion_mask, beta=0.02)
    loss.backward()
    opt.step()
    with torch.no_grad():
        after, _ = completion_logprobs(model, ro)
    m = ro.completion_mask
    delta = ((after - logp.detach()) * m).sum().item()
    assert delta * advantage > 0, delta


def test_torchrun_with_classifier_reward_model_then_resume_without(sft_copy):
    tok = load_tokenizer(str(ROOT / "model"))
    rm = make_reward_model(sft_copy / "rm", tok)
    out = run_torchrun("trainer/train_grpo.py", *TINY, *dirs(sft_copy), *RL, "--reasoning", "0",
                       "--reward_model_path", rm, "--max_steps", "2", tmp=sft_copy)
    assert "weights identical on all 2 ranks" in out and "loaded reward model" in out
    rows = read_metrics(sft_copy, "grpo")
    assert [r["global_step"] for r in rows] == [1, 2]
    for key in ("reward", "reward_std", "reward_model", "reward_answer", "kl", "advantage_mean", "advantage_std",
                "completion_len", "policy_loss", "aux_loss", "lr", "tokens_per_s"):
        assert key in rows[0], key
    assert all(0 < r["completion_len"] <= 10 for r in rows)
    assert all(abs(r["reward_model"]) <= 3 for r in rows)
    assert (sft_copy / "out" / "grpo_64.pth").exists()

    # resume on one process (another world size), now without a reward model
    proc = run_script("trainer/train_grpo.py", *TINY, *dirs(sft_copy), *RL, "--reasoning", "0",
                      "--reward_model_path", "none", "--from_resume", "1", "--max_steps", "3", tmp=sft_copy)
    assert "resumed from" in proc.stdout and "no reward model" in proc.stdout
    rows = read_metrics(sft_copy, "grpo")
    assert rows[-1]["global_step"] == 3 and "reward_model" not in rows[-1]


def test_in_process_with_get_score_object_and_reasoning(sft_copy, monkeypatch):
    rm = LengthScore()
    run_main_in_process(train_grpo, monkeypatch, *TINY, *dirs(sft_copy), *RL, "--reasoning", "1", "--from_weight",
                        "full_sft", "--max_steps", "2", reward_model=rm)
    assert len(rm.chats) >= 2 * 2 * 3  # every completion of both steps was scored
    rows = read_metrics(sft_copy, "grpo")
    assert len(rows) == 2 and {"reward_format", "reward_model", "reward_answer"} <= set(rows[0])
    assert (sft_copy / "out" / "grpo_64.pth").exists()
