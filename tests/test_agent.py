"""Agent RL (trainer/train_agent.py): the reward parts on hand cases, the RL batch of a multi-turn rollout (tool
turns attended, never trained, by position), the logged loss of one step against a hand computation, resume equal to
an uninterrupted run with mu = 2 and mini-batches, and a 2-process torchrun on the demo tool data.

    python -m pytest tests/test_agent.py -q
"""
import functools
import json
import re
import shutil

import pytest
import torch

from conftest import DEMO, TINY, dirs, read_metrics, run_torchrun, signal_after_step
from test_rl_utils import run_main_in_process, tiny_model, tok  # noqa: F401 (tok: a fixture)
from test_tool_rollout import call_text, task
from trainer import tool_rollout as tr
from trainer import train_agent
from trainer.rl_utils import ADV_EPS, completion_logprobs
from trainer.tools import tool_schemas
from trainer.trainer_utils import TrainingStopped, UserError

AGENT = ["--batch_size", "1", "--num_generations", "2", "--max_gen_len", "24", "--max_turns", "2",
         "--log_interval", "1", "--save_interval", "1", "--max_seq_len", "400", "--beta", "0"]


def paths(script: dict):
    """A generate function for tool_rollout: script[question] is a list of paths, one per generation of the task
    (in the order its rows come), each a list of replies; a reply ending in "…" is cut off (no <|im_end|>). A row is
    matched to its path by its first reply, so the paths' first replies must differ."""
    def generate(tokenizer, rows):
        out, seen = [], {}
        for row in rows:
            text = tokenizer.decode(row)
            q = next(q for q in script if f"user\n{q}<|im_end|>" in text)
            done = text.split(f"user\n{q}<|im_end|>", 1)[1]
            turn = done.count("<|im_start|>assistant") - 1
            if turn == 0:
                path = script[q][seen.get(q, 0)]
                seen[q] = seen.get(q, 0) + 1
            else:
                path = next(p for p in script[q] if done.split("<|im_start|>assistant\n")[1].startswith(p[0]))
            reply = path[turn]
            ids = tokenizer(reply.rstrip("…"), add_special_tokens=False)["input_ids"]
            out.append(ids if reply.endswith("…") else ids + [tokenizer.eos_token_id])
        return out
    return generate


def scripted_rollout(tokenizer, tasks, script, **kw):
    return tr.tool_rollout(None, tokenizer, tasks, generate=functools.partial(paths(script), tokenizer), **kw)


# ------------------------------------------------------------------------------------------------ rewards

CALL = call_text("calculator", expression="6 * 7")


@pytest.mark.parametrize("needs, path, parts", [
    (True, [CALL, "6 × 7 = 42."], (1.0, 0.2, 0.0)),                              # the tool, then the right answer
    (True, ["It is 42."], (1.0, 0.0, -0.2)),                 # right without the tool: no try costs as a bad one
    (True, ["It is 41."], (0.0, 0.0, -0.2)),
    (True, ["It is 4…"], (0.0, 0.0, -0.2)),                                      # cut off, no call tried
    (True, ["<tool_call>\n{oops}\n</tool_call> 42"], (1.0, 0.0, -0.2)),           # malformed: text, the answer
    (True, [call_text("nope", x=1), "42."], (1.0, 0.0, -0.2)),                  # unknown tool: invalid
    (True, [call_text("calculator", expr="6*7"), "42."], (1.0, 0.0, -0.2)),     # wrong argument name
    (True, [CALL, CALL, "42."], (1.0, 0.2, -0.1)),                               # an identical repeat
    (True, [CALL + "\n" + CALL, "42."], (1.0, 0.2, -0.1)),                       # ... in the same reply
    (True, ["<tool_call>\n{}\n</tool_call>" * 7], (0.0, 0.0, -1.0)),             # 7 x -0.2, capped at -1
    (True, [CALL, "6 × 7 = 42…"], (0.0, 0.2, 0.0)),                              # cut off: no final answer
    (False, [CALL, "42."], (1.0, 0.0, -0.1)),                                    # a call the task did not need
    (False, ["42."], (1.0, 0.0, 0.0)),
])
def test_reward_parts_by_hand(tok, needs, path, parts):
    t = task("What is 6 * 7?", "42", needs=needs)
    (r,) = scripted_rollout(tok, [t], {"What is 6 * 7?": [path]}, max_turns=3)
    got = train_agent.task_reward(t, r)
    assert (got["reward_answer"], got["reward_format"], got["reward_calls"]) == pytest.approx(parts)


