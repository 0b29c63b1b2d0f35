"""The built-in tools against hand cases, hostile input returning an error string (never an exception), schemas
derived from a function, the one <tool_call> parser on well-formed / several / truncated / malformed calls, and the
demo tool data (deterministic, splits disjoint, every answer the tool's).

    python -m pytest tests/test_tools.py -q
"""
import json
import re
from typing import Literal

import pytest

from conftest import DEMO, run_script
from trainer import tools
from trainer.chat_utils import ReplyParser, parse_reply
from trainer.tools import TOOLS, execute, run_tool_call, tool, tool_schemas


def calc(expr):
    return run_tool_call({"name": "calculator", "arguments": {"expression": expr}})


@pytest.mark.parametrize("expr,want", [
    ("12345 * 6789", "83810205"), ("48213 * 77190", "3721561470"), ("(2.5 + 1) / 7", "0.5"), ("0.1 + 0.2", "0.3"),
    ("10 / 3", "3.333333"), ("2 / 3", "0.666667"), ("-7 // 2", "-4"), ("-7 % 3", "2"), ("2 ** -3", "0.125"),
    ("2^10", "1024"), ("3 × 4 ÷ 6", "2"), ("abs(-3) + max(1, 2, 3) - min(4, 5)", "2"), ("round(2.5)", "2"),
    ("-(-(-1))", "-1"), ("2.5e3 * 2", "5000"), ("99999 ** 2", "9999800001"), ("-0.0000001", "0"),
    ("123456789012345678901234567890 * 98765432109876543210", "12193263113702179522496570642237463801111263526900"),
])
def test_calculator_exact_values(expr, want):
    assert calc(expr) == want


@pytest.mark.parametrize("expr,why", [
    # "would have about": refused from the size estimate, before any power is computed
    ("9**9**9", "would have about 3.7e+08 digits"), ("10 ** 100 ** 2", "would have about"),
    ("2 ** -1000", "would have about"), ("10 ** 199 * 100", "digits"),
    ("(" * 100 + "1" + ")" * 100, "nests deeper"), ("-" * 250 + "1", "parts"), ("1e400", "too large"),
    ("__import__('os').system('echo hi')", "not allowed"), ("(lambda: 1)()", "not allowed"),
    ("().__class__.__bases__", "not allowed"), ("open('/etc/passwd')", "not allowed"), ("x + 1", "the name 'x'"),
    ("'a' * 3", "constant str"), ("[1, 2]", "not allowed"), ("1 if 1 else 2", "not allowed"),
    ("max(*[1, 2])", "max() takes"), ("min(x=1)", "not allowed"), ("2 ** 0.5", "whole-number exponents"),
    ("1 / 0", "division by zero"), ("5 % 0", "division by zero"), ("0 ** -1", "division by zero"),
    ("1 +", "cannot be parsed"), ("", "empty"), ("1" * 250, "digits"), ("9" * 2000, "longer than 2000"), ("9" * 1000, "at most 300"),
    ("abs(1, 2)", "takes 1..1"), ("round(1, 0.5)", "round(x, n)"), ("1 << 2", "not allowed"),
])
def test_calculator_hostile_input_is_an_error_string(expr, why):
    out = calc(expr)
    assert out.startswith("error: ") and why in out, out


def test_calculator_deadline_is_checked(monkeypatch):
    monkeypatch.setattr(tools, "CALC_DEADLINE_S", -1.0)  # already past: the first node stops it
    assert calc("1 + 1") == "error: the calculation took too long"


@pytest.mark.parametrize("args,want", [
    ({"value": 3, "from_unit": "mile", "to_unit": "km"}, "4.828032"),
    ({"value": 100, "from_unit": "fahrenheit", "to_unit": "celsius"}, "37.777778"),
    ({"value": -40, "from_unit": "C", "to_unit": "F"}, "-40"),
    ({"value": 0, "from_unit": "kelvin", "to_unit": "celsius"}, "-273.15"),
    ({"value": 1, "from_unit": "pound", "to_unit": "g"}, "453.59237"),
    ({"value": 2, "from_unit": "GiB", "to_unit": "MB"}, "2147.483648"),
    ({"value": 1.5, "from_unit": "hours", "to_unit": "second"}, "5400"),
    ({"value": 12, "from_unit": "Inches", "to_unit": "foot"}, "1"),
])
def test_unit_convert_exact_factors(args, want):
    assert run_tool_call({"name": "unit_convert", "arguments": args}) == want


