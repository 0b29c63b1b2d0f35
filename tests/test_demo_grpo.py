"""The held-out GRPO demo's task (dataset/demo/make_demo.py addition_*): worked traces that the RL rewards accept,
train and held-out operand pairs disjoint in either order, the same files every time, and the demo's table mode.

    python -m pytest tests/test_demo_grpo.py -q
"""
import json
import random
import sys

from conftest import DEMO, ROOT, run_script
from transformers import AutoTokenizer
from trainer.answer_eval import reference_answer
from trainer.rl_utils import answer_reward, format_reward

sys.path.insert(0, str(DEMO))
import make_demo  # noqa: E402


def test_trace_is_right_and_well_formed():
    assert make_demo.column_trace(37, 45) == \
        "<think>\n3,7+4,5\n7+5=12\n3+4+1=8\n8,2\n</think>\n<answer>\n82\n</answer>"
    assert make_demo.column_trace(99, 99).endswith("9+9+1=19\n1,9,8\n</think>\n<answer>\n198\n</answer>")
    assert make_demo.column_trace(10, 20) == "<think>\n1,0+2,0\n0+0=0\n1+2+0=3\n3,0\n</think>\n<answer>\n30\n</answer>"
    rng = random.Random(3)
    text = make_demo.column_text(rng, 10, 20)
    question, trace = text.split("\n", 1)
    assert trace == make_demo.column_trace(10, 20) and "10" in question and "20" in question
    for a, b in [(10, 10), (55, 45), (99, 11), (48, 67)]:
        trace = make_demo.column_trace(a, b)
        assert format_reward(trace) == 1.5  # the reasoning format reward's maximum
        assert answer_reward(trace, str(a + b)) == 1.0 and reference_answer(trace) == str(a + b)


def test_trace_spells_the_operands_in_single_digit_tokens():
    # the reason for the trace's first line: the repo tokenizer keeps most two-digit operands as one token
    # ("45", " 45"), so the model reads their digits only where the trace spells them, one token each
    tok = AutoTokenizer.from_pretrained(str(ROOT / "model"))
    assert len(tok("What is 45 plus 37?")["input_ids"]) == 6
    first_line = make_demo.column_trace(45, 37).split("\n")[1]
    pieces = [tok.decode([i]) for i in tok(first_line)["input_ids"]]
    assert pieces == ["4", ",", "5", "+", "3", ",", "7"]


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
