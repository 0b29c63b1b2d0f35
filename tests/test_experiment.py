"""scripts/experiment.py's bookkeeping: the held-out split, bpb at equal wall-clock, the optimizer verdict.

    python -m pytest tests/test_experiment.py -q

(The experiment itself runs the real trainer for minutes; its measured tables are in README.md / docs.)
"""
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import experiment  # noqa: E402


def test_split_holds_out_the_last_records_byte_for_byte(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"}\n{"text": "d"}\n', encoding="utf-8")
    train, held = experiment.split_data(src, 2, tmp_path / "w")
    assert train.read_text() == '{"text": "a"}\n{"text": "b"}\n'
    assert held.read_text() == '{"text": "c"}\n{"text": "d"}\n'
    with pytest.raises(SystemExit, match="--heldout 4 must be between 1 and 3"):
        experiment.split_data(src, 4, tmp_path / "w")


def test_bpb_at_time_interpolates_between_evaluations():
    evals = [{"train_s": 10.0, "eval_bpb": 3.0}, {"train_s": 20.0, "eval_bpb": 2.0}, {"train_s": 40.0, "eval_bpb": 1.0}]
    assert experiment.bpb_at_time(evals, 15.0) == pytest.approx(2.5)
    assert experiment.bpb_at_time(evals, 35.0) == pytest.approx(1.25)
    assert experiment.bpb_at_time(evals, 40.0) == 1.0 and experiment.bpb_at_time(evals, 99.0) == 1.0
    assert experiment.bpb_at_time(evals, 5.0) == 3.0  # before the first evaluation: the first


def run(arm, seed, points):
    return {"arm": arm, "seed": seed, "evals": [{"train_s": t, "eval_bpb": b} for t, b in points]}


def test_optimizer_verdict_compares_at_equal_tokens_and_at_the_faster_arms_time():
    # seed 1: muon lower at the end (same tokens) but slower: at adamw's 100 s muon is at 2.2 > adamw's 2.0
    # seed 2: muon lower at the end and at adamw's time
    runs = [run("adamw", 1, [(50, 3.0), (100, 2.0)]), run("muon", 1, [(100, 2.4), (200, 1.8)]),
            run("adamw", 2, [(50, 3.0), (100, 2.0)]), run("muon", 2, [(60, 2.5), (120, 1.5)])]
    runs[1]["evals"].insert(1, {"train_s": 150, "eval_bpb": 2.0})
    table, verdict = experiment.optimizer_table(runs)
    assert verdict[1]["T"] == 100 and verdict[1]["at_T"]["muon"] == pytest.approx(2.4)
    assert verdict[1]["muon_wins_equal_tokens"] and not verdict[1]["muon_wins_equal_time"]
    assert verdict[2]["T"] == 100 and verdict[2]["at_T"]["muon"] == pytest.approx(2.5 + (1.5 - 2.5) * 40 / 60)
    assert verdict[2]["muon_wins_equal_tokens"] and verdict[2]["muon_wins_equal_time"]
    assert "| 1 | muon | 1.8000 | 200 | 2.4000 | 100 |" in table