@pytest.mark.parametrize("args,why", [
    ({"value": 3, "from_unit": "mile", "to_unit": "kg"}, "cannot convert length (mile) to mass (kg)"),
    ({"value": 3, "from_unit": "parsec", "to_unit": "m"}, "unknown unit 'parsec'"),
    ({"value": -500, "from_unit": "celsius", "to_unit": "kelvin"}, "below absolute zero"),
    ({"value": "3", "from_unit": "mile", "to_unit": "km"}, "'value' must be of type number, got str"),
    ({"value": True, "from_unit": "mile", "to_unit": "km"}, "must be of type number, got bool"),
    ({"value": 1e308, "from_unit": "GiB", "to_unit": "bit"}, "digits"),
    ({"value": 1, "from_unit": "m" * 400, "to_unit": "km"}, "at most 300"),
])
def test_unit_convert_errors(args, why):
    out = run_tool_call({"name": "unit_convert", "arguments": args})
    assert out.startswith("error: ") and why in out, out


def test_dates_and_lookup_by_hand():
    run = lambda name, **a: run_tool_call({"name": name, "arguments": a})  # noqa: E731
    assert run("date_add", date="2024-02-28", days=366) == "2025-02-28"      # across a leap day
    assert run("date_add", date="2024-03-01", days=-1) == "2024-02-29"
    assert run("days_between", start="2024-01-01", end="2025-01-01") == "366"
    assert run("days_between", start="2025-01-01", end="2024-12-25") == "-7"
    assert run("weekday", date="2026-12-07") == "Monday" and run("weekday", date="2000-01-01") == "Saturday"
    assert run("lookup", table="capital", key=" peru ") == "Lima"
    assert run("lookup", table="atomic_number", key="Iron") == "26"
    assert run("date_add", date="9999-12-31", days=5) == "error: the result is outside the years 1..9999"
    assert run("date_add", date="2024-01-01", days=10**7).startswith("error: days must be within")
    assert run("weekday", date="2024-02-30") == "error: date '2024-02-30' is not an ISO date YYYY-MM-DD"
    assert run("lookup", table="capitals", key="Peru").startswith("error: unknown table 'capitals'")
    assert run("lookup", table="capital", key="Atlantis") == "error: 'Atlantis' is not in the table capital"


@pytest.mark.parametrize("call,why", [
    ("not json", "the call is not valid JSON"), ("[1]", "a call is a JSON object"), ({"arguments": {}}, "a call is"),
    ({"name": "rm_rf"}, "unknown tool 'rm_rf' (known: calculator"),
    ({"name": "weekday", "arguments": "{bad"}, "the arguments are not valid JSON"),
    ({"name": "weekday", "arguments": "[1]"}, "must be a JSON object"),
    ({"name": "weekday", "arguments": {}}, "missing argument(s) date"),
    ({"name": "weekday", "arguments": {"date": "2024-01-01", "extra": 1}}, "unknown argument(s) extra"),
    ({"name": "date_add", "arguments": {"date": "2024-01-01", "days": 1.5}}, "'days' must be of type integer"),
    ({"name": "calculator", "arguments": {"expression": "1" * 5000}}, "longer than 2000"),
    ("x" * 10**6, "characters long"),
])
def test_bad_calls_are_error_strings(call, why):
    res = execute(call)
    assert res.text.startswith("error: ") and why in res.text and not res.valid and not res.ok, res


