"""Generate the demo tool-use data in dataset/demo/ (deterministic: the same bytes every run).

    python scripts/make_tool_data.py                      # rewrites dataset/demo/tool_{sft,rl,test}.jsonl
    python scripts/make_tool_data.py --out_dir /tmp/tools --sft 2400 --rl 200    # a larger train split (the demo)

Tasks a small model cannot do in its head (products of 4-5 digit numbers, unit conversions with odd factors, dates
hundreds of days apart, weekdays, table lookups), plus small sums that need no tool, so calling a tool is a choice.
What the model copies (arguments from the question, the result into the answer) is the same run of tokens where it
reads and where it writes it (make_task, copy_tokens). Tool schemas without argument descriptions (concise).
Every answer comes from running the real tool (trainer/tools.py). It lives in scripts/ because it imports trainer/
(dataset/ may not, tests/test_layering.py).

tool_sft.jsonl   SFT: {"conversations": [user, assistant {"content": "", "tool_calls": [{"name", "arguments"}]},
                 tool {"content": result}, assistant {"content": final answer}], "tools": [schemas]}; no-tool tasks
                 are [user, assistant] with the tools still offered
tool_rl.jsonl    agent RL prompts: {"conversations": [user], "tools": [...], "gt": "answer", "needs_tool": bool,
tool_test.jsonl  "kind": str}; tool_test.jsonl is the held-out split, same format

Train (sft, rl) and test are disjoint by construction: the first factor of a product is even in train and odd in
test, a conversion's value has an even tenth digit in train, a date task's start date has an even ordinal in train,
lookup keys are split 3:1, small sums by (7a + 3b) mod 4; written files are checked to share no question.
"""
import argparse
import datetime as dt
import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.tools import lookup_table, run_tool_call, tool_schemas  # noqa: E402

CONVERSIONS = [("mile", "km"), ("pound", "kg"), ("inch", "cm"), ("foot", "m"), ("fahrenheit", "celsius"),
               ("ounce", "g"), ("GiB", "MB"), ("nautical_mile", "mile"), ("stone", "pound"), ("yard", "m")]
KINDS = ["multiply", "convert", "date_add", "days_between", "weekday", "atomic_number", "capital", "no_tool"]
DISTRACTORS = ["calculator", "unit_convert", "date_add", "days_between", "weekday", "lookup"]


def in_test(kind: str, x) -> bool:
    """The split rule (module docstring), on the value that decides it."""
    if kind == "multiply":
        return x % 2 == 1
    if kind == "convert":
        return round(x * 10) % 2 == 1
    if kind in ("date_add", "days_between", "weekday"):
        return x.toordinal() % 2 == 1
    if kind == "no_tool":
        a, b = x
        return (7 * a + 3 * b) % 4 == 0
    raise ValueError(kind)


def keys_in_split(table: str, test: bool) -> list[str]:
    keys = sorted(lookup_table()[table])
    return [k for i, k in enumerate(keys) if (i % 4 == 3) == test]


def call(name: str, **arguments) -> tuple[dict, str]:
    c = {"name": name, "arguments": arguments}
    result = run_tool_call(c)
    assert not result.startswith("error"), (c, result)
    return c, result


def pick_date(rng: random.Random, kind: str, test: bool) -> dt.date:
    while True:
        d = dt.date(2000, 1, 1) + dt.timedelta(days=rng.randrange(0, 11000))
        if in_test(kind, d) == test:
            return d


def make_task(rng: random.Random, kind: str, test: bool) -> dict:
    """One task: the question, the tool it needs (None: no tool), the call, the tool's result, the final answer.
    Phrased so that what the model copies is the same tokens where it reads and where it writes (copy_tokens):
    a string argument (an expression, a date, a key) follows a non-space character in the question, as it follows
    '"' in the call; a number argument follows a space, as it follows '": ' in the call; the result follows '**' in
    the final answer, as it follows a newline in the tool message."""
    zh = rng.random() < 0.5
    if kind == "multiply":
        while True:
            a = rng.randrange(1000, 100000)
            if in_test(kind, a) == test:
                break
        b = rng.randrange(1000, 100000)
        e = f"{a} * {b}"
        q = rng.choice([f"计算{e}", f"{e} 等于多少？"]) if zh else rng.choice([f"{e} = ?", f'What is "{e}"?'])
        c, r = call("calculator", expression=e)
        final, tool = f"{e} = **{r}**", "calculator"
    elif kind == "convert":
        src, dst = rng.choice(CONVERSIONS)
        while True:
            v = rng.randrange(11, 9999) / 10
            if in_test(kind, v) == test:
                break
        q = f"把 {v} {src} 换算成 {dst}" if zh else rng.choice([f"How many {dst} is {v} {src}?",
                                                                 f"Convert {v} {src} to {dst}."])
        c, r = call("unit_convert", value=v, from_unit=src, to_unit=dst)
        final, tool = f"{v} {src} = **{r}** {dst}", "unit_convert"
    elif kind == "date_add":
        d, n = pick_date(rng, kind, test), rng.randrange(100, 900)
        q = f"{d} 之后 {n} 天是哪一天？" if zh else f"{d} + {n} days = ?"
        c, r = call("date_add", date=d.isoformat(), days=n)
        final, tool = f"{d} + {n} days = **{r}**", "date_add"
    elif kind == "days_between":
        d = pick_date(rng, kind, test)
        e = d + dt.timedelta(days=rng.randrange(150, 1500))
        q = f"从{d}到{e}有多少天？" if zh else f'How many days are there from "{d}" to "{e}"?'
        c, r = call("days_between", start=d.isoformat(), end=e.isoformat())
        final, tool = f"{d} -> {e}: **{r}** days", "days_between"
    elif kind == "weekday":
        d = pick_date(rng, kind, test)
        q = f"{d}是星期几？" if zh else f"{d}: what day of the week is it?"
        c, r = call("weekday", date=d.isoformat())
        final, tool = f"{d}: **{r}**", "weekday"
    elif kind in ("atomic_number", "capital"):
        key = rng.choice(keys_in_split(kind, test))
        c, r = call("lookup", table=kind, key=key)
        if kind == "atomic_number":
            q = f"{key} 的原子序数是多少？" if zh else rng.choice([f"{key}: what is its atomic number?",
                                                                  f'Atomic number of "{key}"?'])
        else:
            q = f"{key} 的首都是哪里？" if zh else rng.choice([f"{key}: what is its capital?",
                                                              f'Which city is the capital of "{key}"?'])
        final, tool = f"{key}: **{r}**", "lookup"
    elif kind == "no_tool":
        while True:
            a, b = rng.randrange(1, 10), rng.randrange(1, 10)
            if in_test(kind, (a, b)) == test:
                break
        q = f"{a} 加 {b} 等于多少？" if zh else f"What is {a} + {b}?"
        r = str(a + b)
        c, final, tool = None, f"{a} + {b} = **{r}**", None
    else:
        raise ValueError(kind)
    offered = [tool or "calculator"]
    if rng.random() < 0.3:  # sometimes a second tool, so the model must pick the right one
        offered.append(rng.choice([t for t in DISTRACTORS if t not in offered]))
        rng.shuffle(offered)
    return {"question": q, "call": c, "result": r, "final": final, "tools": [concise(s) for s in
                                                                              tool_schemas(offered)],
            "needs_tool": tool is not None, "kind": kind}


