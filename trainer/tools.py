"""Built-in tools a model may call, executed safely: calculator, unit conversion, date arithmetic, table lookup.

    from trainer.tools import run_tool_call, tool_schemas, tool
    schemas = tool_schemas(["calculator", "unit_convert"])         # OpenAI-style {"type": "function", ...} list
    run_tool_call({"name": "calculator", "arguments": '{"expression": "12345 * 6789"}'})    # -> "83810205"
    run_tool_call('{"name": "nope"}')                                 # -> "error: unknown tool 'nope' (known: ...)"

Adding a tool is one function: type-hinted parameters (str, int, float, bool, Literal[...]) and a docstring whose
first paragraph describes the tool and whose "Args:" lines ("name: text") describe the parameters; the schema is
derived from both. The function returns a string (what the model reads) or raises ToolError with a message:

    @tool
    def shout(text: str) -> str:
        \"\"\"Upper-case a text.

        Args:
            text: the text to upper-case
        \"\"\"
        return text.upper()

run_tool_call never raises for anything a model can write: bad JSON, unknown tools, missing / unknown / mistyped
arguments, oversized input and tool failures all come back as one line "error: ..." that the model reads.
The calculator parses with an `ast` whitelist (numbers, + - * / // % **, unary +/-, parentheses, abs/min/max/round)
and never evaluates model text; its time is bounded by construction (input length, node count, nesting depth,
digits of every intermediate result, checked before a power is computed) and by a deadline checked at every node.
Built-in tools are pure functions of their arguments; a user-added tool is trusted code and is not time-limited
(a Python thread cannot be killed).

Test: python -m pytest tests/test_tools.py -q
"""
from __future__ import annotations

import ast
import datetime as dt
import inspect
import json
import math
import re
import time
import typing
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE_PATH = ROOT / "dataset" / "demo" / "tool_table.json"

MAX_ARGS_CHARS = 2000      # the JSON of one call's arguments
MAX_STR_CHARS = 300        # one string argument
MAX_EXPR_NODES = 200       # calculator: syntax-tree nodes
MAX_EXPR_DEPTH = 30        # calculator: nesting depth (the parser itself recurses; deep input must not reach it)
MAX_DIGITS = 200           # calculator: digits of any intermediate numerator or denominator
CALC_DEADLINE_S = 0.5      # calculator: wall time, checked at every node
DECIMALS = 6               # results that do not terminate are rounded to this many decimal places


class ToolError(Exception):
    """A tool's failure, as the model should read it (the message, no traceback)."""


# ----------------------------------------------------------------------------------------------------------------
# Registry: one decorator derives an OpenAI-style schema from a function's signature and docstring

TOOLS: dict[str, "Tool"] = {}
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


class Tool:
    def __init__(self, fn, schema: dict):
        self.fn, self.schema, self.name = fn, schema, schema["function"]["name"]

    @property
    def params(self) -> dict:
        return self.schema["function"]["parameters"]


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """(description = the first paragraph, {parameter: its "Args:" line})."""
    doc = inspect.cleandoc(doc or "")
    head, _, rest = doc.partition("\n\n")
    args, indent, last = {}, None, None
    for line in rest.splitlines():
        if line.strip() == "Args:":
            indent = -1
            continue
        if indent is None or not line.strip():
            continue
        here = len(line) - len(line.lstrip())
        m = re.match(r"\s*(\w+):\s*(.*)", line)
        if m and indent in (-1, here):
            indent, last = here, m.group(1)
            args[last] = m.group(2).strip()
        elif last is not None and here > indent:  # a wrapped description
            args[last] += " " + line.strip()
        else:
            indent = None
    return " ".join(head.split()), args