def test_score_rollouts_logs_every_part_and_calls_per_task(tok):
    t = task("What is 6 * 7?", "42")
    results = scripted_rollout(tok, [t, t], {"What is 6 * 7?": [[CALL, "6 × 7 = 42."],
                                                                ["<tool_call>\n{x}\n</tool_call>", "41"]]},
                               max_turns=3)
    rewards, m = train_agent.score_rollouts([t, t], results)
    assert rewards.tolist() == pytest.approx([1.2, -0.2])
    assert m["reward_answer"] == 0.5 and m["reward_format"] == pytest.approx(0.1)
    assert m["reward_calls"] == pytest.approx(-0.1)
    assert (m["calls_per_task"], m["bad_calls_per_task"], m["turns_per_task"], m["finished"]) == (0.5, 0.5, 1.5, 1)


# ------------------------------------------------------------------------------------------------ the RL batch

def test_rl_batch_of_multi_turn_rollouts_trains_only_the_models_tokens(tok):
    """as_rollout: prompts left-padded, tool turns attended but with loss mask 0, by position; Rollout.select keeps
    a row's tool turns and replies (its width comes from the attention mask, not from the loss mask)."""
    a = task("What is 6 * 7?", "42")
    b = task("Hi?", "hello", needs=False, tools=tool_schemas(["calculator", "weekday"]))  # a longer prompt
    results = scripted_rollout(tok, [a, b], {"What is 6 * 7?": [[CALL, "6 × 7 = 42."]], "Hi?": [["hello"]]})
    ro = tr.as_rollout(results, tok.pad_token_id)
    P = ro.prompt_len
    assert P == max(r.prompt_len for r in results) == results[1].prompt_len > results[0].prompt_len
    for i, r in enumerate(results):
        rest = len(r.ids) - r.prompt_len
        assert ro.input_ids[i, P - r.prompt_len:P + rest].tolist() == r.ids
        assert ro.attention_mask[i].tolist() == [0] * (P - r.prompt_len) + [1] * len(r.ids) + \
            [0] * (ro.input_ids.shape[1] - P - rest)
        assert ro.completion_mask[i, :rest].tolist() == r.mask[r.prompt_len:]
        assert not ro.completion_mask[i, rest:].any()
    # row 0: reply 1, the tool turn (its "42" inside <tool_response>), reply 2, by position
    r0 = results[0]
    g1 = len(tok(CALL, add_special_tokens=False)["input_ids"]) + 1
    follow = len(tok("\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
                     add_special_tokens=False)["input_ids"])
    g2 = len(tok("6 × 7 = 42.", add_special_tokens=False)["input_ids"]) + 1
    assert ro.completion_mask[0].tolist()[:g1 + follow + g2] == [1] * g1 + [0] * follow + [1] * g2
    assert "<tool_response>\n42\n</tool_response>" in tok.decode(ro.completion_ids[0, g1:g1 + follow])
    assert len(r0.ids) - r0.prompt_len == g1 + follow + g2
    sub = ro.select(torch.tensor([0]))
    assert sub.completion_ids.shape[1] == g1 + follow + g2 and sub.completion_mask.sum() == g1 + g2
    # the policy's log-probs of that row score it exactly as the row alone (padding and tool turns in place)
    model = tiny_model()
    logp, _ = completion_logprobs(model, ro)
    alone, _ = completion_logprobs(model, tr.as_rollout(results[:1], tok.pad_token_id))
    assert torch.allclose(logp[0, :g1 + follow + g2], alone[0], atol=1e-5)