def test_call_forms_and_allowed_tools():
    # arguments as a JSON string (what the parser hands over), the OpenAI {"function": ...} wrapper, raw JSON text
    assert run_tool_call({"name": "calculator", "arguments": '{"expression": "6 * 7"}'}) == "42"
    assert run_tool_call({"type": "function", "function": {"name": "calculator",
                                                           "arguments": {"expression": "6*7"}}}) == "42"
    assert run_tool_call('{"name": "calculator", "arguments": {"expression": "6*7"}}') == "42"
    # a tool that exists but was not offered to the model is unknown to it
    assert execute({"name": "weekday", "arguments": {"date": "2024-01-01"}}, allowed=["calculator"]).text == \
        "error: unknown tool 'weekday' (known: calculator)"
    # a valid call whose tool fails: valid, not ok
    res = execute({"name": "calculator", "arguments": {"expression": "1/0"}})
    assert res.valid and not res.ok and res.text == "error: division by zero"


def test_a_tool_is_one_function_with_a_docstring():
    @tool
    def shout(text: str, times: int = 1, style: Literal["loud", "soft"] = "loud") -> str:
        """Upper-case a text.

        Args:
            text: the text to upper-case, which may be
                long and wrapped
            times: how often
            style: how
        """
        if times > 3:
            raise ValueError("too many")
        return (text.upper() if style == "loud" else text) * times
    try:
        assert tool_schemas(["shout"]) == [{"type": "function", "function": {
            "name": "shout", "description": "Upper-case a text.",
            "parameters": {"type": "object", "required": ["text"], "properties": {
                "text": {"type": "string", "description": "the text to upper-case, which may be long and wrapped"},
                "times": {"type": "integer", "description": "how often"},
                "style": {"type": "string", "enum": ["loud", "soft"], "description": "how"}}}}}]
        assert run_tool_call({"name": "shout", "arguments": {"text": "hi", "times": 2}}) == "HIHI"
        assert run_tool_call({"name": "shout", "arguments": {"text": "hi", "style": "odd"}}) == \
            "error: argument 'style' must be one of loud, soft"
        # the tool's own bug reaches the model as text
        assert run_tool_call({"name": "shout", "arguments": {"text": "hi", "times": 9}}) == \
            "error: the tool shout failed (ValueError: too many)"
    finally:
        del TOOLS["shout"]
    with pytest.raises(ValueError, match="unknown tool"):
        tool_schemas(["shout"])


# ----------------------------------------------------------------------------------------------------------------
# The one parser of <tool_call> blocks (trainer/chat_utils.py ReplyParser)

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2*3"}}\n</tool_call>'


def parsed(text):
    p = ReplyParser(tools=True)
    events = p.feed(text) + p.finish()
    return ([v for k, v in events if k == "tool_call"], "".join(v for k, v in events if k == "content"),
            p.malformed)


def test_parser_well_formed_several_truncated_malformed():
    calls, content, bad = parsed(CALL)
    assert calls == [{"name": "calculator", "arguments": '{"expression": "2*3"}'}] and content == "" and bad == 0
    assert run_tool_call(calls[0]) == "6"
    calls, content, bad = parsed("Let me compute.\n" + CALL + "\n" + CALL.replace("2*3", "4*5"))
    assert [json.loads(c["arguments"])["expression"] for c in calls] == ["2*3", "4*5"] and bad == 0
    assert content == "Let me compute."
    # cut off mid-call (max_new_tokens): no call, the text stays content, one malformed
    calls, content, bad = parsed(CALL[:30])
    assert calls == [] and content == CALL[:30] and bad == 1
    # not JSON / no name: stays content, counted; a good call after it still parses
    calls, content, bad = parsed('<tool_call>{"name": calc</tool_call>' + CALL + '<tool_call>[1]</tool_call>')
    assert len(calls) == 1 and bad == 2 and content.startswith('<tool_call>{"name": calc</tool_call>')
    assert parse_reply(CALL, tools=True)["tool_calls"] == parse_reply(CALL, tools=True)["tool_calls"][:1]
    # streamed in 3-character pieces: the same split
    p = ReplyParser(tools=True)
    events = [e for i in range(0, len(CALL * 2), 3) for e in p.feed((CALL * 2)[i:i + 3])] + p.finish()
    assert [k for k, _ in events] == ["tool_call", "tool_call"] and p.malformed == 0


# ----------------------------------------------------------------------------------------------------------------
# The demo data


