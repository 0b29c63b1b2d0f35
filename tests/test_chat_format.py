"""model/chat_format.py, the one owner of the chat format: the shipped tokenizer carries its template and tokens,
rendering normalises what datasets and API clients send, rendered text is read back exactly, and the one fitting
rule keeps what it promises. (The exact template output per message kind: tests/test_tokenizer.py.)

    python -m pytest tests/test_chat_format.py -q
"""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model import chat_format as cf  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(ROOT / "model"))


def n_tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_shipped_tokenizer_carries_the_owners_template_and_tokens(tok):
    shipped = json.loads((ROOT / "model" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert shipped["chat_template"] == cf.CHAT_TEMPLATE == tok.chat_template
    assert tok.convert_tokens_to_ids(cf.SPECIAL_TOKENS + cf.TAG_TOKENS) == list(range(11))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (cf.IM_START, cf.IM_END, cf.PAD)


def test_render_normalises_string_tool_calls_and_content_parts(tok):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    structured = [{"role": "user", "content": "1+2"},
                  {"role": "assistant", "content": None, "tool_calls": [{"name": "add", "arguments": {"a": 1}}]},
                  {"role": "tool", "content": "3"}]
    # MiniMind's data stores tool calls as a JSON string; OpenAI clients send content as a list of parts
    as_sent = [{"role": "user", "content": [{"type": "text", "text": "1+"}, {"type": "image_url"},
                                            {"type": "text", "text": "2"}]},
               {"role": "assistant", "content": None, "tool_calls": '[{"name": "add", "arguments": {"a": 1}}]'},
               {"role": "tool", "content": "3"}]
    want = tok.apply_chat_template(structured, tools=tools, tokenize=False, add_generation_prompt=True)
    assert cf.render(tok, as_sent, tools, add_generation_prompt=True) == want
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>' in want
    assert as_sent[1]["tool_calls"].startswith("[")  # the caller's messages are not changed
    with pytest.raises(cf.ChatFormatError, match="message 1: tool_calls must be a list"):
        cf.render(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"args": 1}]}])
    with pytest.raises(cf.ChatFormatError, match="not valid JSON"):
        cf.normalize_messages([{"role": "assistant", "tool_calls": "[{"}])


def test_rendered_text_reads_back(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "reasoning_content": "r"}, {"role": "user", "content": "q2"}]
    text = cf.render(tok, msgs, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\nr\n</think>\na<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n"
                    "<|im_start|>assistant\n")
    turns = cf.split_turns(text)
    assert "".join(turns) == text and len(turns) == 5 and turns[-1] == cf.ASSISTANT_HEADER
    start = text.index("<think>")
    # content + <|im_end|> (not the "\n" after it); the open generation prompt: an empty span at the end
    assert cf.assistant_spans(text) == [(start, text.index("<|im_start|>user\nq2") - 1), (len(text), len(text))]
    assert cf.prompt_messages(text) == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "<think>\nr\n</think>\na"},
                                        {"role": "user", "content": "q2"}]


def conversation():
    """system, three question/answer rounds (the second with two tool calls and a run of two tool results), latest
    question: turns are system | u0 a0 | u1 call tools a1 | u2 a2 | latest | generation prompt."""
    msgs = [{"role": "system", "content": "You are terse."}]
    for i in range(3):
        msgs.append({"role": "user", "content": f"question {i} " + "word " * 20})
        if i == 1:
            msgs += [{"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 1}},
                                                                           {"name": "add", "arguments": {"a": 2}}]},
                     {"role": "tool", "content": "tool result " * 15}, {"role": "tool", "content": "two"}]
        msgs.append({"role": "assistant", "content": f"answer {i} " + "word " * 20})
    return msgs + [{"role": "user", "content": "the latest question"}]


