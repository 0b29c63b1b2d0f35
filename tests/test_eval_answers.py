"""Held-out answer evaluation: reference answers from plain numbers and traces, greedy pass@1 / pass@k / sampled
accuracy against hand counts (a scripted rollout), the training RNG left untouched, scripts/eval_answers.py end to
end on a tiny model, and a GRPO run with --eval_interval that logs eval_accuracy and ends with the same weights as
one without it.

    python -m pytest tests/test_eval_answers.py -q
"""
import json
import shutil

import pytest
import torch

from conftest import DEMO, TINY, dirs, read_metrics, run_script
from test_rl_utils import run_main_in_process, tok  # noqa: F401 (tok: a fixture)
from trainer import answer_eval, train_grpo
from trainer.rl_utils import Rollout, answer_reward


def test_reference_answer_from_numbers_and_traces():
    ref = answer_eval.reference_answer
    assert ref("82") == "82" and ref(" -3 ") == "-3" and ref("1,024") == "1,024"
    assert ref("<think>\n7+5=12, carry 1\n3+4+1=8\n</think>\n<answer>\n82\n</answer>") == "82"
    assert ref("<answer>2.5</answer>") == "2.5" and ref("<answer>x = 1234567.5</answer>") == "1234567.5"
    assert ref("The capital is Paris.") is None and ref("<answer>Paris</answer>") is None
    assert ref("5+4=9.") is None  # a sentence is no reference answer, even with a number in it


def test_load_answer_set_keeps_checkable_records(tmp_path, tok):
    f = tmp_path / "mixed.jsonl"
    rows = [[{"role": "user", "content": "2+3=?"}, {"role": "assistant", "content": "5"}],
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
            [{"role": "user", "content": "7+5=?"}, {"role": "assistant", "content": "<answer>\n12\n</answer>"}]]
    f.write_text("".join(json.dumps({"conversations": r}) + "\n" for r in rows))
    prompts, answers = answer_eval.load_answer_set(str(f), tok)
    assert answers == ["5", "12"] and prompts[1].endswith("7+5=?<|im_end|>\n<|im_start|>assistant\n")
    assert answer_eval.load_answer_set(str(f), tok, limit=1)[1] == ["5"]
    f.write_text(json.dumps({"conversations": rows[1]}) + "\n")
    with pytest.raises(answer_eval.UserError, match="no record's last message is a checkable answer"):
        answer_eval.load_answer_set(str(f), tok)


def scripted_rollout(script):
    """A stand-in for rl_utils.rollout: the completions come from script[(prompt, greedy?)] and every sampled
    call draws from the global RNG, as HF sampling does."""
    def fake(model, tokenizer, prompts, *, num_return_sequences, temperature, **kw):
        if temperature > 0:
            torch.rand(3)
        rows = [c for p in prompts for c in script[(p, temperature == 0)][:num_return_sequences]]
        return Rollout(None, None, 0, None, None, rows, [p for p in prompts for _ in range(num_return_sequences)])
    return fake


def test_accuracy_pass_at_k_and_sampled_accuracy_by_hand(monkeypatch):
    prompts, answers = ["p0", "p1", "p2", "p3", "p4"], ["3", "4", "10", "7", "1"]
    script = {("p0", True): ["3"], ("p0", False): ["3", "3", "2"],          # greedy right, 2 of 3 samples right
              ("p1", True): ["5"], ("p1", False): ["5", "5", "4"],          # greedy wrong, 1 of 3 right
              ("p2", True): ["<answer>10</answer>"], ("p2", False): ["1", "2", "3"],  # greedy right, none sampled
              ("p3", True): ["no idea"], ("p3", False): ["7", "7", "7"],    # greedy wrong, all 3 right
              ("p4", True): ["1+0=1"], ("p4", False): ["0", "0", "0"]}      # greedy right (last number)
    monkeypatch.setattr(answer_eval, "rollout", scripted_rollout(script))
    model = torch.nn.Linear(1, 1)
    torch.manual_seed(5)
    expected_next = torch.rand(4)
    torch.manual_seed(5)
    # batch_size 6 with k=3: two prompts per sampled call, so batching is exercised too
    res = answer_eval.evaluate_answers(model, None, prompts, answers, samples=3, temperature=0.7,
                                       seed=11, max_new_tokens=8, max_prompt_len=16, batch_size=6)
    assert torch.equal(torch.rand(4), expected_next)  # the caller's RNG stream did not move
    assert (res["prompts"], res["greedy_correct"], res["accuracy"]) == (5, 3, 0.6)
    assert (res["samples"], res["pass_at_k_correct"], res["pass_at_k"]) == (3, 3, 0.6)  # p0, p1, p3
    assert res["sampled_accuracy"] == pytest.approx(6 / 15)
    assert [r["greedy_correct"] for r in res["records"]] == [True, False, True, False, True]
    assert [r["samples_correct"] for r in res["records"]] == [2, 1, 0, 3, 0]


