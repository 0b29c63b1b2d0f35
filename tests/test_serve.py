"""The chat module (trainer/chat_utils.py), the OpenAI-compatible server and the terminal client.

    python -m pytest tests/test_serve.py -q

Two servers per module, both uvicorn in a thread on a free 127.0.0.1 port: one around a FakeModel (HF generate's
contract, replies scripted by the last user message, so <think>, tool calls, slow streams and failures happen on
demand), one around the session's real tiny SFT checkpoint. Clients: the official `openai` package and httpx.
"""
import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from conftest import script_env  # noqa: E402
from trainer.chat_utils import (ChatStream, GenerationError, ReplyParser, add_model_args, build_prompt,  # noqa: E402
                                load_model, parse_reply, place_model)
from trainer.trainer_utils import load_tokenizer  # noqa: E402

openai = pytest.importorskip("openai")
import serve_openai_api as serve  # noqa: E402

THINK_REPLY = "<think>\nThe user asks 3 + 4. That is 7.\n</think>\n\n3 + 4 = 7."
TOOL_REPLY = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
              '</tool_call>')
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


class FakeModel:
    """Follows HF generate's contract as the server uses it (input_ids, streamer put/end, stopping_criteria called
    per step, max_new_tokens, eos_token_id); what it says depends on the last user message:
    'think' -> THINK_REPLY, 'weather' -> TOOL_REPLY, 'slow' -> 'tick ' forever at 50 tokens/s, 'boom' -> raises after
    two tokens, 'stop me' -> 'Hello STOP and more and more...' (slow), anything else -> 'You said: <message>'."""

    def __init__(self, tokenizer, context=512):
        self.tok = tokenizer
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.device = torch.device("cpu")
        self.prompts, self.runs = [], []   # every prompt seen; [tokens produced, stopped by criteria] per call
        self.spans = []                    # (start, end) time of every generate call

    def generate(self, input_ids, attention_mask=None, streamer=None, stopping_criteria=None, max_new_tokens=20,
                 eos_token_id=None, **kw):
        prompt = self.tok.decode(input_ids[0])
        self.prompts.append(prompt)
        last = prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>")[0]
        slow = "slow" in last
        text = (THINK_REPLY if "think" in last else TOOL_REPLY if "weather" in last else "tick " * 10_000 if slow
                else "Hello STOP" + " and more" * 200 if "stop me" in last else f"You said: {last}")
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        streamer.put(input_ids)
        seq, run, t0 = input_ids, [0, False], time.monotonic()
        self.runs.append(run)
        try:
            self._steps(ids, seq, run, slow or "stop me" in last, "boom" in last, streamer, stopping_criteria,
                        max_new_tokens, eos_token_id)
        finally:
            self.spans.append((t0, time.monotonic()))
        streamer.end()

    def _steps(self, ids, seq, run, slow, boom, streamer, stopping_criteria, max_new_tokens, eos_token_id):
        for t in ids[:max_new_tokens]:
            if slow:
                time.sleep(0.02)
            if boom and run[0] == 2:
                raise RuntimeError("simulated device failure")
            seq = torch.cat([seq, torch.tensor([[t]])], dim=1)
            streamer.put(torch.tensor([t]))
            run[0] += 1
            if t in (eos_token_id or []):
                return
            if any(bool(c(seq, None).all()) for c in stopping_criteria or []):
                run[1] = True
                return


def serve_in_thread(app):
    """uvicorn on a free 127.0.0.1 port in a daemon thread; returns (base url, server)."""
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(ROOT / "model"))


@pytest.fixture(scope="module")
def fake(tokenizer):
    model = FakeModel(tokenizer, context=512)
    app = serve.create_app(model, tokenizer, "fake-model", max_tokens_limit=300, max_body_bytes=64 * 1024)
    url, server = serve_in_thread(app)
    yield SimpleNamespace(url=url, model=model, client=openai.OpenAI(base_url=url + "/v1", api_key="x",
                                                                     max_retries=0, timeout=30))
    server.should_exit = True


@pytest.fixture(scope="module")
def real(tiny_sft, tokenizer):
    import argparse
    p = argparse.ArgumentParser()
    add_model_args(p)
    args = p.parse_args(["--save_dir", str(tiny_sft / "out"), "--weight", "full_sft"])
    model, tok = load_model(args)
    app = serve.create_app(place_model(model, "cpu"), tok, args.model_name)
    url, server = serve_in_thread(app)
    yield SimpleNamespace(url=url, client=openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                                                        timeout=60))
    server.should_exit = True


