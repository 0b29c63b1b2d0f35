"""GRPO: advantages, k3 KL and the loss against hand computations; with --num_generations 1 the batch of all ranks
is the baseline and rewards reach the gradient; one update moves a completion's log-prob the way its advantage
says; the user's command shape (--num_generations 1 --reasoning 0, a trust_remote_code reward model with get_score)
runs under torchrun and resumes on one process without the reward model; and the script runs in-process with a
get_score object and groups of 3, all on the demo RL prompts.

    python -m pytest tests/test_grpo.py -q
"""
import math
import threading

import pytest
import torch

from conftest import DEMO, ROOT, TINY, dirs, read_metrics, run_torchrun, signal_after_step
from test_rl_utils import PROMPTS, LengthScore, make_remote_code_reward_model, run_main_in_process, tiny_model
from trainer import train_grpo
from trainer.rl_objectives import policy_objective
from trainer.rl_utils import completion_logprobs, frozen_copy, k3_kl, rollout
from trainer.trainer_utils import TrainingStopped, UserError, build_optimizer, load_tokenizer



def policy_kl_loss(logps, ref_logps, advantages, mask, beta):
    """--loss_type grpo with one update per rollout (pi_old = sg(pi)): the objective before --loss_type."""
    loss, st = policy_objective(logps, logps.detach(), advantages, mask, loss_type="grpo", ref_logp=ref_logps,
                                beta=beta)
    return loss, st["kl"]


RL = ["--data_path", str(DEMO / "rlaif.jsonl"), "--max_gen_len", "10", "--num_generations", "3", "--batch_size",
      "2", "--learning_rate", "1e-4", "--log_interval", "1", "--save_interval", "1"]


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    a = train_grpo.group_advantages(r, 4)
    s3 = math.sqrt((2.25 ** 2 + 3 * 0.75 ** 2) / 4)  # population std of [3, 0, 0, 0] (mean 0.75)
    expected = [0.5 / (0.5 + 1e-4), -0.5 / (0.5 + 1e-4), -0.5 / (0.5 + 1e-4), 0.5 / (0.5 + 1e-4), 0, 0, 0, 0,
                2.25 / (s3 + 1e-4), -0.75 / (s3 + 1e-4), -0.75 / (s3 + 1e-4), -0.75 / (s3 + 1e-4)]
    assert a.tolist() == pytest.approx(expected, rel=1e-6)
    assert train_grpo.group_advantages(torch.tensor([0.3, 2.0]), 1).tolist() == [0.0, 0.0]  # why G=1 needs more


def test_batch_advantages_with_one_generation_use_all_ranks():
    a, mean, std = train_grpo.batch_advantages(torch.tensor([1.0, 0.0]))  # one process
    assert a.tolist() == pytest.approx([0.5 / (0.5 + 1e-4), -0.5 / (0.5 + 1e-4)]) and (mean, std) == (0.5, 0.5)

    # two ranks (threads sharing an in-place summing all_reduce): the baseline is over all four completions
    per_rank, slots, out = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.5])], [None, None], [None, None]
    barrier = threading.Barrier(2, timeout=10)

    def all_reduce(t, rank):
        slots[rank] = t.clone()
        barrier.wait()
        t.copy_(slots[0] + slots[1])
        barrier.wait()

    threads = [threading.Thread(target=lambda k=k: out.__setitem__(
        k, train_grpo.batch_advantages(per_rank[k], all_reduce=lambda t: all_reduce(t, k)))) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = torch.tensor([1.0, 0.0, 3.0, 0.5])
    m, s = every.mean().item(), every.std(unbiased=False).item()
    torch.testing.assert_close(torch.cat([out[0][0], out[1][0]]), (every - m) / (s + 1e-4))
    assert out[0][1].item() == out[1][1].item() == pytest.approx(m)
    assert out[0][0][0] < 0  # rank 0's best (1.0) is below the global mean 1.125: a local baseline would reward it


def test_with_one_generation_rewards_reach_the_gradient():
    tok = load_tokenizer(str(ROOT / "model"))
    model = tiny_model(seed=1)
    ref = frozen_copy(model)
    ro = rollout(model, tok, PROMPTS, num_return_sequences=1, max_new_tokens=6, max_prompt_len=200)
    rewards = torch.tensor([1.0, 0.0])
    logp, _ = completion_logprobs(model, ro)
    logp.retain_grad()
    with torch.no_grad():
        ref_logp, _ = completion_logprobs(ref, ro)
    adv, _, _ = train_grpo.batch_advantages(rewards)
    assert adv[0] > 0 > adv[1]
    loss, _ = policy_kl_loss(logp, ref_logp, adv, ro.completion_mask, beta=0.02)
    loss.backward()
    # d loss / d logp = -A_i / n_i / N on each completion's tokens (the k3 gradient is 0 while policy == reference)
    m = ro.completion_mask
    torch.testing.assert_close(logp.grad, -adv[:, None] / m.sum(1, keepdim=True) / 2 * m)
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None) > 0


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


