"""The chat format, defined once: ChatML tokens, the think/answer/tool tags, the chat template, rendering, parsing of
rendered prompts, and the one rule that fits a prompt into a token budget.

    from model.chat_format import render, fit_prompt, assistant_spans
    text = render(tokenizer, messages, tools=tools, add_generation_prompt=True, enable_thinking=None)
    fitted = fit_prompt(tokenizer, text, budget=1024)     # .ids (<= budget), .text, .dropped turns, .cut_tokens
    spans = assistant_spans(text)                         # [start, end) of each assistant reply + <|im_end|>

Users: trainer/train_tokenizer.py writes CHAT_TEMPLATE and the token lists into model/tokenizer_config.json;
dataset/lm_dataset.py renders records and masks the loss with assistant_spans; trainer/rl_utils.py fits rollout
prompts and reads their messages back; trainer/chat_utils.py (eval_llm.py, the server, the web page) renders and
fits chat prompts and parses replies with the tags. Rendering always goes through the tokenizer's own template, so a
foreign tokenizer (--tokenizer_path with MiniMind's) renders its own way; the parsing and fitting below assume ChatML
turns ("<|im_start|>role\\n...<|im_end|>\\n"), which both templates write.

The template (CHAT_TEMPLATE, Jinja, as shipped in tokenizer_config.json):
- A system turn is rendered only when the messages have one or tools are given (no default system prompt).
  With tools, the system turn is "<|im_start|>system\\n" + [first system message + "\\n\\n"] + "# Tools" text, a
  <tools></tools> block with one JSON per tool per line, and how to call: <tool_call>\\n{"name": ..., "arguments": ...}
  \\n</tool_call>; then "<|im_end|>\\n".
- system / user turns: "<|im_start|>{role}\\n{content}<|im_end|>\\n" (non-string content renders as "").
- assistant turns: "<|im_start|>assistant\\n" + ["<think>\\n{reasoning_content}\\n</think>\\n"] + content + each
  tool call as "<tool_call>\\n{"name": <json>, "arguments": <json or raw string>}\\n</tool_call>" (a "\\n" before it
  when content or an earlier call precedes it; {"function": {...}} wrappers are unwrapped) + "<|im_end|>\\n".
- consecutive tool messages form one user turn: "<|im_start|>user" + "\\n<tool_response>\\n{content}\\n</tool_response>"
  per message + "<|im_end|>\\n".
- add_generation_prompt appends "<|im_start|>assistant\\n", plus "<think>\\n\\n</think>\\n\\n" when enable_thinking is
  passed and false.

The fitting rule (fit_prompt), for chat and RL alike: a prompt over the budget first loses whole turns, oldest first
(the system turn always stays; the kept history starts at a user turn, never at an orphan answer or tool result);
when the system turn and the latest turn alone are still too long, the MIDDLE of the latest turn's content is cut by
tokens (its start, often the instruction, and its end, often the question, stay; so does all the markup). Markup and
system turn alone over the budget: ValueError.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
# ids 0, 1, 2 (pad, bos, eos): special; the tags (ids 3..10) are single tokens that decoding keeps
SPECIAL_TOKENS = [PAD, IM_START, IM_END]
TAG_TOKENS = [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, CALL_OPEN, CALL_CLOSE, RESPONSE_OPEN, RESPONSE_CLOSE]
REASONING_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
ROLES = {"system", "user", "assistant", "tool"}
ASSISTANT_HEADER = IM_START + "assistant\n"
TURN_END = IM_END

CHAT_TEMPLATE = r"""{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if messages and messages[0].role == 'system' and messages[0].content is string and messages[0].content -%}
        {{- messages[0].content + '\n\n' -}}
    {%- endif -%}
    {{- '# Tools\n\nYou can call the functions listed below to help with the request.\n\nFunction signatures, one JSON object per line, inside <tools></tools>:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nTo call a function, answer with a JSON object holding its name and arguments inside <tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, "arguments": <arguments-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- set content = message.content if message.content is string else '' -%}
    {%- if message.role == 'system' and loop.first and tools -%}
    {%- elif message.role == 'assistant' -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- if message.reasoning_content is string and message.reasoning_content -%}
            {{- '<think>\n' + message.reasoning_content + '\n</think>\n' -}}
        {%- endif -%}
        {{- content -}}
        {%- if message.tool_calls -%}
            {%- for call in message.tool_calls -%}
                {%- if call.function is defined -%}
                    {%- set call = call.function -%}
                {%- endif -%}
                {%- if content or not loop.first -%}
                    {{- '\n' -}}
                {%- endif -%}
                {{- '<tool_call>\n{"name": ' + (call.name | tojson) + ', "arguments": ' -}}
                {%- if call.arguments is string -%}
                    {{- call.arguments -}}
                {%- else -%}
                    {{- call.arguments | tojson -}}
                {%- endif -%}
                {{- '}\n</tool_call>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or loop.previtem.role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' -}}
        {%- if loop.last or loop.nextitem.role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if enable_thinking is defined and not enable_thinking -%}
        {{- '<think>\n\n</think>\n\n' -}}
    {%- endif -%}
{%- endif -%}"""


class ChatFormatError(Exception):
    """Messages the chat format cannot render (a malformed tool call, a template error); the message says which."""


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def message_text(content) -> str | None:
    """OpenAI content is a string, null, or a list of parts ({"type": "text", "text": ...}): the text of the parts."""
    if content is None or isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Copies of the messages as the template expects them: content parts joined to text, JSON-string tool calls
    decoded (MiniMind's data stores some as strings) and checked, per-message "functions"/"tools" keys dropped
    (the datasets read them as the record's tools). Messages that need nothing are passed through, not copied."""
    out = []
    for k, msg in enumerate(messages):
        calls = msg.get("tool_calls")
        content = msg.get("content")
        if calls is None and "functions" not in msg and "tools" not in msg and not isinstance(content, list):
            out.append(msg)  # nothing to change (the template never mutates messages)
            continue
        msg = {key: v for key, v in msg.items() if key not in ("functions", "tools")}
        if isinstance(content, list):
            msg["content"] = message_text(content)
        if isinstance(calls, str):
            try:
                calls = msg["tool_calls"] = json.loads(calls)
            except ValueError as e:
                raise ChatFormatError(f"message {k}: tool_calls is a string that is not valid JSON ({e})") from None
        if calls is not None:
            funcs = [c.get("function", c) if isinstance(c, dict) else c for c in calls] \
                if isinstance(calls, list) else None
            if funcs is None or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in funcs):
                raise ChatFormatError(f'message {k}: tool_calls must be a list of {{"name": ..., "arguments": ...}}')
        out.append(msg)
    return out


def render(tokenizer, messages: list[dict], tools=None, add_generation_prompt: bool = False,
           enable_thinking: bool | None = None) -> str:
    """The messages as text, through the tokenizer's chat template (ours is CHAT_TEMPLATE). enable_thinking None
    leaves the template's default (the model decides whether to think)."""
    from jinja2.exceptions import TemplateError  # transformers' template engine; imported only when rendering

    kw = {} if enable_thinking is None else {"enable_thinking": bool(enable_thinking)}
    try:
        return tokenizer.apply_chat_template(normalize_messages(messages), tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **kw)
    except (TemplateError, TypeError) as e:
        raise ChatFormatError(f"the chat template cannot render it ({e})") from None


# ----------------------------------------------------------------------------------------------------------------
# Reading rendered text

# a turn starts at the text's start or right after the previous turn's end
_TURN_START = re.compile(r"(?:^|(?<=" + re.escape(IM_END) + r"\n))" + re.escape(IM_START))
_CHAT_TURN = re.compile(re.escape(IM_START) + r"(\w+)\n(.*?)" + re.escape(IM_END), re.S)


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant turn's content + its <|im_end|> in a rendered ChatML string:
    what the SFT loss supervises (an unfinished last turn runs to the end of the text)."""
    spans, pos = [], 0
    while True:
        head = text.find(ASSISTANT_HEADER, pos)
        if head < 0:
            return spans
        start = head + len(ASSISTANT_HEADER)
        end = text.find(TURN_END, start)
        end = len(text) if end < 0 else end + len(TURN_END)
        spans.append((start, end))
        pos = end


def prompt_messages(prompt: str) -> list[dict]:
    """The chat messages of a rendered ChatML prompt (the generation prompt itself is not a message)."""
    return [{"role": role, "content": content} for role, content in _CHAT_TURN.findall(prompt)]


def split_turns(text: str) -> list[str]:
    """Rendered text cut before each turn's <|im_start|>; "".join(turns) == text. Text before the first turn
    (none in ChatML) is its own piece."""
    starts = [m.start() for m in _TURN_START.finditer(text)]
    cuts = ([0] if not starts or starts[0] else []) + starts + [len(text)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


# ----------------------------------------------------------------------------------------------------------------
# Fitting a prompt into a token budget


@dataclass
class FittedPrompt:
    ids: list[int]
    text: str
    dropped: int        # whole turns left out, oldest first (a run of tool results is one turn)
    cut_tokens: int     # tokens cut from the middle of the latest turn's content


def _halves(ids: list[int], keep: int) -> tuple[list[int], list[int]]:
    if len(ids) <= keep:
        return list(ids), []
    front = (keep + 1) // 2
    return list(ids[:front]), list(ids[len(ids) - (keep - front):])


def cut_middle(ids: list[int], keep: int) -> list[int]:
    """At most `keep` of the ids: the first ceil(keep/2) and the last floor(keep/2) when there are more."""
    front, back = _halves(ids, keep)
    return front + back


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def fit_prompt(tokenizer, text: str, budget: int) -> FittedPrompt:
    """A rendered prompt as at most `budget` token ids, by the rule in the module docstring.

    The ids of kept whole turns equal tokenizing the kept text (turns are cut before a special token, where the
    tokenizer splits anyway); a cut turn's ids are spliced, so `text` then shows the kept pieces joined."""
    ids = _encode(tokenizer, text)
    if len(ids) <= budget:
        return FittedPrompt(ids, text, 0, 0)
    turns = split_turns(text)
    gen = [turns.pop()] if turns and IM_END not in turns[-1] else []  # the open generation prompt
    head = [turns.pop(0)] if turns and not turns[0].startswith(IM_START) else []  # text before the first turn
    if turns and turns[0].startswith(IM_START + "system\n"):
        head.append(turns.pop(0))
    body = turns
    sizes = [len(_encode(tokenizer, t)) for t in body]
    fixed = sum(len(_encode(tokenizer, t)) for t in head + gen)
    # a kept history starts at a real user turn (not a tool result) or is the latest turn alone
    starts = [i for i, t in enumerate(body) if t.startswith(IM_START + "user\n")
              and not t.startswith(IM_START + "user\n" + RESPONSE_OPEN)] + [len(body) - 1]
    for s in sorted(set(i for i in starts if i >= 0)):
        if fixed + sum(sizes[s:]) <= budget:
            kept = "".join(head + body[s:] + gen)
            kept_ids = _encode(tokenizer, kept)
            if len(kept_ids) <= budget:  # (a tokenizer that merges across turns could count differently)
                return FittedPrompt(kept_ids, kept, s, 0)
    if not body:
        raise ValueError(f"the prompt's markup and system turn take {len(ids)} tokens, more than the budget of "
                         f"{budget}")
    last = body[-1]
    header_end, end = last.find("\n") + 1, last.rfind(IM_END)
    header, content, tail = last[:header_end], last[header_end:end], last[end:]
    markup = fixed + len(_encode(tokenizer, header)) + len(_encode(tokenizer, tail))
    if header_end == 0 or end < header_end or markup >= budget:
        raise ValueError(f"the system prompt, tools and chat markup alone take {markup} tokens, more than the "
                         f"budget of {budget} for the prompt")
    content_ids = _encode(tokenizer, content)
    front, back = _halves(content_ids, budget - markup)
    text = "".join(head) + header + tokenizer.decode(front) + tokenizer.decode(back) + tail + "".join(gen)
    out = (_encode(tokenizer, "".join(head)) + _encode(tokenizer, header) + front + back + _encode(tokenizer, tail)
           + _encode(tokenizer, "".join(gen)))
    return FittedPrompt(out, text, len(body) - 1, len(content_ids) - len(front) - len(back))