def drain(stream, timeout=20):
    """All deltas of a ChatStream, failing (not hanging) if it does not end."""
    out, err = [], []

    def run():
        try:
            out.extend(stream)
        except Exception as e:  # noqa: BLE001
            err.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "stream did not end"
    if err:
        raise err[0]
    return out


# ---------------------------------------------------------------------------------------------------------------
# chat_utils: parsing, prompt building, streaming


@pytest.mark.parametrize("text,tools,in_think,expect", [
    (THINK_REPLY, False, False, ("The user asks 3 + 4. That is 7.", "3 + 4 = 7.", [])),
    ("No thinking here.", False, False, ("", "No thinking here.", [])),
    ("reasoning only, cut by the length limit", False, True, ("reasoning only, cut by the length limit", "", [])),
    ("\nstarted in the prompt\n</think>\n\nanswer", False, True, ("started in the prompt", "answer", [])),
    ("<think>\nunclosed", False, False, ("unclosed", "", [])),
    ("a <think> later is text", False, False, ("", "a <think> later is text", [])),
    (TOOL_REPLY, True, False, ("", "Let me check.",
                               [{"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}])),
    (TOOL_REPLY, False, False, ("", TOOL_REPLY, [])),  # no tools in the request: the text stays content
    ("<tool_call>\nnot json\n</tool_call>", True, False, ("", "<tool_call>\nnot json\n</tool_call>", [])),
    ('<tool_call>{"name": "a", "arguments": "{}"}</tool_call>\n<tool_call>{"name": "b"}</tool_call>', True, False,
     ("", "", [{"name": "a", "arguments": "{}"}, {"name": "b", "arguments": "{}"}])),
    ('<tool_call>\n{"name": "cut', True, False, ("", '<tool_call>\n{"name": "cut', [])),
])
def test_reply_parser_whole_and_every_split(text, tools, in_think, expect):
    """The streaming parser gives the same reasoning / content / tool calls however the text is split into deltas
    (every two-piece split, and one character at a time), equal to the expected whole-text split."""
    whole = parse_reply(text, tools=tools, in_think=in_think)
    assert (whole["reasoning"], whole["content"], whole["tool_calls"]) == expect
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for pieces in splits:
        p = ReplyParser(tools=tools, in_think=in_think)
        events = [e for piece in pieces for e in p.feed(piece)] + p.finish()
        got = ("".join(v for k, v in events if k == "reasoning"), "".join(v for k, v in events if k == "content"),
               [v for k, v in events if k == "tool_call"])
        assert got == expect, pieces


def test_build_prompt_cuts_by_tokens_keeping_system_and_latest(tokenizer):
    n_tok = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    system = {"role": "system", "content": "You are terse."}
    turns = []
    for i in range(8):
        turns += [{"role": "user", "content": f"question {i} " + "word " * 30},
                  {"role": "assistant", "content": f"answer {i} " + "word " * 30}]
    msgs = [system] + turns + [{"role": "user", "content": "the latest question"}]
    full = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert build_prompt(tokenizer, msgs, budget=10_000).text == full  # fits: untouched
    budget = n_tok(full) // 2
    p = build_prompt(tokenizer, msgs, budget=budget)
    assert len(p.ids) <= budget and p.ids == tokenizer(p.text, add_special_tokens=False)["input_ids"]
    assert p.text.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert p.text.endswith("<|im_start|>user\nthe latest question<|im_end|>\n<|im_start|>assistant\n")
    kept = msgs[:1] + msgs[1 + p.dropped:]
    assert kept[1]["role"] == "user"  # cut at a turn boundary
    assert p.text == tokenizer.apply_chat_template(kept, tokenize=False, add_generation_prompt=True)
    # the next-earlier start would not have fit: it keeps as many turns as fit
    longer = msgs[:1] + msgs[1 + p.dropped - 2:]
    assert n_tok(tokenizer.apply_chat_template(longer, tokenize=False, add_generation_prompt=True)) > budget
    # one huge message: its start is cut, the end (the question) stays
    huge = [system, {"role": "user", "content": "filler " * 400 + "so what is 3 + 4?"}]
    p = build_prompt(tokenizer, huge, budget=60)
    assert len(p.ids) <= 60 and p.cut_tokens > 0 and "so what is 3 + 4?<|im_end|>" in p.text
    assert "You are terse." in p.text
    with pytest.raises(ValueError, match="system prompt"):
        build_prompt(tokenizer, [{"role": "system", "content": "long " * 200}, {"role": "user", "content": "hi"}], 50)


def test_chat_stream_stop_strings_errors_and_counts(tokenizer):
    model = FakeModel(tokenizer)
    ids = build_prompt(tokenizer, [{"role": "user", "content": "please stop me"}], 400).ids
    s = ChatStream(model, tokenizer, ids, max_new_tokens=50, stop=["STOP"])
    deltas = drain(s)
    assert "".join(deltas) == "Hello " and s.finish_reason == "stop"
    assert all("S" not in d for d in deltas)  # the start of a stop string is held back, never shown
    assert s.join(5) and model.runs[-1][1]  # generation was stopped through the stopping criteria, not run to the end
    s = ChatStream(model, tokenizer, ids, max_new_tokens=3)
    first3 = tokenizer("Hello STOP and", add_special_tokens=False)["input_ids"][:3]
    assert "".join(drain(s)) == tokenizer.decode(first3) and s.finish_reason == "length" and s.completion_tokens == 3
    ids = build_prompt(tokenizer, [{"role": "user", "content": "boom"}], 400).ids
    with pytest.raises(GenerationError, match="simulated device failure"):
        drain(ChatStream(model, tokenizer, ids, max_new_tokens=50))


def test_chat_stream_close_ends_the_generation_thread(tokenizer):
    """close() returns only once the generation thread has ended, also when the reader stops early (a thread left
    in the middle of a torch op when the interpreter exits aborts the process: exit 134)."""
    model = FakeModel(tokenizer)
    ids = build_prompt(tokenizer, [{"role": "user", "content": "slow"}], 400).ids
    s = ChatStream(model, tokenizer, ids, max_new_tokens=1000)
    next(s)
    s.close()
    assert not s._thread.is_alive() and model.runs[-1][1]


EXIT_WHILE_GENERATING = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.chat_utils import ChatStream
from trainer.trainer_utils import load_tokenizer
torch.manual_seed(0)
model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2)).eval()
stream = ChatStream(model, load_tokenizer(sys.argv[1] + "/model"), [1, 300, 301], max_new_tokens=100_000,
                    temperature=1.0, seed=0)
for _ in range(3):
    next(stream)
print("exiting while the thread generates", flush=True)
"""


def test_a_program_that_exits_while_generating_exits_cleanly(tmp_path):
    """A program that leaves without closing its stream (an error, sys.exit, the end of main) still ends its
    generation thread before the interpreter goes down: exit code 0 twice, never 134 'terminate called' (which it
    was every time before)."""
    (tmp_path / "prog.py").write_text(EXIT_WHILE_GENERATING)
    env = {**script_env(tmp_path), "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(tmp_path / "prog.py"), str(ROOT)], capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, (proc.returncode, proc.stderr[-2000:])
        assert "exiting while the thread generates" in proc.stdout


def test_chat_stream_real_model_greedy_seed_and_utf8(tiny_sft, tokenizer):
    """On the real tiny model: temperature 0 is greedy (equals argmax decoding), a seed makes sampling repeatable,
    and the incremental decoding of the deltas equals decoding all tokens at once (multi-byte characters)."""
    import argparse
    p = argparse.ArgumentParser()
    add_model_args(p)
    model, tok = load_model(p.parse_args(["--save_dir", str(tiny_sft / "out"), "--weight", "full_sft"]))
    model = place_model(model, "cpu")
    ids = build_prompt(tok, [{"role": "user", "content": "你好，请介绍一下你自己。"}], 400).ids
    s = ChatStream(model, tok, ids, max_new_tokens=24, temperature=0)
    text = "".join(drain(s))
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(s.completion_tokens):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert text == tok.decode(x[0, len(ids):], skip_special_tokens=True)
    sampled = ["".join(drain(ChatStream(model, tok, ids, max_new_tokens=24, temperature=1.0, seed=7)))
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    s = ChatStream(model, tok, ids, max_new_tokens=24, temperature=1.0, seed=8)
    assert "".join(drain(s)) != sampled[0] or s.completion_tokens < 3


# ---------------------------------------------------------------------------------------------------------------
# The server through the official client


def test_openai_client_real_model_stream_and_not(real, tokenizer):
    c = real.client
    assert [m.id for m in c.models.list().data] == ["full_sft_64"]
    msgs = [{"role": "user", "content": "中国的首都是哪里？"}]
    r = c.chat.completions.create(model="full_sft_64", messages=msgs, max_tokens=12, temperature=0)
    prompt_len = len(tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"])
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == prompt_len and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == prompt_len + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 12 else "stop")
    chunks = list(c.chat.completions.create(model="full_sft_64", messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content  # greedy: the stream says what the whole reply says
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    a, b = (c.chat.completions.create(model="full_sft_64", messages=msgs, max_tokens=16, temperature=1.0, seed=3)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content
    # two streams at once on the real model: each says what it says alone
    texts = []

    def run():
        chunks = c.chat.completions.create(model="full_sft_64", messages=msgs, max_tokens=12, temperature=0, stream=True)
        texts.append("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices))
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert texts == [r.choices[0].message.content] * 2


def test_sse_wire_format_ends_with_done(fake):
    with httpx.stream("POST", fake.url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "hello"}], "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {"id", "object", "created", "model", "choices"} <= set(chunks[0])
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == "You said: hello"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


def test_reasoning_content_and_tool_calls(fake):
    c = fake.client
    think = [{"role": "user", "content": "think: what is 3 + 4?"}]
    m = c.chat.completions.create(model="fake-model", messages=think).choices[0].message
    assert m.reasoning_content == "The user asks 3 + 4. That is 7." and m.content == "3 + 4 = 7."
    chunks = [ch for ch in c.chat.completions.create(model="fake-model", messages=think, stream=True) if ch.choices]
    deltas = [ch.choices[0].delta for ch in chunks]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, content) == (m.reasoning_content, m.content)
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not getattr(d, "reasoning_content", None) for d in deltas[first_content:])  # reasoning came first

    ask = [{"role": "user", "content": "weather in Paris?"}]
    r = c.chat.completions.create(model="fake-model", messages=ask, tools=TOOLS)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content == "Let me check."
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == \
        ("function", "get_weather", {"city": "Paris", "unit": "C"})
    assert '"name": "get_weather"' in fake.model.prompts[-1] and "<tools>" in fake.model.prompts[-1]
    chunks = list(c.chat.completions.create(model="fake-model", messages=ask, tools=TOOLS, stream=True))
    calls = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert [(tc.index, tc.function.name, tc.function.arguments) for tc in calls] == \
        [(0, "get_weather", call.function.arguments)] and calls[0].id.startswith("call_")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    r = c.chat.completions.create(model="fake-model", messages=ask)  # no tools in the request: plain text
    assert r.choices[0].message.tool_calls is None and "<tool_call>" in r.choices[0].message.content
    # the answer goes back as history with the tool result; the template renders both
    follow = ask + [r.choices[0].message.model_dump(exclude_none=True) | {"tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": "21 C"}, {"role": "user", "content": "ok"}]
    c.chat.completions.create(model="fake-model", messages=follow, tools=TOOLS)
    assert "<tool_response>\n21 C\n</tool_response>" in fake.model.prompts[-1]


def nested(depth: int) -> dict:
    obj = {}
    for _ in range(depth):
        obj = {"a": obj}
    return obj


BAD = [  # (request body or raw bytes, status, param)
    (b"{bad json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "fake-model"}, 400, "messages"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"content": "no role"}]}, 400, "messages[0]"),
    ({"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": "all"}, 400, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 1.5}, 400, "seed"),
    ({"messages": [{"role": "user", "content": "x" * 70_000}]}, 413, None),   # over --max_body_kb (64 KiB here)
    # values that pass a type check but break generation: a 500 before (issue 16)
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-300}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}, 400, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -2**63 - 1}, 400, "seed"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {
        "name": "f", "parameters": nested(200)}}]}, 400, None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": ' + b"9" * 5000 + b"}", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "model": 7}, 400, "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{i}-{s}" for i, (_, s, _) in enumerate(BAD)])
def test_malformed_requests_get_openai_errors(fake, body, status, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(fake.url + "/v1/chat/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
    assert err["type"] == "invalid_request_error" and "internal" not in err["message"]
    assert httpx.get(fake.url + "/v1/models", timeout=10).status_code == 200  # still serving


def test_unknown_model_is_404_naming_the_served_model(fake):
    """OpenAI's answer to a model it does not have: 404, code model_not_found; here it also says what is served.
    No "model" at all means the one served model (curl and small clients often leave it out)."""
    with pytest.raises(openai.NotFoundError) as e:
        fake.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    err = e.value.body
    assert e.value.status_code == 404 and err["code"] == "model_not_found"
    assert "'gpt-4o'" in err["message"] and "'fake-model'" in err["message"]
    r = httpx.post(fake.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                   timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "fake-model"


def test_other_errors_and_limits(fake):
    r = httpx.get(fake.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(fake.url + "/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    # a chunked upload (no Content-Length) over the limit is refused while reading
    r = httpx.post(fake.url + "/v1/chat/completions", timeout=30, headers={"content-type": "application/json"},
                   content=(b"x" * 8192 for _ in range(10)))
    assert r.status_code == 413
    with pytest.raises(openai.BadRequestError) as e:
        fake.client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=10**9)
    assert e.value.status_code == 400 and "limit of 300" in e.value.message


def test_generation_error_ends_stream_and_server_survives(fake):
    c = fake.client
    boom = [{"role": "user", "content": "boom"}]
    with pytest.raises(openai.APIError, match="simulated device failure"):
        for _ in c.chat.completions.create(model="fake-model", messages=boom, stream=True):
            pass
    with pytest.raises(openai.InternalServerError, match="simulated device failure"):
        c.chat.completions.create(model="fake-model", messages=boom)
    r = c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "still there?"}])
    assert r.choices[0].message.content == "You said: still there?"


def test_long_prompt_cut_by_tokens_on_the_server(fake, tokenizer):
    """Context 512 here: a long history loses its oldest turns, keeps the system prompt and the latest message."""
    msgs = [{"role": "system", "content": "SYSTEM-PROMPT"}]
    for i in range(20):
        msgs += [{"role": "user", "content": f"old question {i} " + "word " * 20},
                 {"role": "assistant", "content": f"old answer {i} " + "word " * 20}]
    msgs.append({"role": "user", "content": "LATEST"})
    r = fake.client.chat.completions.create(model="fake-model", messages=msgs, max_tokens=100)
    seen = fake.model.prompts[-1]
    assert r.choices[0].message.content == "You said: LATEST"
    assert seen.startswith("<|im_start|>system\nSYSTEM-PROMPT<|im_end|>") and "old question 19" in seen
    assert "old question 0 " not in seen
    assert r.usage.prompt_tokens == len(tokenizer(seen, add_special_tokens=False)["input_ids"]) <= 512 - 100


def test_two_concurrent_streams_both_finish(fake):
    """Queued: both streams complete with their own full text (no interleaving, nothing lost), and the two
    generations ran one after the other (the lock), not at the same time."""
    results, spans = {}, len(fake.model.spans)

    def run(word):
        chunks = fake.client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": f"repeat {word} " * 20}], stream=True)
        results[word] = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    threads = [threading.Thread(target=run, args=(w,)) for w in ("alpha", "omega")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {w: "You said: " + (f"repeat {w} " * 20).strip() for w in ("alpha", "omega")}
    (s1, e1), (s2, e2) = sorted(fake.model.spans[spans:])
    assert e1 <= s2


def test_queue_limit_answers_429(tokenizer):
    model = FakeModel(tokenizer)
    url, server = serve_in_thread(serve.create_app(model, tokenizer, "m", max_queue=1))
    try:
        body = {"messages": [{"role": "user", "content": "slow"}], "stream": True, "max_tokens": 50}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the connection (= a disconnect)
            next(lines)  # the first request is generating
            r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
            assert r.status_code == 429 and r.json()["error"]["code"] == "server_busy"
    finally:
        server.should_exit = True


def test_queue_limit_holds_for_concurrent_streams(tokenizer):
    """--max_queue counts a streaming request from the moment it is accepted, not from when its body starts: of 6
    streams sent at once with a queue of 2, exactly 2 run and 4 get 429 (all 6 were accepted before)."""
    model = FakeModel(tokenizer)
    url, server = serve_in_thread(serve.create_app(model, tokenizer, "m", max_queue=2))
    body = {"messages": [{"role": "user", "content": "slow"}], "stream": True, "max_tokens": 40}
    start, codes = threading.Barrier(6), []

    def run():
        with httpx.Client(timeout=30) as client:
            start.wait()
            with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                codes.append(r.status_code)
                r.read()
    try:
        threads = [threading.Thread(target=run) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(codes) == [200, 200, 429, 429, 429, 429]
        r = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 3}, timeout=30)
        assert r.status_code == 200  # every slot came back
    finally:
        server.should_exit = True


def test_a_body_that_never_finishes_times_out(tokenizer):
    """A client that announces a body and stops sending gets 408 after the body timeout instead of holding a
    connection (and a request slot) forever."""
    model = FakeModel(tokenizer)
    url, server = serve_in_thread(serve.create_app(model, tokenizer, "m", body_timeout=0.5))
    port = int(url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"messages\": [")
            reply = s.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408") and "request_timeout" in reply, reply
    finally:
        server.should_exit = True


def assert_stopped_early_and_lock_free(fake, runs_before):
    """The slow generation a gone client started was cancelled (300 tokens allowed, 50 tokens/s) and the next
    request gets the model."""
    deadline = time.time() + 10
    while len(fake.model.runs) == runs_before or not fake.model.runs[-1][1]:
        assert time.time() < deadline, f"generation kept running after the client left: {fake.model.runs[-1:]}"
        time.sleep(0.05)
    assert fake.model.runs[-1][0] < 100  # stopped early (300 allowed; 50 tokens/s)
    r = fake.client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "next"}])
    assert r.choices[0].message.content == "You said: next"  # the lock was released


def test_client_disconnect_stops_generation(fake):
    runs_before = len(fake.model.runs)
    with httpx.stream("POST", fake.url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "slow please"}], "stream": True, "max_tokens": 300}) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(8)) if line.startswith("data: ")]
        assert len(got) >= 3
    assert_stopped_early_and_lock_free(fake, runs_before)


def test_client_disconnect_stops_non_stream_generation(fake):
    """A non-stream request has no body to write until the end; the server polls for the disconnect instead."""
    runs_before = len(fake.model.runs)
    body = {"messages": [{"role": "user", "content": "slow please"}], "max_tokens": 300}  # 6 s if not stopped
    with pytest.raises(httpx.TimeoutException):
        httpx.post(fake.url + "/v1/chat/completions", json=body, timeout=0.6)  # the client gives up and leaves
    assert_stopped_early_and_lock_free(fake, runs_before)


def test_non_stream_request_whose_client_left_in_the_queue_never_runs(fake):
    prompts_before = len(fake.model.prompts)
    body = {"messages": [{"role": "user", "content": "slow"}], "stream": True, "max_tokens": 60}  # ~1.2 s
    with httpx.stream("POST", fake.url + "/v1/chat/completions", json=body, timeout=30) as first:
        lines = first.iter_lines()
        next(lines)  # generating: the next request waits for the lock
        with pytest.raises(httpx.TimeoutException):
            httpx.post(fake.url + "/v1/chat/completions", timeout=0.4,
                       json={"messages": [{"role": "user", "content": "queued then gone"}]})
        for _ in lines:
            pass
    r = fake.client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "next"}])
    assert r.choices[0].message.content == "You said: next"
    assert not any("queued then gone" in p for p in fake.model.prompts[prompts_before:])


# ---------------------------------------------------------------------------------------------------------------
# The terminal client


def test_chat_client_history_and_reasoning(fake, monkeypatch, capsys):
    import chat_openai_api as client
    monkeypatch.setattr(sys, "stdin", io.StringIO("first message\nsecond message\nthird message\nthink now\n"))
    client.main(["--base_url", fake.url + "/v1", "--history", "1"])
    out = capsys.readouterr().out
    assert "🤖: You said: second message" in out
    assert "[think] The user asks 3 + 4. That is 7.\n3 + 4 = 7." in out
    third = fake.model.prompts[-2]  # --history 1: exactly the previous turn (user AND answer), not older ones
    assert "second message" in third and "You said: second message" in third and "first message" not in third
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\n"))
    client.main(["--base_url", fake.url + "/v1", "--history", "0", "--no_stream"])
    assert "one" not in fake.model.prompts[-1] and "You said: two" in capsys.readouterr().out
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(SystemExit, match="no server at .*start one with python scripts/serve_openai_api.py"):
        client.main(["--base_url", dead])


def test_host_warning_and_busy_port(capsys):
    from trainer.trainer_utils import UserError
    for host in ("127.0.0.1", "localhost", "::1"):
        serve.check_host(host)
    assert capsys.readouterr().err == ""
    serve.check_host("0.0.0.0")
    assert "reachable from other machines; it has no authentication" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(UserError, match=r"cannot listen on 127.0.0.1:\d+ .*pass another --port"):
            serve.check_port("127.0.0.1", s.getsockname()[1])


def test_transformers_folder_through_hf_dir(tmp_path, tokenizer):
    """--hf_dir loads a transformers folder (here a tiny Llama, the format convert_model.py writes for dense models)
    with its own tokenizer; the chat stream decodes greedily from it like from native weights."""
    import argparse

    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.trainer_utils import UserError
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256))
    llama.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    p = argparse.ArgumentParser()
    add_model_args(p)
    model, tok = load_model(args := p.parse_args(["--hf_dir", str(tmp_path / "hf")]))
    assert isinstance(model, LlamaForCausalLM) and args.model_name == "hf"
    model = place_model(model, "cpu")
    ids = build_prompt(tok, [{"role": "user", "content": "hi"}], 200).ids
    s = ChatStream(model, tok, ids, max_new_tokens=8, temperature=0)
    text = "".join(drain(s))
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=s.completion_tokens, do_sample=False)
    assert text == tok.decode(want[0, len(ids):], skip_special_tokens=True)
    with pytest.raises(UserError, match="merge the LoRA when converting"):
        load_model(p.parse_args(["--hf_dir", str(tmp_path / "hf"), "--lora_weight", "x"]))


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C in the programs that do not train: their own quiet line and exit 130, not the training message


@pytest.mark.parametrize("script,argv", [
    ("scripts/serve_openai_api.py", ["--port", "0"]),
    ("scripts/web_demo.py", ["--port", "0", "--no_browser"]),
    ("scripts/eval_bench.py", ["--data_dir", ROOT / "dataset" / "bench_sample" / "ceval"]),
    ("scripts/convert_model.py", ["--out", "{tmp}/hf"]),
    ("eval_llm.py", []),
])
def test_ctrl_c_outside_training_is_quiet(script, argv, monkeypatch, capsys, tmp_path):
    """Ctrl-C while the model loads (the first slow step of each of them)."""
    from conftest import run_inprocess

    import trainer.chat_utils

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer.chat_utils, "load_model", interrupted)
    monkeypatch.setattr(serve, "load_model", interrupted)  # web_demo reaches it through the imported server
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, out, err = run_inprocess(script, *(str(a).format(tmp=tmp_path) for a in argv), capsys=capsys)
    assert code == 130 and "Traceback" not in err, err
    assert "nothing was saved" not in out + err and err.strip().splitlines()[-1] in ("(interrupted)",
                                                                                   "server stopped")


@pytest.mark.slow
def test_server_ctrl_c_during_a_stream_stops_promptly(tiny_random, tmp_path):
    """The real script: Ctrl-C while a long stream is generating cancels the generation, so the stream ends at once
    with its final chunk and [DONE] instead of after the remaining thousands of tokens; then the process ends
    (exit 130, one line, no abort)."""
    import signal
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve_openai_api.py"), "--weight", "pretrain",
                             "--save_dir", str(tiny_random / "out"), "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env(tmp_path))
    try:
        lines = []
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        deadline = time.time() + 120
        while not any("serving" in line for line in lines):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.1)
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 8000,
                "temperature": 1.0, "seed": 0}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            proc.send_signal(signal.SIGINT)
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]" and len(rest) < 4000  # cut short (8000 tokens asked), and properly ended
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "cancelled"
        assert proc.wait(60) == 130
        err = proc.stderr.read()
        assert "Traceback" not in err and "terminate called" not in err, err
        assert err.strip().splitlines()[-1] == "server stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
