"""Multi-turn tool rollouts: the loss mask by position (tool output and prompt tokens carry none), the ids equal the
chat template's rendering of the same conversation, turn limits / truncation / malformed and invalid calls counted
as scripted, answer checking, and scripts/eval_toolcall.py end to end (scripted "model" with hand-counted totals,
and a tiny random model whose totals must equal its records).

    python -m pytest tests/test_tool_rollout.py -q
"""
import json

import pytest

from conftest import DEMO, run_script
from test_rl_utils import tiny_model, tok  # noqa: F401 (tok: a fixture)
from model import chat_format
from trainer import tool_rollout as tr
from trainer.tools import tool_schemas

CALC = tool_schemas(["calculator"])


def task(q, gt, needs=True, tools=CALC):
    return {"conversations": [{"role": "user", "content": q}], "tools": tools, "gt": gt, "needs_tool": needs}


def call_text(name, **args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def scripted(tokenizer, script):
    """A generate function: the reply to a row is script[question][k] for its k-th reply; a reply ending in "…" is
    cut off (no <|im_end|>), as at max_new_tokens."""
    seen = []

    def generate(rows):
        seen.append(len(rows))
        out = []
        for row in rows:
            text = tokenizer.decode(row)
            q = next(q for q in script if f"user\n{q}<|im_end|>" in text)
            k = text.count(chat_format.ASSISTANT_HEADER) - 1
            reply = script[q][k]
            ids = tokenizer(reply.rstrip("…"), add_special_tokens=False)["input_ids"]
            out.append(ids if reply.endswith("…") else ids + [tokenizer.eos_token_id])
        return out
    generate.batches = seen
    return generate


def test_loss_mask_by_position_and_ids_equal_the_template(tok):
    t = task("What is 6 * 7?", "42")
    gen = scripted(tok, {"What is 6 * 7?": [call_text("calculator", expression="6 * 7"), "6 × 7 = 42."]})
    (r,) = tr.tool_rollout(None, tok, [t], max_turns=3, generate=gen)
    prompt = chat_format.render(tok, t["conversations"], CALC, add_generation_prompt=True)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    g1 = tok(call_text("calculator", expression="6 * 7"), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    follow = tok("\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
                 add_special_tokens=False)["input_ids"]
    g2 = tok("6 × 7 = 42.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert r.ids == p + g1 + follow + g2 and r.prompt_len == len(p)
    assert r.mask == [0] * len(p) + [1] * len(g1) + [0] * len(follow) + [1] * len(g2)
    # the tool's output ("42" inside <tool_response>) sits where the mask is 0
    at = len(p) + len(g1)
    assert tok.decode(r.ids[at:at + len(follow)]).count("42") == 1 and not any(r.mask[at:at + len(follow)])
    # the whole conversation is exactly what the chat template renders for the same messages (one owner)
    msgs = t["conversations"] + [
        {"role": "assistant", "content": "", "tool_calls": [{"name": "calculator", "arguments": {"expression": "6 * 7"}}]},
        {"role": "tool", "content": "42"}, {"role": "assistant", "content": "6 × 7 = 42."}]
    assert tok.decode(r.ids) + "\n" == chat_format.render(tok, msgs, CALC)
    assert (r.calls, r.valid_calls, r.malformed_calls, r.tool_errors) == (1, 1, 0, 0)
    assert r.finished and not r.truncated and r.answer == "6 × 7 = 42." and len(r.replies) == 2
    assert r.messages[1] == {"role": "tool", "content": "42"}
    assert tr.score_task(t, r)["success"] and tr.score_task(t, r)["generated_tokens"] == len(g1) + len(g2)


def test_batched_turns_limits_and_counts(tok):
    script = {
        "A?": [call_text("calculator", expression="2*3") + "\n" + call_text("calculator", expression="1/0"),
               "It is 6."],                                                 # 2 calls (one tool error), right
        "B?": ["The answer is 12."],                                        # no call on a tool task, wrong
        "C?": [call_text("weekday", date="2024-01-01"), call_text("calculator", expression="1+1"), "x"],  # limit
        "D?": ["<tool_call>\n{\"name\": \"calcul…"],                       # cut off mid-call
        "E?": ["3 + 4 = 7."],                                               # no-tool task, answered directly
    }
    tasks = [task("A?", "6"), task("B?", "13"), task("C?", "Monday"), task("D?", "1"), task("E?", "7", needs=False)]
    gen = scripted(tok, script)
    res = tr.tool_rollout(None, tok, tasks, max_turns=2, generate=gen)
    assert gen.batches == [5, 2]  # A and C go on to a second turn, together
    got = [(r.calls, r.valid_calls, r.malformed_calls, r.tool_errors, r.finished, r.truncated, len(r.replies))
           for r in res]
    assert got == [(2, 2, 0, 1, True, False, 2), (0, 0, 0, 0, True, False, 1),
                   (2, 1, 0, 1, False, False, 2),   # weekday not offered: invalid; still calling at the limit
                   (0, 0, 1, 0, False, True, 1), (0, 0, 0, 0, True, False, 1)]
    assert res[0].messages[1:3] == [{"role": "tool", "content": "6"}, {"role": "tool", "content": "error: division by zero"}]
    assert res[2].messages[1]["content"] == "error: unknown tool 'weekday' (known: calculator)"
    scores = [tr.score_task(t, r) for t, r in zip(tasks, res)]
    assert [s["success"] for s in scores] == [True, False, False, False, True]
    assert [s["answered_without_tool"] for s in scores] == [False, True, False, False, False]
    s = tr.summarize(scores)
    assert s["success"] == 2 / 5 and s["success_tool_tasks"] == 1 / 4 and s["success_no_tool_tasks"] == 1.0
    assert (s["calls"], s["valid_calls"], s["malformed_calls"], s["call_attempts"]) == (4, 3, 1, 5)
    assert s["call_validity"] == 3 / 5 and s["calls_per_task"] == 4 / 5 and s["answered_without_tool"] == 1
    assert s["answered_without_tool_rate"] == 1 / 4 and s["finished"] == 3 and s["truncated"] == 1
    # every reply token and nothing else is masked in: the mask sums to the generated tokens
    for r in res:
        assert sum(r.mask) == sum(len(tok(x.rstrip("…"), add_special_tokens=False)["input_ids"]) + 1 - x.endswith("…")
                                  for x in r.replies) or r is res[3]


def test_max_total_len_stops_a_task(tok):
    t = task("What is 6 * 7?", "42")
    gen = scripted(tok, {"What is 6 * 7?": [call_text("calculator", expression="6 * 7"), "42"]})
    prompt_len = len(tok(chat_format.render(tok, t["conversations"], CALC, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"])
    (r,) = tr.tool_rollout(None, tok, [t], max_turns=3, max_total_len=prompt_len + 30, generate=gen)
    assert r.truncated and not r.finished and len(r.ids) <= prompt_len + 30 and len(r.replies) == 1
    with pytest.raises(tr.UserError, match="raise it or offer fewer tools"):
        tr.tool_rollout(None, tok, [t], max_total_len=prompt_len, generate=gen)


@pytest.mark.parametrize("answer,gt,want", [
    ("48213 × 7719 = 372156147.", "372156147", True), ("= 372,156,147", "372156147", True),
    ("372156147 or 372156148", "372156147", False), ("about 60.3504", "60.35040", True),
    ("It is 2025-02-28.", "2025-02-28", True), ("It is a monday.", "Monday", True), ("Lima", "Paris", False),
    ("From 2022-03-01 to 2023-11-19 there are 628 days.", "628", True), ("", "7", False),
])
def test_answer_correct(answer, gt, want):
    assert tr.answer_correct(answer, gt) is want


def test_real_model_rollout_is_consistent(tok):
    model = tiny_model()
    tasks = [task("What is 6 * 7?", "42"), task("Hi", "7", needs=False)]
    res = tr.tool_rollout(model, tok, tasks, max_turns=2, max_new_tokens=6)
    for r in res:
        assert len(r.ids) == len(r.mask) and not any(r.mask[:r.prompt_len])
        assert 1 <= sum(r.mask) <= 12 and len(r.replies) in (1, 2)


def write_tasks(path, tasks):
    path.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks), encoding="utf-8")


def test_eval_toolcall_counts_what_the_rollout_did(tiny_random, tmp_path, monkeypatch, capsys, tok):
    from scripts import eval_toolcall
    tasks = [task("What is 6 * 7?", "42"), task("What is 123 * 456?", "56088"),
             task("What is 2 + 2?", "4", needs=False), task("What is 9 * 9?", "81")]
    script = {"What is 6 * 7?": [call_text("calculator", expression="6*7"), "6 × 7 = 42."],   # right, with the tool
              "What is 123 * 456?": ["It is 56000."],                                          # guessed: no tool
              "What is 2 + 2?": ["2 + 2 = 4."],                                                # right, no tool needed
              "What is 9 * 9?": ["<tool_call>oops</tool_call>"]}                              # malformed, no answer
    data, out = tmp_path / "tasks.jsonl", tmp_path / "res.json"
    write_tasks(data, tasks)
    monkeypatch.setattr(tr, "hf_generate", lambda model, tokenizer, **kw: scripted(tokenizer, script))
    eval_toolcall.main(["--weight", "pretrain", "--save_dir", str(tiny_random / "out"), "--data_path", str(data),
                        "--device", "cpu", "--dtype", "float32", "--batch_size", "3", "--out", str(out)])
    res = json.loads(out.read_text())
    assert (res["tasks"], res["tool_tasks"], res["no_tool_tasks"]) == (4, 3, 1)
    assert res["success"] == 2 / 4 and res["success_tool_tasks"] == 1 / 3 and res["success_no_tool_tasks"] == 1.0
    assert (res["calls"], res["valid_calls"], res["malformed_calls"], res["call_attempts"]) == (1, 1, 1, 2)
    assert res["call_validity"] == 0.5 and res["calls_per_task"] == 0.25 and res["answered_without_tool"] == 1
    assert [r["success"] for r in res["records"]] == [True, False, True, False]
    assert res["records"][0]["messages"][1] == {"role": "tool", "content": "42"}
    assert "success 50.0% (4 tasks" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_toolcall_script_on_a_tiny_random_model(tiny_random, tmp_path):
    out = tmp_path / "res.json"
    proc = run_script("scripts/eval_toolcall.py", "--weight", "pretrain", "--save_dir", tiny_random / "out",
                      "--data_path", DEMO / "tool_test.jsonl", "--max_tasks", "6", "--max_turns", "2",
                      "--max_new_tokens", "8", "--device", "cpu", "--dtype", "float32", "--out", out, tmp=tmp_path)
    res = json.loads(out.read_text())
    recs = res["records"]
    assert res["tasks"] == len(recs) == 6 and res["model"].endswith("pretrain_64.pth")
    for key in ("calls", "valid_calls", "malformed_calls", "answered_without_tool", "finished", "truncated"):
        assert res[key] == sum(r[key] for r in recs), key
    assert res["success"] == sum(r["success"] for r in recs) / 6
    assert res["call_attempts"] == res["calls"] + res["malformed_calls"]
    assert all(r["finished"] != r["truncated"] or r["calls"] for r in recs)
    assert "success " in proc.stdout and str(out) in proc.stdout


def test_eval_llm_runs_the_tools_and_goes_on(tiny_random, tmp_path, monkeypatch, capsys, tok):
    """eval_llm.py --tools: the model's call runs, the call and result are shown, and the next reply is generated
    from a prompt that holds the tool response as the chat template renders it (a scripted stream stands in for
    generation)."""
    import shutil
    import eval_llm
    from conftest import run_eval_cli
    out = tmp_path / "out"
    shutil.copytree(tiny_random / "out", out)
    for ext in ("pth", "json"):  # any name but "pretrain": chat template on
        (out / f"pretrain_64.{ext}").rename(out / f"full_sft_64.{ext}")
    replies = iter([call_text("calculator", expression="6*7"), "6 × 7 = 42."])
    prompts = []

    class FakeStream:
        def __init__(self, model, tokenizer, ids, **kw):
            prompts.append(tokenizer.decode(ids))
            self.text, self.completion_tokens = next(replies), 3

        def __iter__(self):
            yield self.text

        def close(self):
            pass
    monkeypatch.setattr(eval_llm, "ChatStream", FakeStream)
    code, stdout, stderr = run_eval_cli(["--save_dir", str(out), "--device", "cpu", "--tools", "calculator,weekday"],
                                        monkeypatch, capsys, stdin_lines=["What is 6 * 7?"])
    assert code == 0, stderr
    assert '[tool call] calculator({"expression": "6*7"})' in stdout and "[tool result] 42" in stdout
    assert "6 × 7 = 42." in stdout and len(prompts) == 2
    assert '"name": "weekday"' in prompts[0] and prompts[0].endswith("What is 6 * 7?<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[1].endswith(call_text("calculator", expression="6*7") + "<|im_end|>\n<|im_start|>user\n"
                               "<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    code, stdout, stderr = run_eval_cli(["--save_dir", str(out), "--device", "cpu", "--tools", "calculator,nope"],
                                        monkeypatch, capsys, stdin_lines=["x"])
    assert code != 0 and "--tools: unknown tool(s) nope" in stdout + stderr


def test_load_tool_tasks_bad_input_says_which_file_and_line(tmp_path):
    with pytest.raises(tr.UserError, match="no such file; pass --data_path"):
        tr.load_tool_tasks(str(tmp_path / "nope.jsonl"))
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(task("Q?", "1")) + "\n\n{oops\n")
    with pytest.raises(tr.UserError, match=r"t.jsonl:3: not valid JSON"):
        tr.load_tool_tasks(str(f))
    f.write_text(json.dumps({"conversations": [{"role": "user", "content": "Q"}], "gt": 5}) + "\n")
    with pytest.raises(tr.UserError, match=r't.jsonl:1: a tool task needs "conversations"'):
        tr.load_tool_tasks(str(f))
    f.write_text(json.dumps(task("Q?", "1")) + "\n" + json.dumps(task("R?", "2")) + "\n")
    assert [t["gt"] for t in tr.load_tool_tasks(str(f))] == ["1", "2"] and len(tr.load_tool_tasks(str(f), 1)) == 1