def test_user_command_shape_under_torchrun_then_resume_on_one_process(sft_copy, monkeypatch, capsys):
    """The seed's GRPO command: --num_generations 1 --reasoning 0 with a trust_remote_code get_score reward model."""
    tok = load_tokenizer(str(ROOT / "model"))
    rm, _, _ = make_remote_code_reward_model(sft_copy / "tinyrm", tok)
    flags = [*TINY, *dirs(sft_copy), *RL, "--num_generations", "1", "--batch_size", "3", "--reasoning", "0"]
    out = run_torchrun("trainer/train_grpo.py", *flags, "--reward_model_path", rm, "--max_steps", "2", tmp=sft_copy)
    assert "weights identical on all 2 ranks" in out and "loaded reward model" in out
    assert "the batch is the baseline" in out and "the 6 completions of each step on all 2 rank(s)" in out
    rows = read_metrics(sft_copy, "grpo")
    assert [r["global_step"] for r in rows] == [1, 2]
    for key in ("reward", "reward_std", "reward_model", "reward_answer", "kl", "advantage_mean", "advantage_std",
                "baseline", "baseline_std", "completion_len", "policy_loss", "aux_loss", "lr", "tokens_per_s"):
        assert key in rows[0], key
    for r in rows:
        assert 0 < r["completion_len"] <= 10 and abs(r["reward_model"]) <= 3
        # every rank holds the same global baseline; the rank-averaged reward means are that mean too (3 per rank)
        assert r["baseline"] == pytest.approx(r["reward"], abs=1e-5)
        assert r["baseline_std"] > 0 and r["advantage_std"] > 0  # rewards differ, so the advantages are not all 0
    assert (sft_copy / "out" / "grpo_64.pth").exists()

    # resume on one process (another world size), now without a reward model
    run_main_in_process(train_grpo, monkeypatch, *flags, "--reward_model_path", "none", "--from_resume", "1",
                        "--max_steps", "3")
    stdout = capsys.readouterr().out
    assert "resumed from" in stdout and "no reward model" in stdout and "the 3 completions" in stdout
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


def test_one_generation_needs_two_completions_per_step(sft_copy, monkeypatch):
    with pytest.raises(UserError, match="needs >= 2 completions per step"):
        run_main_in_process(train_grpo, monkeypatch, *TINY, *dirs(sft_copy), *RL, "--num_generations", "1",
                            "--batch_size", "1")


def test_beta_0_builds_no_reference_model(sft_copy, monkeypatch, capsys):
    from trainer import rl_utils
    copies = []
    monkeypatch.setattr(rl_utils, "frozen_copy", lambda m: copies.append(m) or frozen_copy(m))
    run_main_in_process(train_grpo, monkeypatch, *TINY, *dirs(sft_copy), *RL, "--reasoning", "0", "--beta", "0",
                        "--max_steps", "1")
    assert copies == [] and "--beta 0: no reference model is built" in capsys.readouterr().out
    run_main_in_process(train_grpo, monkeypatch, *TINY, *dirs(sft_copy), *RL, "--reasoning", "0", "--max_steps", "1")
    assert len(copies) == 1  # the default beta keeps its reference