def rows(name):
    return [json.loads(line) for line in DEMO.joinpath(name).read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_demo_tool_data_is_deterministic_disjoint_and_tool_checked(tmp_path):
    run_script("scripts/make_tool_data.py", "--out_dir", tmp_path, tmp=tmp_path)
    for name in ("tool_sft.jsonl", "tool_rl.jsonl", "tool_test.jsonl"):
        assert tmp_path.joinpath(name).read_bytes() == DEMO.joinpath(name).read_bytes(), name
    sft, rl, test = rows("tool_sft.jsonl"), rows("tool_rl.jsonl"), rows("tool_test.jsonl")
    train_q = {r["conversations"][0]["content"] for r in sft + rl}
    test_q = {r["conversations"][0]["content"] for r in test}
    assert not train_q & test_q
    # the split rule on the first factor of the products: odd in test, even in train
    def first_factors(rs):
        found = [re.search(r"(\d+) (?:\*|×|乘以) \d+", r["conversations"][0]["content"]) for r in rs]
        return [int(m.group(1)) for m in found if m]
    assert len(first_factors(test)) >= 10 and all(a % 2 for a in first_factors(test))
    assert len(first_factors(sft + rl)) >= 40 and not any(a % 2 for a in first_factors(sft + rl))
    # every SFT call, run again, gives the tool message it carries, and the final answer states it
    n_calls = 0
    for r in sft:
        msgs = r["conversations"]
        offered = [t["function"]["name"] for t in r["tools"]]
        for i, m in enumerate(msgs):
            for c in m.get("tool_calls") or []:
                assert c["name"] in offered and msgs[i + 1]["role"] == "tool"
                assert run_tool_call(c) == msgs[i + 1]["content"] and msgs[i + 1]["content"] in msgs[-1]["content"]
                n_calls += 1
    assert n_calls == sum(len([m for m in r["conversations"] if m["role"] == "tool"]) for r in sft) > 150
    kinds = {r["kind"] for r in test}
    assert kinds == {"multiply", "convert", "date_add", "days_between", "weekday", "atomic_number", "capital",
                     "no_tool"}
    assert all(r["needs_tool"] == (r["kind"] != "no_tool") for r in rl + test)
    assert sum(p.stat().st_size for p in DEMO.glob("tool_*")) < 500_000


def test_demo_tasks_copy_the_same_tokens_they_read():
    """What a demo task's model copies is the same run of tokens where it reads it and where it writes it: each
    argument (but the closed lists: units, table names) in the question and in the call the template renders, the
    tool's result in the tool message and in the final answer. The byte-level BPE splits ' 6306' as 'Ġ6','30','6'
    but '6306' after '"' as '6','30','6', so "Compute 6306 * 34936." would make a small model translate tokens."""
    import random
    import sys
    from transformers import AutoTokenizer
    from conftest import ROOT
    from model import chat_format
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_tool_data as gen
    tok = AutoTokenizer.from_pretrained(str(ROOT / "model"))

    def has(part, whole):
        return any(whole[i:i + len(part)] == part for i in range(len(whole) - len(part) + 1))
    rng, checked = random.Random(3), 0
    for i in range(64):  # every kind, both splits, both languages (4 draws of each pair)
        t = gen.make_task(rng, gen.KINDS[i % len(gen.KINDS)], test=bool(i // len(gen.KINDS) % 2))
        pairs = gen.copy_tokens(tok, t)
        if t["call"] is None:
            assert pairs == []
            continue
        rec = gen.sft_record(t)
        convo = tok(chat_format.render(tok, rec["conversations"], rec["tools"]), add_special_tokens=False)["input_ids"]
        n_args = len([k for k in t["call"]["arguments"] if k not in gen.CLOSED_ARGUMENTS])
        assert len(pairs) == n_args + 1
        for value, source in pairs:
            assert value and has(value, source), (t["question"], t["final"], tok.convert_ids_to_tokens(value))
            assert has(value, convo)  # ... and the rendered call / tool message hold the same tokens
            checked += 1
    assert checked > 80
    # the property fails for the old phrasing, so the check above can fail
    old = {**t, "question": "Compute 6306 * 34936.", "call": {"name": "calculator",
                                                               "arguments": {"expression": "6306 * 34936"}}}
    value, source = gen.copy_tokens(tok, old)[0]
    assert not has(value, source)