def tool(fn):
    """Register `fn` as a tool; its schema comes from the signature (types, defaults) and the docstring."""
    description, arg_docs = _docstring_parts(fn.__doc__)
    hints = typing.get_type_hints(fn)
    props, required = {}, []
    for name, p in inspect.signature(fn).parameters.items():
        hint = hints.get(name, str)
        if typing.get_origin(hint) is typing.Literal:
            values = list(typing.get_args(hint))
            prop = {"type": _JSON_TYPES[type(values[0])], "enum": values}
        elif hint in _JSON_TYPES:
            prop = {"type": _JSON_TYPES[hint]}
        else:
            raise TypeError(f"tool {fn.__name__}: parameter {name} has type {hint}; use str, int, float, bool or "
                            "Literal[...]")
        if name in arg_docs:
            prop["description"] = arg_docs[name]
        props[name] = prop
        if p.default is inspect.Parameter.empty:
            required.append(name)
    schema = {"type": "function", "function": {"name": fn.__name__, "description": description,
                                               "parameters": {"type": "object", "properties": props,
                                                              "required": required}}}
    TOOLS[fn.__name__] = Tool(fn, schema)
    return fn


def tool_schemas(names=None) -> list[dict]:
    """The schemas of the named tools (all built-in ones by default), for the chat template's `tools`."""
    names = list(TOOLS) if names is None else list(names)
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tool(s) {', '.join(unknown)}; known: {', '.join(TOOLS)}")
    return [TOOLS[n].schema for n in names]


# ----------------------------------------------------------------------------------------------------------------
# Executing one call


class CallResult(typing.NamedTuple):
    text: str          # what the model reads (the tool message's content)
    valid: bool        # the call named a known tool with schema-valid arguments (a tool may still fail)
    ok: bool           # ... and the tool succeeded


def _check_arg(name: str, value, prop: dict):
    kind = prop["type"]
    if kind == "integer":
        good = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        good = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind == "boolean":
        good = isinstance(value, bool)
    else:
        good = isinstance(value, str)
        if good and len(value) > MAX_STR_CHARS:
            raise ToolError(f"argument '{name}' is {len(value)} characters long; at most {MAX_STR_CHARS}")
    if not good:
        raise ToolError(f"argument '{name}' must be of type {kind}, got {type(value).__name__}")
    if "enum" in prop and value not in prop["enum"]:
        raise ToolError(f"argument '{name}' must be one of {', '.join(map(str, prop['enum']))}")


def _arguments(t: Tool, raw) -> dict:
    if isinstance(raw, str):
        if len(raw) > MAX_ARGS_CHARS:
            raise ToolError(f"the arguments are {len(raw)} characters long; at most {MAX_ARGS_CHARS}")
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            raise ToolError(f"the arguments are not valid JSON ({e})") from None
    elif len(json.dumps(raw, ensure_ascii=False, default=str)) > MAX_ARGS_CHARS:
        raise ToolError(f"the arguments are longer than {MAX_ARGS_CHARS} characters")
    if not isinstance(raw, dict):
        raise ToolError("the arguments must be a JSON object")
    props, required = t.params["properties"], t.params["required"]
    unknown = [k for k in raw if k not in props]
    if unknown:
        raise ToolError(f"unknown argument(s) {', '.join(map(str, unknown))}; {t.name} takes "
                        f"{', '.join(props) or 'none'}")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ToolError(f"missing argument(s) {', '.join(missing)}")
    for k, v in raw.items():
        _check_arg(k, v, props[k])
    return raw


def execute(call, allowed=None) -> CallResult:
    """Run one call: {"name", "arguments" (JSON string or object)}, optionally wrapped as {"function": {...}}, or
    the JSON text of such an object. `allowed`: the tool names offered to the model (default: every tool).
    Never raises for model-written input."""
    try:
        if isinstance(call, str):
            if len(call) > MAX_ARGS_CHARS + 200:
                raise ToolError(f"the call is {len(call)} characters long; at most {MAX_ARGS_CHARS + 200}")
            try:
                call = json.loads(call)
            except ValueError as e:
                raise ToolError(f"the call is not valid JSON ({e})") from None
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            call = call["function"]
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ToolError('a call is a JSON object {"name": <tool>, "arguments": {...}}')
        name = call["name"]
        names = list(TOOLS) if allowed is None else [n for n in allowed if n in TOOLS]
        if name not in names:
            raise ToolError(f"unknown tool '{name[:50]}' (known: {', '.join(names)})")
        t = TOOLS[name]
        args = _arguments(t, call.get("arguments", {}))
    except ToolError as e:
        return CallResult(f"error: {e}", False, False)
    try:
        return CallResult(str(t.fn(**args)), True, True)
    except ToolError as e:
        return CallResult(f"error: {e}", True, False)
    except Exception as e:  # noqa: BLE001 -- a tool's own bug must reach the model as text, not stop a training run
        return CallResult(f"error: the tool {t.name} failed ({type(e).__name__}: {str(e)[:200]})", True, False)


