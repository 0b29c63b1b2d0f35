"""The held-out GRPO demo's task (dataset/demo/make_demo.py sum_*): running-total traces that the RL rewards accept,
train and held-out digit sequences disjoint in any order, the same files every time, and the demo's table mode.

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
sys.path.insert(0, str(ROOT / "scripts"))
import make_demo  # noqa: E402
from demo_grpo_reward import run  # noqa: E402


def test_trace_is_right_and_well_formed():
    assert make_demo.sum_trace((3, 5, 2, 4, 7)) == "<think>\n3,8,10,14,21\n</think>\n<answer>\n21\n</answer>"
    assert make_demo.sum_trace((0, 0, 0)) == "<think>\n0,0,0\n</think>\n<answer>\n0\n</answer>"
    assert make_demo.sum_trace((9,) * 5).startswith("<think>\n9,18,27,36,45\n")
    rng = random.Random(3)
    for seq in [(9, 9, 9, 9, 9), (0, 1, 0, 1, 0), (4, 1, 6, 8, 2)]:
        trace = make_demo.sum_trace(seq)
        assert format_reward(trace) == 1.5  # the reasoning format reward's maximum
        assert answer_reward(trace, str(sum(seq))) == 1.0 and reference_answer(trace) == str(sum(seq))
        question = make_demo.sum_question(rng, seq)
        assert question.endswith("+".join(map(str, seq)))  # the expression always ends the question


def test_trace_totals_sit_at_the_questions_stride():
    # why the trace is learnable by a small model: every digit and every running total (<= 45) is one token, so
    # total k is at a constant distance from digit k of the expression (both stride 2), for every template
    tok = AutoTokenizer.from_pretrained(str(ROOT / "model"))
    assert all(len(tok(str(n))["input_ids"]) == 1 for n in range(46))
    seq = (3, 5, 2, 4, 7)
    for template in make_demo.SUM_TEMPLATES:
        question = [tok.decode([i]) for i in tok(template.format("+".join(map(str, seq))))["input_ids"]]
        assert question[-9:] == ["3", "+", "5", "+", "2", "+", "4", "+", "7"]
    pieces = [tok.decode([i]) for i in tok(make_demo.sum_trace(seq))["input_ids"]]
    assert pieces[:11] == ["<think>", "\n", "3", ",", "8", ",", "10", ",", "14", ",", "21"]


def test_pretraining_turns_are_the_chat_templates_rendering():
    # the copy offsets pretraining teaches must be the chat's: every problem of a pretraining document is exactly
    # the chat template's rendering of that question and its trace, token for token
    tok = AutoTokenizer.from_pretrained(str(ROOT / "model"))
    seqs = [(3, 5, 2, 4, 7), (0, 9, 9, 1, 8)]
    text = make_demo.sum_pretrain(seqs, random.Random(4), per_doc=2)[0]["text"]
    rng = random.Random(4)
    rendered = "".join(tok.apply_chat_template(
        [{"role": "user", "content": make_demo.sum_question(rng, s)},
         {"role": "assistant", "content": make_demo.sum_trace(s)}], tokenize=False) for s in seqs)
    assert text + "\n" == rendered
    assert tok(text + "\n")["input_ids"] == tok(rendered)["input_ids"]


def test_sft_rows_mix_worked_and_direct_replies_evenly():
    # the demo's SFT data: a third of the replies show the trace, the rest answer at once behind an empty think
    # block (the form a hybrid-thinking model's non-thinking reply takes); both pass the answer check
    seqs = [(1, 2, 3, 4, 5), (9, 9, 9, 9, 9), (0, 0, 0, 0, 1)] * 4
    replies = [r["conversations"][-1]["content"] for r in make_demo.sum_rows(seqs, random.Random(0),
                                                                             trace_share=1 / 3)]
    worked = [i for i, r in enumerate(replies) if r == make_demo.sum_trace(seqs[i])]
    assert worked == [2, 5, 8, 11]
    assert all(replies[i] == f"<think>\n\n</think>\n<answer>\n{sum(seqs[i])}\n</answer>"
               for i in range(12) if i not in worked)
    assert all(answer_reward(r, str(sum(s))) == 1.0 and reference_answer(r) == str(sum(s))
               for r, s in zip(replies, seqs))
    every = make_demo.sum_rows(seqs, random.Random(0))  # the default: every reply worked
    assert all(r["conversations"][-1]["content"] == make_demo.sum_trace(s) for r, s in zip(every, seqs))
    half = make_demo.sum_rows(seqs[:10], random.Random(0), trace_share=0.5)
    assert sum("," in r["conversations"][-1]["content"] for r in half) == 5


def test_splits_are_disjoint_and_fixed():
    is_train, held = make_demo.sum_splits(5, heldout_sets=150, heldout_prompts=300)
    assert len(held) == len(set(held)) == 300 and len({tuple(sorted(s)) for s in held}) <= 150
    assert not any(is_train(s) for s in held)
    assert not is_train(tuple(reversed(held[0])))  # any order of a held-out multiset is held out
    train = make_demo.sum_train(is_train, random.Random(1), 2000)
    assert all(is_train(s) for s in train) and len(set(train)) > 1900
    assert make_demo.sum_splits(5, 150, 300)[1] == held  # the same split every time
    rows = make_demo.sum_rows(held[:2], random.Random(0), trace=False)
    assert [r["conversations"][-1]["content"] for r in rows] == [str(sum(held[0])), str(sum(held[1]))]
    docs = make_demo.sum_pretrain(train[:10], random.Random(0))
    assert len(docs) == 2 and docs[0]["text"].count("<answer>") == 5


def test_report_mode_prints_the_table(tmp_path):
    for seed, (sft, grpo, rec) in {1: (0.2, 0.35, 0.4), 2: (0.3, 0.4, 0.5)}.items():
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "result.json").write_text(json.dumps(
            {"seed": seed, "full_sft": sft, "grpo": grpo, "recommended": rec,
             "seconds": {"pretrain+sft": 10, "grpo": 20, "recommended": 30},
             "trace_share": {"full_sft": 0.0, "grpo": 0.5 * (seed - 1), "recommended": 1.0}}))
    out = run_script("scripts/demo_grpo_reward.py", "--workdir", tmp_path, "--report",
                     tmp=tmp_path).stdout
    assert "| 1 | 0.200 | 0.350 | 0.400 | 10, 20, 30 |" in out
    assert "| mean (spread) | 0.250 (0.100) | 0.375 (0.050) | 0.450 (0.100) | |" in out
    assert "grpo: held-out greedy accuracy 0.250 -> 0.375 (+12.5 points, mean of 2 seed(s))" in out
    assert "(mean over seeds): full_sft 0%, grpo 25%, recommended 100%" in out
    held = [json.loads(x) for x in (tmp_path / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 300 and all(r["conversations"][-1]["content"].isdigit() for r in held)


def test_side_by_side_stages_get_their_share_of_the_threads(tmp_path):
    """The two objectives' GRPO runs go side by side; with torch's default threads each, two processes on 2 cores ran
    ~4x slower than one alone (session 9), so a stage given `threads` must see exactly that many."""
    probe = tmp_path / "probe.py"
    probe.write_text("import sys, torch\nopen(sys.argv[1], 'w').write(str(torch.get_num_threads()))\n")
    run(probe, tmp_path / "one.txt", log=tmp_path / "one.log", threads=1)
    assert (tmp_path / "one.txt").read_text() == "1"
