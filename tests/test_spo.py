"""SPO: the adaptive Beta baseline tracker against hand computations (kl and constant rho, reward normalisation in
[0, 1]), its state round trip; the script runs under torchrun (tiny classifier reward model), resumes in one process
with the tracker state it saved, runs in-process with a get_score object, and stops before training when no reward
could ever be paid (no reward model, --reasoning 0, answers no rule can check).

    python -m pytest tests/test_spo.py -q
"""
import json

import pytest
import torch

from conftest import DEMO, ROOT, TINY, dirs, read_metrics, run_torchrun
from test_rl_utils import LengthScore, make_reward_model, run_main_in_process
from trainer import train_spo
from trainer.train_spo import AutoAdaptiveValueTracker
from trainer.trainer_utils import UserError, load_tokenizer

RL = ["--data_path", str(DEMO / "rlaif.jsonl"), "--max_gen_len", "10", "--batch_size", "2", "--learning_rate",
      "1e-4", "--log_interval", "1", "--save_interval", "1", "--accumulation_steps", "1"]


def _batch(rewards, mean_logp):
    logps = torch.full((len(rewards), 3), float(mean_logp))
    mask = torch.tensor([[1.0, 1.0, 0.0]] * len(rewards))
    logps[:, 2] = 123.0  # masked out: must not count
    return torch.tensor(rewards), logps, mask


def test_tracker_kl_mode_by_hand():
    t = AutoAdaptiveValueTracker((0.0, 1.0), rho_mode="kl", rho_const=0.9, D_half=0.06)
    assert t.alpha == t.beta == 1.0 and t.baseline() == 0.5
    assert t.update(*_batch([1.0, 0.0], -1.0)) == 0.9  # first update: rho_const
    assert (t.alpha, t.beta) == pytest.approx((0.9 + 0.5, 0.9 + 0.5))
    rho = t.update(*_batch([1.0, 1.0], -1.03))  # |delta mean logp| = 0.03 = D_half / 2
    assert rho == pytest.approx(2 ** -0.5, rel=1e-5)
    assert (t.alpha, t.beta) == pytest.approx((rho * 1.4 + 1.0, rho * 1.4), rel=1e-5)
    assert t.baseline() == pytest.approx(t.alpha / (t.alpha + t.beta))
    assert t.update(*_batch([0.0], -3.0)) == 0.5  # a big change is clipped to clip_lower
    t.update(*_batch([0.0], -3.0))
    assert t.rho == 0.96  # no change is clipped to clip_upper


def test_tracker_constant_mode_and_normalisation():
    t = AutoAdaptiveValueTracker((-3.0, 5.5), rho_mode="constant", rho_const=0.8)
    # rewards at and beyond the bounds normalise into [0, 1] (reference §7 item 31: r~ could exceed 1)
    assert t.normalize(torch.tensor([-3.0, 5.5, 1.25, 9.0])).tolist() == [0.0, 1.0, 0.5, 1.0]
    t.update(*_batch([5.5, 1.25], -1.0))
    assert (t.alpha, t.beta) == pytest.approx((0.8 + 0.75, 0.8 + 0.25))
    t.update(*_batch([-3.0], -9.0))
    assert t.rho == 0.8 and (t.alpha, t.beta) == pytest.approx((0.8 * 1.55, 0.8 * 1.05 + 1.0))
    assert t.baseline_reward() == pytest.approx(-3.0 + 8.5 * t.baseline())


def test_tracker_state_round_trip():
    t = AutoAdaptiveValueTracker((0.0, 2.0))
    t.update(*_batch([2.0, 0.5], -0.7))
    u = AutoAdaptiveValueTracker((0.0, 2.0))
    u.load_state_dict(t.state_dict())
    assert u.state_dict() == t.state_dict()
    t.update(*_batch([1.0], -0.71))
    u.update(*_batch([1.0], -0.71))
    assert u.state_dict() == t.state_dict()
    with pytest.raises(UserError, match="reward range"):
        AutoAdaptiveValueTracker((-3.0, 3.0)).load_state_dict(t.state_dict())