def test_fit_keeps_everything_that_fits(tok):
    text = cf.render(tok, conversation(), add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    fitted = cf.fit_prompt(tok, text, len(ids))
    assert (fitted.ids, fitted.text, fitted.dropped, fitted.cut_tokens) == (ids, text, 0, 0)


def test_fit_drops_whole_turns_oldest_first_never_starting_at_a_tool_result(tok):
    msgs = conversation()
    text = cf.render(tok, msgs, add_generation_prompt=True)
    turns = cf.split_turns(text)  # system, u0, a0, u1, call, tools, a1, u2, a2, latest, generation prompt
    assert len(turns) == 11 and turns[5].startswith("<|im_start|>user\n<tool_response>")
    size = [n_tokens(tok, t) for t in turns]
    fixed = size[0] + size[-1]
    # a budget that the history from the tool results on would fit, but not the history from u1 on
    budget = fixed + sum(size[5:10])
    assert fixed + sum(size[3:10]) > budget
    fitted = cf.fit_prompt(tok, text, budget)
    # the tool results cannot open the history: it starts at the next user question (u2): u0 a0 u1 call tools a1 dropped
    assert fitted.dropped == 6 and fitted.cut_tokens == 0
    kept = [msgs[0]] + msgs[msgs.index(next(m for m in msgs if m["content"].startswith("question 2"))):]
    assert fitted.text == cf.render(tok, kept, add_generation_prompt=True)  # the same as rendering fewer messages
    assert fitted.ids == tok(fitted.text, add_special_tokens=False)["input_ids"] and len(fitted.ids) <= budget
    # one token more room than the history from u1 needs: it is kept whole
    fitted = cf.fit_prompt(tok, text, fixed + sum(size[3:10]))
    assert fitted.dropped == 2 and fitted.text == turns[0] + "".join(turns[3:])


def test_fit_cuts_the_middle_of_the_latest_message_keeping_markup_start_and_end(tok):
    system = {"role": "system", "content": "You are terse."}
    filler = " ".join(f"w{i}" for i in range(300))
    msgs = [system, {"role": "user", "content": "old question"}, {"role": "assistant", "content": "old answer"},
            {"role": "user", "content": "Read this: " + filler + " so what is 3 + 4?"}]
    text = cf.render(tok, msgs, add_generation_prompt=True, enable_thinking=False)
    budget = 80
    fitted = cf.fit_prompt(tok, text, budget)
    assert len(fitted.ids) == budget and fitted.dropped == 2
    assert fitted.text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nRead this: w0 w1")
    assert fitted.text.endswith("so what is 3 + 4?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "w150" not in fitted.text  # the middle went
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    head, header, tail = "<|im_start|>system\nYou are terse.<|im_end|>\n", "<|im_start|>user\n", "<|im_end|>\n"
    gen = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    content_ids = enc(msgs[-1]["content"])
    room = budget - len(enc(head) + enc(header) + enc(tail) + enc(gen))
    assert fitted.cut_tokens == len(content_ids) - room
    front, back = (room + 1) // 2, room // 2
    assert fitted.ids == enc(head) + enc(header) + content_ids[:front] + content_ids[-back:] + enc(tail) + enc(gen)


def test_fit_refuses_when_the_markup_and_system_prompt_alone_do_not_fit(tok):
    text = cf.render(tok, [{"role": "system", "content": "long " * 200}, {"role": "user", "content": "hi"}],
                     add_generation_prompt=True)
    markup = sum(n_tokens(tok, t) for t in ("<|im_start|>system\n" + "long " * 200 + "<|im_end|>\n",
                                             "<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n"))
    with pytest.raises(ValueError, match=f"system prompt, tools and chat markup alone take {markup} tokens, more "
                                         "than the budget of 50"):
        cf.fit_prompt(tok, text, 50)


def test_cut_middle():
    assert cf.cut_middle(list(range(10)), 5) == [0, 1, 2, 8, 9]
    assert cf.cut_middle(list(range(4)), 5) == [0, 1, 2, 3]
    assert cf.cut_middle(list(range(10)), 1) == [0]
