"""PPO: the loss and GAE against hand computations, ratio 1 / KL 0 before the first update, one update moves the
log-probability the advantage's way, the critic's trunk is the actor's, end-to-end runs (no reward model, an HF
sequence classifier, a get_score object, MoE), resume with critic and old actor restored, DDP under torchrun.

    python -m pytest tests/test_ppo.py -q
"""
import copy
import math
import os
import signal

import pytest
import torch

from conftest import DEMO, TINY, dirs, read_metrics, run_torchrun
from dataset.lm_dataset import RLAIFDataset
from trainer import train_ppo
from trainer.rl_utils import completion_logprobs, frozen_copy, rollout
from trainer.train_ppo import CriticModel, center, gae, ppo_losses
from trainer.trainer_utils import (TrainingStopped, UserError, build_optimizer, init_model, model_config_from_args,
                                   parse_args)

RL = ["--data_path", DEMO / "rlaif.jsonl", "--reasoning", "0", "--max_gen_len", "12", "--batch_size", "2",
      "--log_interval", "1", "--learning_rate", "1e-4", "--critic_learning_rate", "1e-3"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny in-process models: thread hand-offs cost more than they save (30x slower on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ppo_argv(tmp, *extra):
    return [str(a) for a in [*TINY, *dirs(tmp), *RL, *extra]]


def tiny_models(sft_dir):
    """actor (train mode), old actor, reference and critic from the session's tiny full_sft weights."""
    args = parse_args(train_ppo.build_ppo_parser(), [*map(str, TINY), "--save_dir", str(sft_dir / "out")])
    actor, tok = init_model(model_config_from_args(args), "full_sft", args.tokenizer_path, args.save_dir, "cpu",
                            log=False)
    return actor, frozen_copy(actor), frozen_copy(actor), CriticModel(copy.deepcopy(actor.model)), tok


def demo_rollout(old, tok, n=3, seed=0):
    ds = RLAIFDataset(DEMO / "rlaif.jsonl", tok)
    torch.manual_seed(seed)
    return rollout(old, tok, [ds[i]["prompt"] for i in range(n)], max_new_tokens=10, max_prompt_len=66,
                   temperature=0.8)


# ------------------------------------------------------------------------------------------------ pure functions

def test_ppo_losses_match_a_hand_computation():
    ratios = torch.tensor([[1.3, 0.7], [1.05, 0.5]])
    old = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    logp = (old + ratios.log()).requires_grad_()
    d_ref = torch.tensor([[0.1, -0.2], [0.0, 5.0]])  # ref - logp
    ref = logp.detach() + d_ref
    adv = torch.tensor([[1.0, 1.0], [-2.0, -2.0]])
    values = torch.tensor([[0.5, 0.2], [1.0, 9.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # the last token is padding: 9.0 and ratio 0.5 must not count
    loss, st = ppo_losses(logp, old, ref, adv, values, returns, mask, clip_epsilon=0.1, vf_coef=0.5, kl_coef=0.02)

    # per token max(-A r, -A clip(r, 0.9, 1.1)): (1.3, +1) -> -1.1 clipped; (0.7, +1) -> -0.7; (1.05, -2) -> 2.1
    policy = (-1.1 - 0.7 + 2.1) / 3
    value = (0.5 ** 2 + 0.2 ** 2 + 1.0 ** 2) / 3
    kl = sum(math.exp(d) - d - 1 for d in (0.1, -0.2, 0.0)) / 3
    approx_kl = sum(1 / r + math.log(r) - 1 for r in (1.3, 0.7, 1.05)) / 3  # k3 with d = old - logp = -log r
    assert st["policy_loss"].item() == pytest.approx(policy, abs=1e-6)
    assert st["value_loss"].item() == pytest.approx(value, abs=1e-6)
    assert st["kl_ref"].item() == pytest.approx(kl, abs=1e-6)
    assert st["approx_kl"].item() == pytest.approx(approx_kl, abs=1e-6)
    assert st["clip_frac"].item() == pytest.approx(1 / 3)  # only the (1.3, A > 0) token is clipped
    assert loss.item() == pytest.approx(policy + 0.5 * value + 0.02 * kl, abs=1e-6)
    loss.backward()
    # a clipped token gets no policy gradient (only the KL term's), a masked one none at all
    kl_grad = 0.02 / 3 * (1 - math.exp(0.1))  # d k3 / d logp = 1 - exp(ref - logp)
    assert logp.grad[0, 0].item() == pytest.approx(kl_grad, abs=1e-7)
    assert logp.grad[1, 1].item() == 0.0 and values.grad[1, 1].item() == 0.0
    # no inf/NaN from a wild ratio
    big, _ = ppo_losses(old + 50, old, old, -adv, values, returns, mask, clip_epsilon=0.1, vf_coef=0.5,
                        kl_coef=0.0)
    assert torch.isfinite(big)


def test_gae_with_one_final_reward():
    values = torch.tensor([[0.5, 0.25, 0.1], [0.3, 0.3, 0.3]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards = torch.tensor([2.0, -1.0])
    adv, ret = gae(values, rewards, mask, gamma=1.0, lam=0.5)
    # row 0: delta_1 = 2 - 0.25 = 1.75; delta_0 = 0.25 - 0.5 = -0.25, A_0 = -0.25 + 0.5 * 1.75
    assert torch.allclose(adv[0], torch.tensor([0.625, 1.75, 0.0]))
    assert torch.allclose(ret[0], torch.tensor([1.125, 2.0, 0.0]))
    adv, ret = gae(values, rewards, mask, gamma=1.0, lam=1.0)  # lam 1: A_t = R - V_t, returns = R
    assert torch.allclose(adv, torch.tensor([[1.5, 1.75, 0.0], [-1.3, -1.3, -1.3]]))
    assert torch.allclose(ret, torch.tensor([[2.0, 2.0, 0.0], [-1.0, -1.0, -1.0]]))
    c = center(adv, mask)
    assert abs((c * mask).sum().item()) < 1e-6 and c[0, 2] == 0


# ------------------------------------------------------------------------------------------------ tiny real models

def test_ratio_is_one_and_kl_zero_before_the_first_update_and_critic_shares_the_trunk(sft_copy):
    actor, old, ref, critic, tok = tiny_models(sft_copy)
    assert actor.training and not old.training
    ro = demo_rollout(old, tok)
    assert ro.completion_mask.sum() > 3
    T = 0.8
    with torch.no_grad():
        old_logp, _ = completion_logprobs(old, ro, temperature=T)
        ref_logp, _ = completion_logprobs(ref, ro, temperature=T)
    logp, _ = completion_logprobs(actor, ro, temperature=T)
    assert torch.equal(logp.detach(), old_logp) and torch.equal(logp.detach(), ref_logp)
    values, _ = critic(ro.input_ids, ro.attention_mask, ro.prompt_len)
    assert values.shape == logp.shape and torch.all(values == 0)  # zero-initialised value head
    adv, ret = gae(values.detach(), torch.tensor([1.0, -1.0, 0.5]), ro.completion_mask, 1.0, 1.0)
    _, st = ppo_losses(logp, old_logp, ref_logp, center(adv, ro.completion_mask), values, ret,
                       ro.completion_mask, clip_epsilon=0.1, vf_coef=0.5, kl_coef=0.02)
    assert st["ratio"].item() == 1.0 and st["approx_kl"].item() == 0.0 and st["kl_ref"].item() == 0.0
    assert st["clip_frac"].item() == 0.0
    # the tempered scores are those of the sampling distribution softmax(logits / T)
    plain, _ = completion_logprobs(old, ro)
    assert not torch.allclose(plain, old_logp)

    # critic trunk = actor trunk (same weights, final norm applied once: values are a head on last_hidden_state)
    trunk, actor_trunk = critic.model.state_dict(), actor.model.state_dict()
    assert trunk.keys() == actor_trunk.keys() and all(torch.equal(trunk[k], actor_trunk[k]) for k in trunk)
    with torch.no_grad():
        critic.value_head.weight.normal_()
        h = actor.model(ro.input_ids, attention_mask=ro.attention_mask).last_hidden_state
        v, _ = critic(ro.input_ids, ro.attention_mask, ro.prompt_len)
    assert torch.allclose(v, critic.value_head(h[:, ro.prompt_len - 1:-1]).squeeze(-1), atol=1e-6)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_update_moves_the_completion_logprob_with_the_advantage(sft_copy, sign):
    actor, old, ref, critic, tok = tiny_models(sft_copy)
    ro = demo_rollout(old, tok, n=2, seed=1)
    mask = ro.completion_mask
    with torch.no_grad():
        old_logp, _ = completion_logprobs(old, ro)
    opt = build_optimizer(actor, 1e-3)
    logp, _ = completion_logprobs(actor, ro)
    zeros = torch.zeros_like(logp)
    loss, _ = ppo_losses(logp, old_logp, old_logp, sign * mask, zeros, zeros, mask, clip_epsilon=0.2,
                         vf_coef=0.5, kl_coef=0.0)
    loss.backward()
    opt.step()
    with torch.no_grad():
        new_logp, _ = completion_logprobs(actor, ro)
    before, after = (old_logp * mask).sum(dim=1), (new_logp * mask).sum(dim=1)
    assert torch.all(sign * (after - before) > 0), (before, after)


# ------------------------------------------------------------------------------------------------ end to end

class LengthRM:
    """A reward model object exposing get_score (InternLM style): the reply's length mod 5, minus 2."""
    calls = 0

    def get_score(self, tokenizer, chat):
        assert chat[-1]["role"] == "assistant" and chat[0]["role"] in ("system", "user")
        LengthRM.calls += 1
        return float(len(chat[-1]["content"]) % 5) - 2.0


def test_get_score_reward_and_resume_restores_critic_and_old_actor(sft_copy, monkeypatch, capsys):
    full, part = sft_copy / "full", sft_copy / "part"
    for d in (full, part):
        (d / "out").mkdir(parents=True)
        for f in ("full_sft_64.pth", "full_sft_64.json"):
            (d / "out" / f).write_bytes((sft_copy / "out" / f).read_bytes())
    flags = ["--update_old_actor_freq", "2"]
    LengthRM.calls = 0
    train_ppo.main(ppo_argv(full, *flags, "--max_steps", "5"), reward_model=LengthRM())
    assert LengthRM.calls == 10 and "reward model object LengthRM" in capsys.readouterr().out
    # stop after optimizer step 3 as Ctrl-C would (the same --max_steps 5 keeps the full run's LR schedule): the old
    # actor (synced at step 2) is stale and must come back from the resume file
    step = train_ppo.TrainLoop._optimizer_step

    def stop_after_3(self):
        step(self)
        if self.opt_step + 1 == 3:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(train_ppo.TrainLoop, "_optimizer_step", stop_after_3)
    with pytest.raises(TrainingStopped):
        train_ppo.main(ppo_argv(part, *flags, "--max_steps", "5"), reward_model=LengthRM())
    monkeypatch.setattr(train_ppo.TrainLoop, "_optimizer_step", step)
    saved = torch.load(part / "checkpoints" / "ppo_actor_64_resume.pth", weights_only=True)
    assert set(saved["optimizer"]) == {"actor", "critic"} and {"critic", "old_actor"} <= set(saved)
    assert saved["critic"]["value_head.weight"].abs().sum() > 0  # the critic trained, so restoring it matters

    seen = {}

    class SpyLoop(train_ppo.TrainLoop):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen["critic"] = copy.deepcopy(kw["resume_objects"]["critic"].state_dict())
            seen["old_actor"] = copy.deepcopy(kw["resume_objects"]["old_actor"].state_dict())
            seen["critic_opt"] = copy.deepcopy(kw["optimizer"]["critic"].state_dict())

    monkeypatch.setattr(train_ppo, "TrainLoop", SpyLoop)
    train_ppo.main(ppo_argv(part, *flags, "--max_steps", "5", "--from_resume", "1"), reward_model=LengthRM())
    for name in ("critic", "old_actor"):
        assert all(torch.equal(seen[name][k], saved[name][k]) for k in saved[name]), name
    assert torch.equal(seen["critic"]["value_head.weight"], saved["critic"]["value_head.weight"])
    exp_avg = [s["exp_avg"] for s in seen["critic_opt"]["state"].values()]
    saved_avg = [s["exp_avg"] for s in saved["optimizer"]["critic"]["state"].values()]
    assert len(exp_avg) == len(saved_avg) > 0 and all(torch.equal(x, y) for x, y in zip(exp_avg, saved_avg))

    # sampling is seeded per step, so the resumed run equals the uninterrupted one, critic included
    rows_full, rows_part = read_metrics(full, "ppo_actor"), read_metrics(part, "ppo_actor")
    assert [r["global_step"] for r in rows_part] == [1, 2, 3, 4, 5]
    for a, b in zip(rows_full, rows_part):
        assert a["reward"] == b["reward"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    for r in rows_full:
        for k in ("reward", "reward_std", "kl_ref", "approx_kl", "clip_frac", "advantage_mean", "advantage_std",
                  "value_mean", "policy_loss", "value_loss", "completion_len", "lr", "grad_norm_critic"):
            assert math.isfinite(r[k]), k
    assert rows_full[0]["kl_ref"] == 0 and rows_full[0]["approx_kl"] == 0 and rows_full[0]["clip_frac"] == 0
    a = torch.load(full / "checkpoints" / "ppo_actor_64_resume.pth", weights_only=True)
    b = torch.load(part / "checkpoints" / "ppo_actor_64_resume.pth", weights_only=True)
    for name in ("model", "critic", "old_actor"):
        assert all(torch.allclose(a[name][k], b[name][k], atol=1e-6) for k in a[name]), name


def test_runs_without_reward_model_with_reasoning_rewards_and_moe(tmp_path, capsys, monkeypatch):
    # a random MoE policy: exercises the aux losses of actor and critic; rule-based rewards only
    calls = []
    from trainer import rl_utils
    for module in (train_ppo, rl_utils):  # the update's forward, and pi_old / reference in rl_utils.frozen_logprobs
        monkeypatch.setattr(module, "completion_logprobs",
                            lambda model, *a, **kw: calls.append(model) or completion_logprobs(model, *a, **kw))
    train_ppo.main(ppo_argv(tmp_path, "--max_steps", "3", "--reasoning", "1", "--use_moe", "1",
                            "--from_weight", "none", "--reward_model_path", "none", "--update_old_actor_freq", "2"))
    # log-prob forwards: actor + reference, and the old actor only in step 2, where it lags the actor by one update
    # (steps 1 and 3 follow a sync, so the actor's own log-probs are reused)
    assert len(calls) == 2 + 3 + 2
    rows = read_metrics(tmp_path, "ppo_actor", moe=True)
    assert [r["global_step"] for r in rows] == [1, 2, 3] and "reward_model" not in rows[-1]
    assert rows[0]["ratio"] == 1.0 and rows[0]["approx_kl"] == 0.0 and rows[0]["kl_ref"] == 0.0
    assert "reward_format" in rows[-1] and rows[-1]["aux_loss"] > 0 and math.isfinite(rows[-1]["loss"])
    assert "no reward model" in capsys.readouterr().out
    with pytest.raises(UserError, match="update_old_actor_freq"):
        train_ppo.main(ppo_argv(tmp_path, "--update_old_actor_freq", "0"))


def test_torchrun_two_ranks_with_a_sequence_classifier_reward_model(sft_copy):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from conftest import ROOT
    rm_dir = sft_copy / "tiny_rm"
    tok = AutoTokenizer.from_pretrained(ROOT / "model")
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id, max_position_embeddings=512))
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    out = run_torchrun("trainer/train_ppo.py", *ppo_argv(sft_copy, "--max_steps", "2", "--reward_model_path",
                                                         rm_dir), tmp=sft_copy, timeout=180)
    assert "weights identical on all 2 ranks" in out and "loaded reward model" in out
    rows = read_metrics(sft_copy, "ppo_actor")
    assert [r["global_step"] for r in rows] == [1, 2] and all("reward_model" in r for r in rows)
    saved = torch.load(sft_copy / "checkpoints" / "ppo_actor_64_resume.pth", weights_only=True)
    assert saved["world_size"] == 2 and "value_head.weight" in saved["critic"]


def test_value_clipping_by_hand():
    values = torch.tensor([[0.5, 0.0], [1.0, 3.0]], requires_grad=True)
    old_values = torch.tensor([[0.2, 0.0], [0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    zeros = torch.zeros(2, 2)
    loss, st = ppo_losses(zeros, zeros, None, zeros, values, returns, mask, clip_epsilon=0.2, vf_coef=1.0,
                          kl_coef=0.0, old_values=old_values, cliprange_value=0.1)
    # token (0,0): V 0.5 moved 0.3 from V_old 0.2, clipped to 0.3: max((0.5-1)^2, (0.3-1)^2) = 0.49 (clipped side);
    # (0,1): V = V_old: 1.0 either way; (1,0): V 1.0 clipped to 0.1: max(1.0, 0.01) = 1.0 (unclipped side)
    assert st["value_loss"].item() == pytest.approx((0.49 + 1.0 + 1.0) / 3, rel=1e-6)
    assert st["value_clip_frac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # the clipped token gets no value gradient; the others 2 (V - G) / 3
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 2 * -1.0 / 3], [2 * 1.0 / 3, 0.0]]))
    unclipped, _ = ppo_losses(zeros, zeros, None, zeros, values, returns, mask, clip_epsilon=0.2, vf_coef=1.0,
                              kl_coef=0.0, old_values=old_values, cliprange_value=0.0)
    assert unclipped.item() == pytest.approx((0.25 + 1.0 + 1.0) / 3, rel=1e-6)


def test_update_iters_with_kl_early_stop(tmp_path, monkeypatch):
    """--ppo_update_iters 2: the 2nd update of each rollout batch has a ratio != 1; with --early_stop_kl below its
    KL that update is skipped (counted as a step, logged as kl_stop), and only the first updates are applied."""
    applied = {}
    finish = train_ppo.TrainLoop.finish

    def spy_finish(self):
        applied[len(applied)] = self.updates
        finish(self)
    monkeypatch.setattr(train_ppo.TrainLoop, "finish", spy_finish)
    common = ["--max_steps", "4", "--ppo_update_iters", "2", "--from_weight", "none", "--reward_model_path", "none",
              "--reasoning", "1", "--learning_rate", "1e-2", "--critic_learning_rate", "1e-2", "--kl_coef", "0"]
    train_ppo.main(ppo_argv(tmp_path / "a", *common), reward_model=LengthRM())
    rows = read_metrics(tmp_path / "a", "ppo_actor")
    assert rows[0]["approx_kl"] == 0.0 and rows[0]["ratio"] == 1.0 and rows[0]["value_clip_frac"] == 0.0
    assert rows[1]["approx_kl"] > 0 and rows[1]["ratio"] != 1.0 and "kl_stop" not in rows[1]
    assert applied[0] == 4
    train_ppo.main(ppo_argv(tmp_path / "b", *common, "--early_stop_kl", "1e-12"), reward_model=LengthRM())
    rows = read_metrics(tmp_path / "b", "ppo_actor")
    assert [("kl_stop" in r) for r in rows] == [False, True, False, True]
    assert applied[1] == 2