def run_tool_call(call, allowed=None) -> str:
    """The text the model reads for one call (the result, or "error: ..."); see execute()."""
    return execute(call, allowed).text


# ----------------------------------------------------------------------------------------------------------------
# Numbers: exact fractions in, a plain decimal string out


def format_number(x: Fraction) -> str:
    """An exact decimal when x terminates within DECIMALS places (integers as integers), else x rounded half away
    from zero to DECIMALS places; trailing zeros dropped. Never scientific notation."""
    scaled = x * 10 ** DECIMALS
    q = abs(scaled.numerator) // scaled.denominator
    if 2 * (abs(scaled.numerator) % scaled.denominator) >= scaled.denominator:
        q += 1
    sign = "-" if x < 0 and q else ""
    whole, frac = divmod(q, 10 ** DECIMALS)
    frac_s = str(frac).rjust(DECIMALS, "0").rstrip("0")
    return f"{sign}{whole}" + (f".{frac_s}" if frac_s else "")


def _digits(x: Fraction) -> int:
    return max(len(str(abs(x.numerator))), len(str(x.denominator)))


def _bounded(x: Fraction) -> Fraction:
    if _digits(x) > MAX_DIGITS:
        raise ToolError(f"a result has more than {MAX_DIGITS} digits")
    return x


_NUMBER_TEXT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?")


def _number(text: str) -> Fraction:
    text = text.strip().replace(",", "").replace("_", "")
    if not _NUMBER_TEXT.fullmatch(text):
        raise ToolError(f"'{text[:40]}' is not a number")
    try:
        return _bounded(Fraction(Decimal(text)))
    except InvalidOperation:
        raise ToolError(f"'{text[:40]}' is not a number") from None


# ----------------------------------------------------------------------------------------------------------------
# Calculator

_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_FUNCS = {"abs": (1, 1), "min": (2, 8), "max": (2, 8), "round": (1, 2)}


def _depth(text: str) -> int:
    d = best = 0
    for ch in text:
        if ch in "([":
            d += 1
            best = max(best, d)
        elif ch in ")]":
            d -= 1
    return best


def _power(base: Fraction, exp: Fraction) -> Fraction:
    if exp.denominator != 1:
        raise ToolError("only whole-number exponents are supported")
    e = exp.numerator
    if base == 0 and e < 0:
        raise ToolError("division by zero")
    if base in (0, 1) or abs(e) <= 1:
        return base ** e
    if base == -1:
        return Fraction(-1 if e % 2 else 1)
    # digits of the result, known before computing it: abs(e) * log10 of the larger of numerator / denominator
    size = abs(e) * max(math.log10(abs(base.numerator)) if base.numerator else 0, math.log10(base.denominator))
    if size > MAX_DIGITS:
        raise ToolError(f"the power would have about {size:.3g} digits; at most {MAX_DIGITS}")
    return base ** e