# ------------------------------------------------------------------------------------------------ runs

@pytest.fixture
def agent_dir(tiny_random, tmp_path):
    shutil.copytree(tiny_random / "out", tmp_path / "out")
    return tmp_path


def write_tasks(path, tasks):
    path.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks))
    return path


def test_logged_loss_of_one_step_equals_the_hand_computation(agent_dir, tok, monkeypatch):
    """G = 2 scripted rollouts of one task: the tool then the right answer (reward 1.2) and a wrong direct answer
    (0). dapo, one update, beta 0: the loss value is -sum_i A_i n_i / sum_i n_i (ratio 1), n_i the model's own tokens
    of rollout i. A tool turn counted in n_0 would change it."""
    data = write_tasks(agent_dir / "t.jsonl", [task("What is 6 * 7?", "42")])
    script = {"What is 6 * 7?": [[CALL, "6 × 7 = 42."], ["It is 41."]]}
    monkeypatch.setattr(train_agent, "tool_rollout", lambda model, tokenizer, tasks, **kw: scripted_rollout(
        tokenizer, tasks, script, max_turns=kw["max_turns"], max_total_len=kw["max_total_len"]))
    run_main_in_process(train_agent, monkeypatch, *TINY, *dirs(agent_dir), *AGENT, "--from_weight", "pretrain",
                        "--data_path", data, "--max_steps", "1", "--loss_type", "dapo")
    def n(text):
        return len(tok(text, add_special_tokens=False)["input_ids"]) + 1  # + <|im_end|>
    n0, n1 = n(CALL) + n("6 × 7 = 42."), n("It is 41.")
    a = 0.7 / (0.7 + ADV_EPS)  # rewards [1.2, -0.2] (no call tried): mean 0.5, population std 0.7
    (row,) = read_metrics(agent_dir, "agent")
    assert row["loss"] == pytest.approx(-(a * n0 - a * n1) / (n0 + n1), rel=1e-5)
    assert row["reward"] == pytest.approx(0.5) and row["reward_format"] == pytest.approx(0.1)
    assert row["calls_per_task"] == 0.5 and row["completion_len"] == pytest.approx((n0 + n1) / 2)
    assert row["frac_reward_zero_std"] == 0.0


