"""The shipped tokenizer (model/): special ids, tag tokens, round trips and the exact chat template output (rendered
by the chat format's owner, model/chat_format.py, and by the tokenizer's template directly: both must agree).

    python -m pytest tests/test_tokenizer.py -q
"""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from model import chat_format  # noqa: E402
from trainer import train_tokenizer  # noqa: E402

TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>", "<tool_response>",
        "</tool_response>"]

ADD_TOOL = {"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                             "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                                                             "b": {"type": "integer"}}}}}
TOOLS_HEADER = (
    "# Tools\n\nYou can call the functions listed below to help with the request.\n\n"
    "Function signatures, one JSON object per line, inside <tools></tools>:\n<tools>\n"
    + json.dumps(ADD_TOOL, ensure_ascii=False) + "\n</tools>\n\n"
    "To call a function, answer with a JSON object holding its name and arguments inside <tool_call></tool_call> tags:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <arguments-json-object>}\n</tool_call><|im_end|>\n')


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(ROOT / "model"))


def render(tok, messages, **kw):
    """The chat format owner's rendering (model/chat_format.py), which must equal the shipped template's own output
    (the tests below then pin that output character by character)."""
    shipped = tok.apply_chat_template(messages, tokenize=False, **kw)
    tools = kw.pop("tools", None)
    owned = chat_format.render(tok, messages, tools, **kw)
    assert owned == shipped
    return owned


def test_special_ids_and_vocab(tok):
    assert len(tok) == 6400
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 0)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # No BOS/EOS is added by encode: the datasets add them explicitly.
    assert tok.encode("hello") == tok("hello")["input_ids"] and 1 not in tok.encode("hello")
    assert tok.encode("<|im_start|>user\n")[0] == 1


def test_tag_tokens_single_and_not_special(tok):
    for i, tag in enumerate(TAGS):
        assert tok.encode(tag) == [3 + i], tag
    text = "<|im_start|>assistant\n<think>\n想一想\n</think>\n<answer>\n7\n</answer><|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\n想一想\n</think>\n<answer>\n7\n</answer>"
    calls = "<tool_call>{}</tool_call><tool_response>ok</tool_response>"
    assert tok.decode(tok.encode(calls), skip_special_tokens=True) == calls


@pytest.mark.parametrize("text", [
    "你好，世界！Hello, world.", "3 加 4 等于 7。3 plus 4 equals 7.", "  leading spaces\n\n\ttabs and\r\nCRLF  ",
    "混合 mixed 文本 text 🙂 emoji ü ß", "def f(x):\n    return {\"a\": [1, 2]}  # 注释", "",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_chinese_is_compressed(tok):
    text = "北京是中国的首都。太阳从东方升起，从西方落下。我们今天学习一个新的问题。"
    assert len(tok.encode(text)) < len(text)


def test_no_default_system_prompt(tok):
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    assert render(tok, msgs) == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n你好！<|im_end|>\n"


def test_system_multi_turn_and_generation_prompt(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1=?"},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2=?"}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1=?<|im_end|>\n"
                "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n2+2=?<|im_end|>\n")
    assert render(tok, msgs) == expected
    assert render(tok, msgs, add_generation_prompt=True) == expected + "<|im_start|>assistant\n"
    assert render(tok, msgs, add_generation_prompt=True, enable_thinking=True) == expected + "<|im_start|>assistant\n"
    assert (render(tok, msgs, add_generation_prompt=True, enable_thinking=False)
            == expected + "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_reasoning_content(tok):
    msgs = [{"role": "user", "content": "3+4=?"},
            {"role": "assistant", "content": "<answer>\n7\n</answer>", "reasoning_content": "3 加 4 得 7。"}]
    assert render(tok, msgs) == ("<|im_start|>user\n3+4=?<|im_end|>\n<|im_start|>assistant\n"
                                 "<think>\n3 加 4 得 7。\n</think>\n<answer>\n7\n</answer><|im_end|>\n")


def test_tools_tool_calls_and_responses(tok):
    msgs = [{"role": "system", "content": "你是助手。"},
            {"role": "user", "content": "Add 1 and 2, then 3 and 4."},
            {"role": "assistant", "content": "Sure.", "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}},
                {"name": "add", "arguments": '{"a": 3, "b": 4}'}]},
            {"role": "tool", "content": "3"}, {"role": "tool", "content": "7"},
            {"role": "assistant", "content": "3 and 7."}]
    expected = ("<|im_start|>system\n你是助手。\n\n" + TOOLS_HEADER
                + "<|im_start|>user\nAdd 1 and 2, then 3 and 4.<|im_end|>\n"
                "<|im_start|>assistant\nSure.\n"
                '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
                '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>\n'
                "<|im_start|>user\n<tool_response>\n3\n</tool_response>\n<tool_response>\n7\n</tool_response>"
                "<|im_end|>\n<|im_start|>assistant\n3 and 7.<|im_end|>\n")
    assert render(tok, msgs, tools=[ADD_TOOL]) == expected


def test_tools_without_system_and_empty_content(tok):
    msgs = [{"role": "user", "content": "1+2"},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}]
    assert render(tok, msgs, tools=[ADD_TOOL]) == (
        "<|im_start|>system\n" + TOOLS_HEADER + "<|im_start|>user\n1+2<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>\n')


def test_shipped_files_match_the_script(tok):
    """model/ holds what trainer/train_tokenizer.py writes (config and template), with non-special tags."""
    shipped = json.loads((ROOT / "model" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert shipped == train_tokenizer.tokenizer_config()
    assert shipped["add_bos_token"] is False and shipped["model_max_length"] == 32768
    spec = json.loads((ROOT / "model" / "tokenizer.json").read_text(encoding="utf-8"))
    flags = {t["content"]: (t["id"], t["special"]) for t in spec["added_tokens"]}
    assert flags == {t: (i, i < 3) for i, t in enumerate(train_tokenizer.SPECIAL_TOKENS + TAGS)}
    assert spec["post_processor"] is None and spec["normalizer"] is None


def test_build_tokenizer_small():
    """The training function pins ids 0..10 and flips the tags to non-special at any vocab size (fast: tiny vocab)."""
    docs = ["你好，世界。Hello world. 3 加 4 等于 7。"] * 50
    tok = train_tokenizer.build_tokenizer(docs, 290)
    assert tok.get_vocab_size() == 290
    assert [tok.token_to_id(t) for t in train_tokenizer.SPECIAL_TOKENS + TAGS] == list(range(11))
    assert tok.decode(tok.encode("<think>x</think><|im_end|>").ids) == "<think>x</think>"


def test_refuses_without_corpus(monkeypatch, capsys):
    monkeypatch.setattr(train_tokenizer, "demo_data", lambda: ([], []))
    monkeypatch.setattr(sys, "argv", ["train_tokenizer.py", "--no_system_corpus", "--out_dir", "/nonexistent/x"])
    with pytest.raises(SystemExit) as e:
        train_tokenizer.main()
    assert "No corpus text found" in str(e.value)