def test_periodic_eval_steps(monkeypatch, tok):
    calls = []
    monkeypatch.setattr(answer_eval, "evaluate_answers", lambda model, tok, p, a, **kw: calls.append(len(p)) or
                        {"greedy_correct": 1, "prompts": len(p)})
    args = type("A", (), dict(eval_interval=3, eval_data_path=str(DEMO / "rlaif.jsonl"), max_gen_len=4,
                              max_seq_len=32, seed=1))()
    ctx = type("C", (), dict(rank=0, world_size=1, device=torch.device("cpu"), autocast=None))()
    ev = answer_eval.PeriodicEval(args, tok, ctx, model=None)
    # several optimizer steps may pass between calls: 7 crosses 6; the last step is always evaluated
    got = [(s, ev(s, last=(s == 8))) for s in (1, 2, 3, 4, 5, 7, 8)]
    assert [s for s, r in got if r] == [3, 7, 8]
    assert got[2][1] == {"eval_accuracy": 1 / 500} and calls == [500, 500, 500]
    args.eval_data_path = None
    with pytest.raises(answer_eval.UserError, match="--eval_interval needs --eval_data_path"):
        answer_eval.PeriodicEval(args, tok, ctx, model=None)


@pytest.mark.slow
def test_eval_answers_script_end_to_end(tiny_random, tmp_path):
    data = tmp_path / "held.jsonl"
    data.write_text("".join(DEMO.joinpath("rlaif.jsonl").read_text().splitlines(keepends=True)[:6]))
    out = tmp_path / "res.json"
    proc = run_script("scripts/eval_answers.py", "--weight", "pretrain", "--save_dir", tiny_random / "out",
                      "--data_path", data, "--samples", "2", "--temperature", "1.0", "--seed", "3",
                      "--max_new_tokens", "6", "--max_prompt_len", "64", "--device", "cpu", "--dtype", "float32",
                      "--out", out, tmp=tmp_path)
    res = json.loads(out.read_text())
    assert res["prompts"] == 6 and res["samples"] == 2 and res["temperature"] == 1.0 and res["seed"] == 3
    assert res["model"].endswith("pretrain_64.pth") and res["data_path"] == str(data)
    recs = res["records"]
    answers = [json.loads(line)["conversations"][-1]["content"] for line in data.read_text().splitlines()]
    assert [r["answer"] for r in recs] == answers
    # every record's verdict is the rule reward's, and the totals are the records' sums
    assert [r["greedy_correct"] for r in recs] == [answer_reward(r["greedy"], r["answer"]) == 1.0 for r in recs]
    assert res["greedy_correct"] == sum(r["greedy_correct"] for r in recs)
    assert res["accuracy"] == res["greedy_correct"] / 6
    assert res["pass_at_k_correct"] == sum(r["samples_correct"] > 0 for r in recs)
    assert res["sampled_accuracy"] == pytest.approx(sum(r["samples_correct"] for r in recs) / 12)
    assert f"greedy pass@1 {res['accuracy']:.4f}" in proc.stdout and "pass@2" in proc.stdout


def test_grpo_with_eval_interval_trains_the_same_weights(tiny_random, tmp_path, monkeypatch, capsys):
    held = tmp_path / "held.jsonl"
    held.write_text("".join(DEMO.joinpath("rlaif.jsonl").read_text().splitlines(keepends=True)[-8:]))
    states = {}
    for name, extra in (("plain", []), ("eval", ["--eval_interval", "3", "--eval_data_path", held])):
        shutil.copytree(tiny_random / "out", tmp_path / name / "out")
        run_main_in_process(train_grpo, monkeypatch, *TINY, *dirs(tmp_path / name), "--data_path",
                            DEMO / "rlaif.jsonl", "--from_weight", "pretrain", "--reasoning", "0",
                            "--reward_model_path", "none", "--max_gen_len", "6", "--num_generations", "3",
                            "--batch_size", "2", "--learning_rate", "1e-3", "--num_iterations", "2",
                            "--max_steps", "6", "--log_interval", "2",
                            "--save_interval", "100", *extra)
        ckp = torch.load(tmp_path / name / "checkpoints" / "grpo_64_resume.pth", weights_only=True)
        states[name] = ckp["model"]
    assert states["plain"].keys() == states["eval"].keys()
    assert all(torch.equal(states["plain"][k], states["eval"][k]) for k in states["plain"])
    rows = read_metrics(tmp_path / "eval", "grpo")
    # two optimizer steps per rollout batch: step 4 is the first boundary past a multiple of 3; 6 is the last
    assert [r["global_step"] for r in rows if "eval_accuracy" in r] == [4, 6]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in rows if "eval_accuracy" in r)
    assert "eval_accuracy" not in read_metrics(tmp_path / "plain", "grpo")[-1]
    assert "eval_accuracy" in capsys.readouterr().out