def concise(schema: dict) -> dict:
    """A tool's schema without the arguments' descriptions: the prompt is then ~40% shorter (a demo model trains
    and rolls out that much faster), and the names and types it keeps are all a call needs."""
    f = schema["function"]
    props = {name: {k: v for k, v in spec.items() if k != "description"}
             for name, spec in f["parameters"]["properties"].items()}
    return {"type": "function", "function": {**f, "parameters": {**f["parameters"], "properties": props}}}


# Arguments from a closed list that every split holds (memorised, not copied): their tokens may differ.
CLOSED_ARGUMENTS = ("from_unit", "to_unit", "table")


def copy_tokens(tokenizer, task: dict) -> list[tuple[list[int], list[int]]]:
    """(the tokens to copy, the tokens copied from) for each value the model copies in a task: every call argument
    but CLOSED_ARGUMENTS against the question, and the tool's result against the final answer. A string argument is
    written after '"' in the call (so without a leading space), a number after '": ' (with one); the result is read
    after a newline. The generator phrases the texts so that each copied value is a run of the same tokens in both
    (tests/test_tools.py::test_demo_tasks_copy_the_same_tokens_they_read)."""
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    pairs = []
    if task["call"] is not None:
        for k, v in task["call"]["arguments"].items():
            if k not in CLOSED_ARGUMENTS:
                pairs.append((ids(v if isinstance(v, str) else " " + json.dumps(v)), ids(task["question"])))
        pairs.append((ids(task["result"]), ids(task["final"])))
    return pairs


def sft_record(t: dict) -> dict:
    msgs = [{"role": "user", "content": t["question"]}]
    if t["call"] is not None:
        msgs += [{"role": "assistant", "content": "", "tool_calls": [t["call"]]},
                 {"role": "tool", "content": t["result"]}]
    msgs.append({"role": "assistant", "content": t["final"]})
    return {"conversations": msgs, "tools": t["tools"]}


def rl_record(t: dict) -> dict:
    return {"conversations": [{"role": "user", "content": t["question"]}], "tools": t["tools"], "gt": t["result"],
            "needs_tool": t["needs_tool"], "kind": t["kind"]}


def tasks(rng: random.Random, n: int, test: bool, seen: set) -> list[dict]:
    """n tasks, the kinds in turn, no question twice (within this call and against `seen`). A kind with no new
    question left (the lookup tables and the small sums have a few hundred) drops out of the turn, so a large
    split holds fewer of it."""
    out, kinds = [], list(KINDS)
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        for _ in range(200):
            t = make_task(rng, kind, test)
            if t["question"] not in seen:
                seen.add(t["question"])
                out.append(t)
                break
        else:
            kinds.remove(kind)
            if not kinds:
                raise SystemExit(f"cannot draw {n} distinct tasks for this split; ask for fewer")
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write the demo tool-use data (SFT, agent RL prompts, held-out test)")
    p.add_argument("--out_dir", default=str(ROOT / "dataset" / "demo"), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--sft", type=int, default=240, help="SFT conversations (train split)")
    p.add_argument("--rl", type=int, default=160, help="agent RL prompts (train split)")
    p.add_argument("--test", type=int, default=120, help="held-out tasks (test split)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    train_seen, test_seen = set(), set()
    sft = tasks(rng, args.sft, False, train_seen)
    rl = tasks(rng, args.rl, False, train_seen)
    test = tasks(rng, args.test, True, test_seen)
    overlap = train_seen & test_seen
    assert not overlap, f"train and test share questions: {sorted(overlap)[:3]}"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "tool_sft.jsonl", [sft_record(t) for t in sft])
    write_jsonl(out / "tool_rl.jsonl", [rl_record(t) for t in rl])
    write_jsonl(out / "tool_test.jsonl", [rl_record(t) for t in test])
    print(f"wrote {len(sft)} SFT, {len(rl)} RL and {len(test)} test tasks to {out}")


if __name__ == "__main__":
    main()