def _eval(node, deadline: float) -> Fraction:
    if time.monotonic() > deadline:
        raise ToolError("the calculation took too long")
    if isinstance(node, ast.Expression):
        return _eval(node.body, deadline)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise ToolError("a number is too large")
        # repr of a float literal is the shortest text that reads back to it: "0.1" stays exactly 1/10
        return _bounded(Fraction(Decimal(repr(node.value))) if isinstance(node.value, float)
                        else Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand, deadline)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, _BINOPS):
        a, b = _eval(node.left, deadline), _eval(node.right, deadline)
        op = node.op
        if isinstance(op, ast.Pow):
            return _bounded(_power(a, b))
        if isinstance(op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise ToolError("division by zero")
        if isinstance(op, ast.Add):
            r = a + b
        elif isinstance(op, ast.Sub):
            r = a - b
        elif isinstance(op, ast.Mult):
            r = a * b
        elif isinstance(op, ast.Div):
            r = a / b
        elif isinstance(op, ast.FloorDiv):
            r = Fraction(a // b)
        else:
            r = a % b
        return _bounded(r)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
            and not node.keywords:
        lo, hi = _FUNCS[node.func.id]
        if not lo <= len(node.args) <= hi:
            raise ToolError(f"{node.func.id}() takes {lo}..{hi} arguments")
        vals = [_eval(a, deadline) for a in node.args]
        if node.func.id == "abs":
            return abs(vals[0])
        if node.func.id == "min":
            return min(vals)
        if node.func.id == "max":
            return max(vals)
        places = vals[1] if len(vals) > 1 else Fraction(0)
        if places.denominator != 1 or not 0 <= places <= 20:
            raise ToolError("round(x, n) needs a whole n from 0 to 20")
        return Fraction(round(vals[0], int(places)))
    what = type(node).__name__
    if isinstance(node, ast.Name):
        what = f"the name '{node.id[:20]}'"
    elif isinstance(node, ast.Constant):
        what = f"the constant {type(node.value).__name__}"
    raise ToolError(f"{what} is not allowed; use numbers, + - * / // % ** ( ) and abs min max round")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly (big integers and decimals).

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "12345 * 6789" or "(2.5 + 1) / 7"
    """
    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**")
    if not text.strip():
        raise ToolError("the expression is empty")
    if _depth(text) > MAX_EXPR_DEPTH:
        raise ToolError(f"the expression nests deeper than {MAX_EXPR_DEPTH} levels")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ToolError(f"the expression cannot be parsed ({type(e).__name__})") from None
    nodes = sum(1 for _ in ast.walk(tree))
    if nodes > MAX_EXPR_NODES:
        raise ToolError(f"the expression has {nodes} parts; at most {MAX_EXPR_NODES}")
    return format_number(_eval(tree, time.monotonic() + CALC_DEADLINE_S))


# ----------------------------------------------------------------------------------------------------------------
# Unit conversion: exact factors to one base unit per category (temperature is affine)

_F = Fraction
UNITS: dict[str, tuple[str, Fraction]] = {
    # length, base metre
    "mm": ("length", _F(1, 1000)), "cm": ("length", _F(1, 100)), "m": ("length", _F(1)), "km": ("length", _F(1000)),
    "inch": ("length", _F("0.0254")), "foot": ("length", _F("0.3048")), "yard": ("length", _F("0.9144")),
    "mile": ("length", _F("1609.344")), "nautical_mile": ("length", _F(1852)),
    # mass, base kilogram
    "mg": ("mass", _F(1, 10**6)), "g": ("mass", _F(1, 1000)), "kg": ("mass", _F(1)), "tonne": ("mass", _F(1000)),
    "ounce": ("mass", _F("0.028349523125")), "pound": ("mass", _F("0.45359237")), "stone": ("mass", _F("6.35029318")),
    # time, base second
    "second": ("time", _F(1)), "minute": ("time", _F(60)), "hour": ("time", _F(3600)), "day": ("time", _F(86400)),
    "week": ("time", _F(604800)),
    # data, base byte
    "bit": ("data", _F(1, 8)), "byte": ("data", _F(1)), "KB": ("data", _F(1000)), "MB": ("data", _F(10**6)),
    "GB": ("data", _F(10**9)), "KiB": ("data", _F(1024)), "MiB": ("data", _F(2**20)), "GiB": ("data", _F(2**30)),
    # temperature: handled apart (offsets), listed for the category check
    "celsius": ("temperature", _F(1)), "fahrenheit": ("temperature", _F(1)), "kelvin": ("temperature", _F(1)),
}
_ALIASES = {"meter": "m", "metre": "m", "kilometer": "km", "centimeter": "cm", "millimeter": "mm", "in": "inch",
            "inches": "inch", "ft": "foot", "feet": "foot", "yd": "yard", "mi": "mile", "miles": "mile",
            "kilogram": "kg", "gram": "g", "lb": "pound", "lbs": "pound", "oz": "ounce", "s": "second",
            "min": "minute", "h": "hour", "C": "celsius", "F": "fahrenheit", "K": "kelvin"}


def _unit(name: str) -> str:
    key = _ALIASES.get(name.strip(), name.strip())
    if key in UNITS:
        return key
    lowered = {u.lower(): u for u in UNITS}
    low = key.lower()
    for cand in (_ALIASES.get(low, low), low[:-1] if low.endswith("s") else low):  # "Miles", "hours"
        if cand in UNITS:
            return cand
        if cand in lowered:
            return lowered[cand]
    raise ToolError(f"unknown unit '{name[:30]}'; known: {', '.join(UNITS)}")


def _to_kelvin(v: Fraction, unit: str) -> Fraction:
    return {"kelvin": v, "celsius": v + _F("273.15"), "fahrenheit": (v - 32) * _F(5, 9) + _F("273.15")}[unit]


def _from_kelvin(k: Fraction, unit: str) -> Fraction:
    return {"kelvin": k, "celsius": k - _F("273.15"), "fahrenheit": (k - _F("273.15")) * _F(9, 5) + 32}[unit]


@tool
def unit_convert(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a quantity between units of length, mass, time, data size or temperature (exact factors).

    Args:
        value: the quantity to convert
        from_unit: its unit, e.g. mile, km, pound, kg, hour, GiB, MB, celsius, fahrenheit
        to_unit: the unit wanted, of the same kind
    """
    a, b = _unit(from_unit), _unit(to_unit)
    if UNITS[a][0] != UNITS[b][0]:
        raise ToolError(f"cannot convert {UNITS[a][0]} ({a}) to {UNITS[b][0]} ({b})")
    v = _number(repr(value))
    if UNITS[a][0] == "temperature":
        k = _to_kelvin(v, a)
        if k < 0:
            raise ToolError("the temperature is below absolute zero")
        return format_number(_from_kelvin(k, b))
    return format_number(v * UNITS[a][1] / UNITS[b][1])


# ----------------------------------------------------------------------------------------------------------------
# Dates (ISO YYYY-MM-DD, proleptic Gregorian, years 1..9999)

MAX_DAYS = 1_000_000


def _date(text: str, name: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise ToolError(f"{name} '{text[:30]}' is not an ISO date YYYY-MM-DD") from None


@tool
def date_add(date: str, days: int) -> str:
    """The date a number of days after (or, for negative days, before) a date.

    Args:
        date: the start date, YYYY-MM-DD
        days: days to add; negative to subtract
    """
    if abs(days) > MAX_DAYS:
        raise ToolError(f"days must be within +-{MAX_DAYS}")
    try:
        return (_date(date, "date") + dt.timedelta(days=days)).isoformat()
    except OverflowError:
        raise ToolError("the result is outside the years 1..9999") from None


@tool
def days_between(start: str, end: str) -> str:
    """The number of days from one date to another (negative when end is before start).

    Args:
        start: the first date, YYYY-MM-DD
        end: the second date, YYYY-MM-DD
    """
    return str((_date(end, "end") - _date(start, "start")).days)


@tool
def weekday(date: str) -> str:
    """The day of the week of a date (Monday ... Sunday).

    Args:
        date: the date, YYYY-MM-DD
    """
    return _date(date, "date").strftime("%A")


# ----------------------------------------------------------------------------------------------------------------
# Lookup in the table the repo ships (dataset/demo/tool_table.json: {table: {key: value}})


@lru_cache(maxsize=1)
def lookup_table() -> dict:
    with open(TABLE_PATH, encoding="utf-8") as f:
        return json.load(f)


@tool
def lookup(table: str, key: str) -> str:
    """Look a key up in a local reference table.

    Args:
        table: which table: atomic_number (element -> atomic number) or capital (country -> capital city)
        key: the element or country, e.g. "Iron" or "Peru"
    """
    tables = lookup_table()
    if table not in tables:
        raise ToolError(f"unknown table '{table[:30]}'; tables: {', '.join(tables)}")
    rows = {k.casefold(): v for k, v in tables[table].items()}
    value = rows.get(key.strip().casefold())
    if value is None:
        raise ToolError(f"'{key[:40]}' is not in the table {table}")
    return str(value)
