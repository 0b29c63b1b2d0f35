"""The held-out GRPO demo's task (dataset/demo/make_demo.py addition_*): worked traces that the RL rewards accept,
train and held-out operand pairs disjoint in either order, the same files every time, and the demo's table mode.

    python -m pytest tests/test_demo_grpo.py -q
"""
import json
import sys

from conftest import DEMO, run_script
from trainer.answer_eval import reference_answer
from trainer.rl_utils import answer_reward, format_reward

sys.path.insert(0, str(DEMO))
import make_demo  # noqa: E402


def test_trace_is_right_and_well_formed():
    assert make_demo.column_trace(37, 45) == \
        "<think>\n7+5=12, carry 1\n3+4+1=8\n</think>\n<answer>\n82\n</answer>"
    assert make_demo.column_trace(99, 99).endswith("9+9+1=19\n</think>\n<answer>\n198\n</answer>")
    assert make_demo.column_text(10, 20) == "10+20: 0+0=0, carry 0; 1+2+0=3; so 10+20=30."
    for a, b in [(10, 10), (55, 45), (99, 11), (48, 67)]:
        trace = make_demo.column_trace(a, b)
        assert format_reward(trace) == 1.5  # the reasoning format reward's maximum
        assert answer_reward(trace, str(a + b)) == 1.0 and reference_answer(trace) == str(a + b)


def test_splits_are_disjoint_complete_and_fixed():
    train, held = make_demo.addition_splits(150)
    key = {(min(a, b), max(a, b)) for a, b in held}
    assert len(key) == 150 and not any((min(a, b), max(a, b)) in key for a, b in train)
    assert len(train) + len(held) == 90 * 90 and len(set(train)) == len(train)
    assert all((b, a) in set(held) for a, b in held)  # both orders held out
    assert make_demo.addition_splits(150) == (train, held)  # the same split every time


def test_report_mode_prints_the_table(tmp_path):
    for seed, (sft, grpo, rec) in {1: (0.2, 0.35, 0.4), 2: (0.3, 0.4, 0.5)}.items():
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "result.json").write_text(json.dumps(
            {"seed": seed, "full_sft": sft, "grpo": grpo, "recommended": rec,
             "seconds": {"pretrain+sft": 10, "grpo": 20, "recommended": 30}}))
    out = run_script("scripts/demo_grpo_reward.py", "--workdir", tmp_path, "--report", "--heldout_pairs", "150",
                     tmp=tmp_path).stdout
    assert "| 1 | 0.200 | 0.350 | 0.400 | 10, 20, 30 |" in out
    assert "| mean (spread) | 0.250 (0.100) | 0.375 (0.050) | 0.450 (0.100) | |" in out
    assert "grpo: held-out greedy accuracy 0.250 -> 0.375 (+12.5 points, mean of 2 seed(s))" in out
    held = [json.loads(x) for x in (tmp_path / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 297 and all(r["conversations"][-1]["content"].isdigit() for r in held)
