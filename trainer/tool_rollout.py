"""Multi-turn tool-use rollouts: the model writes <tool_call>s, the tools run, their results go back as the chat
template renders tool messages, and generation goes on until a final answer or the turn limit. Shared by
scripts/eval_toolcall.py and the agent RL stage.

    from trainer.tool_rollout import load_tool_tasks, tool_rollout, score_task
    tasks = load_tool_tasks("dataset/demo/tool_test.jsonl")
    results = tool_rollout(model, tokenizer, tasks, max_turns=3, max_new_tokens=96, temperature=0)
    r = results[0]
    r.ids, r.mask          # the whole conversation as token ids; mask 1 on tokens the model generated, else 0
    score_task(tasks[0], r)  # {"success", "calls", "valid_calls", "malformed_calls", "tool_errors", ...}
    as_rollout(results, tokenizer.pad_token_id)   # one padded RL batch for the policy updates (train_agent.py)

Token ids are the source of truth: each turn continues from exactly the ids generated so far (never re-rendered
text), so the loss mask lines up with what the model saw. The model's tokens (each reply up to and including its
<|im_end|>) carry mask 1; the prompt, the tool turns ("\\n<|im_start|>user\\n<tool_response>\\n...\\n</tool_response>
<|im_end|>\\n") and the next "<|im_start|>assistant\\n" header carry 0. Replies are parsed by the chat module's one
parser (trainer/chat_utils.py ReplyParser) and calls run through trainer/tools.py execute(), which never raises.

A task: {"conversations": [system?, user], "tools": [schemas], "gt": "reference answer", "needs_tool": bool}
(scripts/make_tool_data.py writes them). A rollout stops when a reply has no tool call (the final answer), when a
reply was cut at max_new_tokens, after max_turns replies, or when the next turn would pass max_total_len tokens.

Test: python -m pytest tests/test_tool_rollout.py -q
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from decimal import Decimal

import torch

from model import chat_format
from model.chat_format import IM_END, THINK_OPEN
from trainer.chat_utils import ReplyParser
from trainer.rl_utils import NUMBER, Rollout, completion_mask_from_ids, left_pad
from trainer.tools import execute, tool_schemas
from trainer.trainer_utils import UserError, unwrap, user_path


# ----------------------------------------------------------------------------------------------------------------
# Tasks


def load_tool_tasks(path: str, limit: int = 0, tools: list[str] | None = None) -> list[dict]:
    """The tasks of a JSONL file (see the module docstring); a bad line is a UserError naming it. tools: the tool
    names a run may execute; a task without "tools" is offered all of them, one offering any other is a
    UserError."""
    tasks, full = [], user_path(path)
    if not os.path.isfile(full):
        raise UserError(f"{path}: no such file; pass --data_path a JSONL of tool tasks (e.g. "
                        "dataset/demo/tool_test.jsonl, written by scripts/make_tool_data.py)")
    with open(full, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e}); one task object per line") from None
            msgs = rec.get("conversations") if isinstance(rec, dict) else None
            if not isinstance(msgs, list) or not msgs or not isinstance(rec.get("gt"), str):
                raise UserError(f'{path}:{n}: a tool task needs "conversations" (a list of messages) and "gt" (the '
                                'reference answer as a string); see scripts/make_tool_data.py')
            if tools is not None:
                offered = tool_names(rec)
                if not rec.get("tools"):
                    rec["tools"] = tool_schemas(tools)
                elif not set(offered) <= set(tools):
                    other = ", ".join(sorted(set(offered) - set(tools)))
                    raise UserError(f"{path}:{n}: the task offers tool(s) {other} that this run does not run "
                                    f"(--tools {','.join(tools)}); add them to --tools (names from trainer/tools.py) "
                                    "or drop the task")
            tasks.append(rec)
            if limit and len(tasks) == limit:
                break
    if not tasks:
        raise UserError(f"{path}: no tasks in it")
    return tasks


def tool_names(task: dict) -> list[str]:
    return [t.get("function", t).get("name") for t in task.get("tools") or []]


def answer_correct(answer: str, gt: str) -> bool:
    """A numeric reference must equal the last number of the answer exactly (Decimal, commas ignored: "372,156,147"
    counts); any other reference (a date, a weekday, a city) must occur in the answer, case-insensitively."""
    ref = gt.strip().replace(",", "")
    if NUMBER.fullmatch(ref) is None:
        return gt.strip().casefold() in answer.casefold()
    nums = NUMBER.findall(answer.replace(",", ""))
    return bool(nums) and Decimal(nums[-1]) == Decimal(ref)


# ----------------------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class TaskRollout:
    ids: list[int]                  # prompt + every reply and tool turn, as fed to / produced by the model
    mask: list[int]                 # 1 where the model generated the token (its loss mask), 0 elsewhere
    prompt_len: int
    messages: list[dict] = field(default_factory=list)   # assistant (content, tool_calls) and tool messages added
    replies: list[str] = field(default_factory=list)     # each reply's decoded text
    calls: int = 0                  # well-formed <tool_call> blocks (JSON with a "name")
    valid_calls: int = 0            # ... naming an offered tool with schema-valid arguments
    malformed_calls: int = 0        # <tool_call> blocks that did not parse, or were cut off
    tool_errors: int = 0            # calls whose result was "error: ..." (invalid ones included)
    answer: str = ""                # the final reply's content (no tool call in it); "" when there was none
    finished: bool = False          # ended with a final answer
    truncated: bool = False         # a reply hit max_new_tokens or the conversation hit max_total_len


def tool_turn_text(tokenizer, results: list[str], enable_thinking: bool | None = None) -> str:
    """What follows a reply's <|im_end|> when its calls returned `results`: the template's "\\n" after the turn,
    the tool messages as one turn, and the next assistant header, taken from the real template by rendering a
    probe conversation with and without them."""
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    base = chat_format.render(tokenizer, probe)
    full = chat_format.render(tokenizer, probe + [{"role": "tool", "content": r} for r in results],
                              add_generation_prompt=True, enable_thinking=enable_thinking)
    cut = base.rindex(IM_END) + len(IM_END)
    if not full.startswith(base[:cut]):
        raise UserError("the tokenizer's chat template renders a conversation's start differently once tool "
                        "messages follow; tool rollouts need a template that appends them")
    return full[cut:]


def hf_generate(model, tokenizer, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                top_k: int = 0):
    """A generate function for tool_rollout: left-padded batch through model.generate, each row's new ids up to
    and including its first <|im_end|>."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 else \
        dict(do_sample=False)

    @torch.no_grad()
    def generate(rows: list[list[int]]) -> list[list[int]]:
        m = unwrap(model)
        device = next(m.parameters()).device
        ids, att = left_pad(rows, pad)
        width = ids.shape[1]
        was_training = m.training
        m.eval()
        try:
            out = m.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=eos, use_cache=True, **kw)
        finally:
            m.train(was_training)
        new = out[:, width:]
        keep = completion_mask_from_ids(new, eos).sum(dim=1).long().tolist() if new.shape[1] else [0] * len(rows)
        return [row[:n].tolist() for row, n in zip(new, keep)]
    return generate