def test_two_iterations_and_mini_batches_resume_exactly(sft_copy, monkeypatch):
    """mu = 2 passes x 2 mini-batches = 4 optimizer steps per rollout batch; a Ctrl-C after step 2 (inside a rollout
    batch) stops at its boundary (step 4), and the resumed run ends with the uninterrupted run's fp32 weights."""
    full, part = sft_copy / "full", sft_copy / "part"
    for d in (full, part):
        (d / "out").mkdir(parents=True)
        for f in ("full_sft_64.pth", "full_sft_64.json"):
            (d / "out" / f).write_bytes((sft_copy / "out" / f).read_bytes())
    flags = [*TINY, *RL, "--reasoning", "0", "--num_iterations", "2", "--mini_batch_size", "3", "--max_steps", "8",
             "--loss_type", "dapo", "--epsilon", "0.01", "--epsilon_high", "0.01", "--learning_rate", "3e-3"]
    run_main_in_process(train_grpo, monkeypatch, *flags, *dirs(full), reward_model=LengthScore())
    with monkeypatch.context() as m:
        signal_after_step(m, 2)
        with pytest.raises(TrainingStopped):
            run_main_in_process(train_grpo, m, *flags, *dirs(part), reward_model=LengthScore())
    assert torch.load(part / "checkpoints" / "grpo_64_resume.pth", weights_only=True)["opt_step"] == 4
    run_main_in_process(train_grpo, monkeypatch, *flags, *dirs(part), "--from_resume", "1",
                        reward_model=LengthScore())
    a = torch.load(full / "checkpoints" / "grpo_64_resume.pth", weights_only=True)["model"]
    b = torch.load(part / "checkpoints" / "grpo_64_resume.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    rows = read_metrics(full, "grpo")
    assert [r["global_step"] for r in rows] == list(range(1, 9))
    # pi_old is the rollout policy: the first step of each rollout batch has ratio 1 exactly, later ones do not,
    # and with a 0.01 clip range some tokens are clipped
    assert rows[0]["approx_kl"] == 0.0 and rows[0]["ratio"] == 1.0 and rows[4]["ratio"] == 1.0
    assert any(r["ratio"] != 1.0 for r in rows[1:4])
    assert sum(r["clip_ratio_low"] + r["clip_ratio_high"] for r in rows) > 0
    assert all("frac_reward_zero_std" in r for r in rows)
    resumed = read_metrics(part, "grpo")
    assert [r["global_step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]


def test_rollout_is_one_batched_call_on_the_fast_decode_path(sft_copy, monkeypatch):
    from model.model_minimind import MiniMindForCausalLM
    calls = []
    fast = MiniMindForCausalLM._fast_sample

    def spy(self, input_ids, *a, **kw):
        calls.append(input_ids.shape[0])
        return fast(self, input_ids, *a, **kw)
    monkeypatch.setattr(MiniMindForCausalLM, "_fast_sample", spy)
    run_main_in_process(train_grpo, monkeypatch, *TINY, *dirs(sft_copy), *RL, "--reasoning", "0",
                        "--accumulation_steps", "2", "--max_steps", "2")
    assert calls == [2 * 2 * 3, 2 * 2 * 3]  # batch 2 x accumulation 2 prompts x 3 completions, one call per step


@pytest.mark.slow
def test_torchrun_with_the_new_objective_flags(sft_copy):
    flags = [*TINY, *dirs(sft_copy), *RL, "--reasoning", "1", "--from_weight", "full_sft", "--num_generations", "2",
             "--num_iterations", "2", "--mini_batch_size", "2", "--loss_type", "cispo", "--importance_sampling_level",
             "sequence", "--scale_rewards", "batch", "--mask_truncated_completions", "1", "--dynamic_sampling", "1",
             "--beta", "0", "--max_steps", "4"]
    out = run_torchrun("trainer/train_grpo.py", *flags, tmp=sft_copy)
    assert "weights identical on all 2 ranks" in out and "no reference model is built" in out
    assert "4 optimizer steps per rollout batch" in out and "objective cispo, sequence-level ratio" in out
    rows = read_metrics(sft_copy, "grpo")
    assert [r["global_step"] for r in rows] == [1, 2, 3, 4]
    for key in ("clip_ratio_low", "clip_ratio_high", "approx_kl", "frac_reward_zero_std", "dynamic_rounds",
                "truncated"):
        assert key in rows[0], key
    assert rows[0]["approx_kl"] == 0.0


def test_scale_rewards_group_batch_none_by_hand():
    r = torch.tensor([1.0, 0.0, 3.0, 3.0])  # two groups of 2
    group, _ = train_grpo.advantages_of(r, 2, "group")
    assert group.tolist() == pytest.approx([0.5 / (0.5 + 1e-4), -0.5 / (0.5 + 1e-4), 0.0, 0.0])
    none, _ = train_grpo.advantages_of(r, 2, "none")
    assert none.tolist() == [0.5, -0.5, 0.0, 0.0]
    batch, _ = train_grpo.advantages_of(r, 2, "batch")
    std = r.std(unbiased=False).item()  # 1.299: the whole batch's population std
    assert batch.tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0], rel=1e-6)
    one, extra = train_grpo.advantages_of(r, 1, "none")  # a group of one: the batch mean is the baseline
    assert one.tolist() == pytest.approx([-0.75, -1.75, 1.25, 1.25]) and extra["baseline"].item() == 1.75
    assert train_grpo.zero_std_groups(r, 2).tolist() == [False, True]


def test_dynamic_sampling_replaces_all_equal_groups_boundedly():
    from contextlib import nullcontext
    from types import SimpleNamespace

    from trainer.rl_utils import RolloutBatch
    tok = load_tokenizer(str(ROOT / "model"))
    model = tiny_model(seed=1)

    def scorer(prompts, completions, answers):  # "flat" prompts: both samples 0; others: 0 then 1
        return torch.tensor([0.0 if a == "flat" else float(i % 2) for i, a in enumerate(answers)]), {}

    args = SimpleNamespace(num_generations=2, seed=0, max_gen_len=4, max_seq_len=64, temperature=1.0)
    ctx = SimpleNamespace(rank=0, autocast=nullcontext)

    def first_batch():
        ro = rollout(model, tok, PROMPTS, num_return_sequences=2, max_new_tokens=4, max_prompt_len=64)
        return RolloutBatch(ro, torch.tensor([1.0, 0.0, 0.0, 0.0]), {}, ["ok", "ok", "flat", "flat"])

    def fill(answers):
        data = [{"prompt": PROMPTS[0], "answer": a} for a in answers]
        loop = SimpleNamespace(dataset=data, raw_model=model, global_step=0)
        return train_grpo.fill_informative_groups(first_batch(), loop, tok, scorer, args, ctx)

    b, extra = fill(["ok"] * 3)  # one extra round finds an informative group
    assert extra == {"dynamic_rounds": 1.0, "dynamic_short": 0.0}
    assert b.rewards.tolist() == [1.0, 0.0, 0.0, 1.0] and len(b.rollout.completions) == 4
    assert not train_grpo.zero_std_groups(b.rewards, 2).any()
    b, extra = fill(["flat"] * 3)  # nothing informative to draw: 3 rounds, then the dropped group is kept
    assert extra == {"dynamic_rounds": float(train_grpo.DYNAMIC_ROUNDS), "dynamic_short": 1.0}
    assert b.rewards.tolist() == [1.0, 0.0, 0.0, 0.0] and b.answers == ["ok", "ok", "flat", "flat"]


def test_non_finite_updates_inside_a_rollout_batch_are_skipped_then_the_run_stops(sft_copy, monkeypatch, capsys):
    """The NaN guard counts optimizer steps, also the several of one rollout batch: steps 3 and 4 (the 2nd rollout
    batch) and 5 are non-finite -> skipped, and the 3rd in a row stops the run inside the 3rd rollout batch; the
    last save (step 4, at a rollout boundary: the skipped steps left the weights finite) is the good checkpoint."""
    from trainer import rl_utils
    real = rl_utils.policy_objective
    calls = []

    def poisoned(*a, **kw):
        loss, st = real(*a, **kw)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 2 else loss), st
    monkeypatch.setattr(rl_utils, "policy_objective", poisoned)
    with pytest.raises(train_grpo.TrainLoop.__init__.__globals__["TrainingDiverged"]) as e:
        run_main_in_process(train_grpo, monkeypatch, *TINY, *dirs(sft_copy), *RL, "--reasoning", "0",
                            "--num_iterations", "2", "--max_steps", "8", "--save_interval", "2",
                            "--max_bad_steps", "3")
    assert "3 optimizer steps in a row" in str(e.value) and "(step 4)" in str(e.value)
    out = capsys.readouterr().out
    assert out.count("update skipped") == 3 and "step 5: non-finite" in out
    saved = torch.load(sft_copy / "checkpoints" / "grpo_64_resume.pth", weights_only=True)
    assert saved["opt_step"] == 4 and saved["bad_steps"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values())