def test_torchrun_with_classifier_reward_model_then_resume_keeps_tracker(sft_copy, monkeypatch, capsys):
    tok = load_tokenizer(str(ROOT / "model"))
    rm = make_reward_model(sft_copy / "rm", tok)
    # --from_weight none: the ranks' random inits differ, DDP hands the policy rank 0's; the reference must follow
    common = [*TINY, *dirs(sft_copy), *RL, "--reasoning", "1", "--from_weight", "none", "--reward_model_path", rm]
    out = run_torchrun("trainer/train_spo.py", *common, "--max_steps", "2", tmp=sft_copy)
    assert "weights identical on all 2 ranks" in out and "loaded reward model" in out
    rows = read_metrics(sft_copy, "spo")
    assert rows[0]["kl"] == 0.0  # first step: policy == reference on both ranks
    for key in ("reward", "reward_std", "reward_model", "reward_format", "reward_answer", "kl", "rho", "baseline",
                "advantage_mean", "completion_len", "policy_loss", "aux_loss", "lr", "tokens_per_s"):
        assert key in rows[0], key
    assert rows[0]["baseline"] == 0.5 and rows[0]["rho"] == pytest.approx(0.9)

    saved = torch.load(sft_copy / "checkpoints" / "spo_64_resume.pth", weights_only=True)["tracker"]
    assert saved["alpha"] != 1.0 and saved["reward_range"] == [-3.0, 5.5]
    run_main_in_process(train_spo, monkeypatch, *common, "--from_resume", "1", "--max_steps", "3")
    assert "resumed from" in capsys.readouterr().out
    rows = read_metrics(sft_copy, "spo")
    # the resumed step's advantage used the saved baseline (logged before this step's update)
    assert rows[-1]["global_step"] == 3
    assert rows[-1]["baseline"] == pytest.approx(saved["alpha"] / (saved["alpha"] + saved["beta"]), rel=1e-6)


def test_in_process_with_get_score_object_no_reasoning(sft_copy, monkeypatch):
    rm = LengthScore()
    run_main_in_process(train_spo, monkeypatch, *TINY, *dirs(sft_copy), *RL, "--reasoning", "0", "--rho_mode",
                        "constant", "--max_steps", "2", reward_model=rm)
    assert len(rm.chats) == 2 * 2
    rows = read_metrics(sft_copy, "spo")
    assert len(rows) == 2 and rows[1]["rho"] == pytest.approx(0.9) and "reward_format" not in rows[0]
    state = torch.load(sft_copy / "checkpoints" / "spo_64_resume.pth", weights_only=True)["tracker"]
    assert state["reward_range"] == [-3.0, 4.0]


def test_without_reward_model_on_demo_prompts(sft_copy, monkeypatch, capsys):
    run_main_in_process(train_spo, monkeypatch, *TINY, *dirs(sft_copy), *RL, "--reasoning", "0", "--max_steps", "2")
    assert "rule-based rewards only" in capsys.readouterr().out  # the default reward model path is absent here
    rows = read_metrics(sft_copy, "spo")
    assert len(rows) == 2 and "reward_model" not in rows[0] and 0 <= rows[0]["reward_answer"] <= 1


def test_no_reward_source_stops_before_training(sft_copy, monkeypatch):
    data = sft_copy / "open_questions.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": "空"}]}) + "\n"
                            for q in ("Write a poem.", "Tell me about Paris.", "Say hi.")))
    flags = [*TINY, *dirs(sft_copy), *RL, "--data_path", data, "--reasoning", "0", "--max_steps", "1"]
    with pytest.raises(UserError, match="no reward source") as e:
        run_main_in_process(train_spo, monkeypatch, *flags, "--reward_model_path", "none")
    assert "--reasoning 1" in str(e.value) and "--reward_model_path" in str(e.value)
    assert not (sft_copy / "checkpoints").exists() and not (sft_copy / "out" / "spo_64.pth").exists()