def tool_rollout(model, tokenizer, tasks: list[dict], *, max_turns: int = 3, max_new_tokens: int = 128,
                 max_total_len: int = 1024, temperature: float = 0.0, top_p: float = 1.0,
                 enable_thinking: bool | None = None, generate=None) -> list[TaskRollout]:
    """Run every task to its end, batching the tasks still going at each turn. `generate(rows) -> new ids per row`
    replaces the model (tests script it); by default hf_generate(model, tokenizer, ...)."""
    if max_turns < 1:
        raise ValueError("max_turns must be >= 1")
    generate = generate or hf_generate(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_p=top_p)
    eos = tokenizer.eos_token_id
    outs, in_think = [], []
    for task in tasks:
        text = chat_format.render(tokenizer, task["conversations"], task.get("tools"), add_generation_prompt=True,
                                  enable_thinking=enable_thinking)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= max_total_len:
            raise UserError(f"a task's prompt takes {len(ids)} tokens, max_total_len is {max_total_len}; raise it "
                            "or offer fewer tools")
        outs.append(TaskRollout(ids=list(ids), mask=[0] * len(ids), prompt_len=len(ids)))
        in_think.append(text.rstrip().endswith(THINK_OPEN))
    active = list(range(len(tasks)))
    for _turn in range(max_turns):
        if not active:
            break
        new = generate([outs[i].ids for i in active])
        still = []
        for i, gen in zip(active, new):
            r, task = outs[i], tasks[i]
            room = max_total_len - len(r.ids)
            cut = len(gen) > room or len(gen) > max_new_tokens
            gen = gen[:min(room, max_new_tokens)]
            r.ids += gen
            r.mask += [1] * len(gen)
            ended = bool(gen) and gen[-1] == eos and not cut
            text = tokenizer.decode(gen, skip_special_tokens=True)
            r.replies.append(text)
            parser = ReplyParser(tools=True, in_think=in_think[i] and _turn == 0)
            events = parser.feed(text) + parser.finish()
            content = "".join(v for k, v in events if k == "content")
            calls = [v for k, v in events if k == "tool_call"]
            r.calls += len(calls)
            r.malformed_calls += parser.malformed
            r.messages.append({"role": "assistant", "content": content,
                               **({"tool_calls": [{"type": "function", "function": c} for c in calls]}
                                  if calls else {})})
            if not ended:
                r.truncated = True
                continue
            if not calls:
                r.answer, r.finished = content, True
                continue
            results = []
            for c in calls:
                res = execute(c, allowed=tool_names(task))
                r.valid_calls += res.valid
                r.tool_errors += not res.ok
                results.append(res.text)
                r.messages.append({"role": "tool", "content": res.text})
            follow = tokenizer(tool_turn_text(tokenizer, results, enable_thinking),
                               add_special_tokens=False)["input_ids"]
            if len(r.ids) + len(follow) >= max_total_len:
                r.truncated = True
                continue
            r.ids += follow
            r.mask += [0] * len(follow)
            still.append(i)
        active = still
    return outs