def mixed_rollout(model, tokenizer, tasks, **kw):
    """Real sampling from the model, except that the first generation of each task opens with a scripted valid
    call (so rollouts have tool turns and groups differ in reward); no randomness of its own."""
    real = tr.hf_generate(model, tokenizer, max_new_tokens=kw["max_new_tokens"], temperature=kw["temperature"])

    def generate(rows):
        out = real(rows)
        for i, row in enumerate(rows):
            if i % 2 == 0 and tokenizer.decode(row).endswith("<|im_start|>assistant\n") and \
                    "<tool_response>" not in tokenizer.decode(row):
                out[i] = tokenizer(call_text("calculator", expression="2 * 3"),
                                   add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return out
    return tr.tool_rollout(model, tokenizer, tasks, generate=generate, **kw)


def test_two_iterations_and_mini_batches_resume_exactly(agent_dir, monkeypatch):
    """mu = 2 passes x 2 mini-batches = 4 optimizer steps per rollout batch of 2 tasks x 2 rollouts; a Ctrl-C after
    step 2 stops at the rollout boundary (step 4) and the resumed run ends with the uninterrupted run's fp32
    weights and losses."""
    full, part = agent_dir / "full", agent_dir / "part"
    for d in (full, part):
        shutil.copytree(agent_dir / "out", d / "out")
    monkeypatch.setattr(train_agent, "tool_rollout", mixed_rollout)
    flags = [*TINY, *AGENT, "--batch_size", "2", "--from_weight", "pretrain", "--data_path", DEMO / "tool_rl.jsonl",
             "--max_seq_len", "700", "--max_gen_len", "40", "--num_iterations", "2", "--mini_batch_size", "2",
             "--max_steps", "8", "--epsilon", "0.01", "--epsilon_high", "0.01", "--learning_rate", "3e-3"]
    run_main_in_process(train_agent, monkeypatch, *flags, *dirs(full))
    with monkeypatch.context() as m:
        signal_after_step(m, 2)
        with pytest.raises(TrainingStopped):
            run_main_in_process(train_agent, m, *flags, *dirs(part))
    assert torch.load(part / "checkpoints" / "agent_64_resume.pth", weights_only=True)["opt_step"] == 4
    run_main_in_process(train_agent, monkeypatch, *flags, *dirs(part), "--from_resume", "1")
    a = torch.load(full / "checkpoints" / "agent_64_resume.pth", weights_only=True)["model"]
    b = torch.load(part / "checkpoints" / "agent_64_resume.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows, resumed = read_metrics(full, "agent"), read_metrics(part, "agent")
    assert [r["global_step"] for r in rows] == [r["global_step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]
    # rollouts had tool turns and signal; pi_old is the rollout policy: ratio 1 on each batch's first step only
    assert all(r["calls_per_task"] > 0 for r in rows) and any(r["advantage_std"] > 0 for r in rows)
    assert rows[0]["ratio"] == 1.0 and rows[4]["ratio"] == 1.0 and any(r["ratio"] != 1.0 for r in rows[1:4])


def test_bad_flags_and_tasks_stop_with_one_line(agent_dir, monkeypatch):
    base = [*TINY, *dirs(agent_dir), *AGENT, "--from_weight", "pretrain", "--data_path", DEMO / "tool_rl.jsonl"]
    for extra, says in [(["--num_generations", "1"], "needs >= 2 rollouts"),
                        (["--tools", "calculator,nope"], "unknown tool(s) nope"),
                        (["--fsdp", "1"], "--fsdp 1 is not supported"),
                        (["--tools", "calculator"], "tool_rl.jsonl:2: the task offers tool(s) unit_convert "),
                        (["--max_seq_len", "300"], "raise it to at least")]:
        with pytest.raises(UserError, match=says.replace("(", r"\(").replace(")", r"\)")):
            run_main_in_process(train_agent, monkeypatch, *base, *extra)


@pytest.mark.slow
def test_torchrun_on_the_demo_tool_data(agent_dir):
    held_out = agent_dir / "test.jsonl"
    held_out.write_text("".join((DEMO / "tool_test.jsonl").read_text().splitlines(keepends=True)[:21]))
    flags = [*TINY, *dirs(agent_dir), *AGENT, "--from_weight", "pretrain", "--max_seq_len", "700",
             "--max_gen_len", "8", "--num_iterations", "2", "--mini_batch_size", "1", "--beta", "0.02",
             "--max_steps", "4", "--eval_interval", "4", "--eval_data_path", held_out]
    out = run_torchrun("trainer/train_agent.py", *flags, tmp=agent_dir)
    # 21 held-out tasks: 11 on rank 0, 10 on rank 1, counted together
    assert "weights identical on all 2 ranks" in out and re.search(r"held-out: task success \S+ \(\d+/21\)", out)
    assert (agent_dir / "out" / "agent_64.pth").is_file() and (agent_dir / "out" / "agent_64.json").is_file()
    rows = read_metrics(agent_dir, "agent")
    assert [r["global_step"] for r in rows] == [1, 2, 3, 4] and "eval_success" in rows[-1]
    for key in ("reward_answer", "reward_format", "reward_calls", "calls_per_task", "kl", "clip_ratio_low"):
        assert key in rows[0], key