def as_rollout(results: list[TaskRollout], pad_id: int, device=None) -> Rollout:
    """The task rollouts as one RL batch (rl_utils.Rollout) for the GRPO-family updates: prompts left-padded to one
    width P, everything after them (replies and tool turns) right-padded to one width R. The attention mask is 1 on
    every real token, tool turns included (the model reads them); the completion mask is each TaskRollout's mask,
    so only the model's own tokens carry loss. truncated: a reply hit its token limit or the task hit the length
    limit (--mask_truncated_completions). prompts: empty strings (the tasks hold the prompts)."""
    P = max(r.prompt_len for r in results)
    R = max(len(r.ids) - r.prompt_len for r in results)
    n = len(results)
    input_ids = torch.full((n, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, P + R), dtype=torch.long)
    completion_mask = torch.zeros((n, R), dtype=torch.float32)
    for i, r in enumerate(results):
        rest = len(r.ids) - r.prompt_len
        input_ids[i, P - r.prompt_len:P + rest] = torch.tensor(r.ids, dtype=torch.long)
        attention_mask[i, P - r.prompt_len:P + rest] = 1
        completion_mask[i, :rest] = torch.tensor(r.mask[r.prompt_len:], dtype=torch.float32)
    input_ids, attention_mask, completion_mask = (t.to(device) for t in (input_ids, attention_mask, completion_mask))
    return Rollout(input_ids=input_ids, attention_mask=attention_mask, prompt_len=P,
                   completion_ids=input_ids[:, P:], completion_mask=completion_mask,
                   completions=["".join(r.replies) for r in results], prompts=[""] * n,
                   truncated=torch.tensor([r.truncated for r in results], dtype=torch.bool, device=device))


def score_task(task: dict, r: TaskRollout) -> dict:
    """Per-task numbers for evaluation and rewards."""
    needs = bool(task.get("needs_tool", True))
    return {"success": r.finished and answer_correct(r.answer, task["gt"]), "needs_tool": needs,
            "calls": r.calls, "valid_calls": r.valid_calls, "malformed_calls": r.malformed_calls,
            "tool_errors": r.tool_errors, "finished": r.finished, "truncated": r.truncated,
            # no call attempted at all (a botched <tool_call> is a try, counted as malformed instead)
            "answered_without_tool": needs and r.finished and r.calls + r.malformed_calls == 0,
            "generated_tokens": sum(r.mask)}


def summarize(scores: list[dict]) -> dict:
    """Totals over tasks: success rate (all, tool tasks, no-tool tasks), tool-call validity, calls per task, the
    share of tool tasks answered without any call."""
    n = len(scores)
    tool = [s for s in scores if s["needs_tool"]]
    plain = [s for s in scores if not s["needs_tool"]]
    calls = sum(s["calls"] for s in scores)
    attempts = calls + sum(s["malformed_calls"] for s in scores)

    def rate(xs, key):
        return sum(bool(x[key]) for x in xs) / len(xs) if xs else None
    return {"tasks": n, "success": rate(scores, "success"), "success_tool_tasks": rate(tool, "success"),
            "success_no_tool_tasks": rate(plain, "success"), "tool_tasks": len(tool), "no_tool_tasks": len(plain),
            "call_attempts": attempts, "calls": calls, "valid_calls": sum(s["valid_calls"] for s in scores),
            "malformed_calls": sum(s["malformed_calls"] for s in scores),
            "tool_errors": sum(s["tool_errors"] for s in scores),
            "call_validity": sum(s["valid_calls"] for s in scores) / attempts if attempts else None,
            "calls_per_task": calls / n if n else None,
            "answered_without_tool": sum(s["answered_without_tool"] for s in scores),
            "answered_without_tool_rate": rate(tool, "answered_without_tool"),
            "no_tool_tasks_with_calls": sum(s["calls"] > 0 for s in plain),
            "finished": sum(s["finished"] for s in scores), "truncated": sum(s["truncated"] for s in scores)}
