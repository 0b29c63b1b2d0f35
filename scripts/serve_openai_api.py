"""OpenAI-compatible chat server for a checkpoint, with the browser chat page on the same port.

    python scripts/serve_openai_api.py --weight full_sft                  # API http://127.0.0.1:8998/v1, page at /
    python scripts/serve_openai_api.py --weight full_sft --lora_weight lora_identity --port 9000
    python scripts/serve_openai_api.py --hf_dir ./MiniMind2-hf             # a folder from scripts/convert_model.py
    python scripts/chat_openai_api.py                                      # the terminal client

Endpoints: POST /v1/chat/completions (stream and non-stream, OpenAI's request and response shapes), GET /v1/models,
GET / (the chat page, scripts/web/). Extras beyond OpenAI's fields: top_k, enable_thinking (also as
chat_template_kwargs.enable_thinking), and <think> text returned as reasoning_content (DeepSeek's field name).

Requests are QUEUED, not batched: one model is in memory and one generation runs at a time (a lock around
model.generate), the others wait in arrival order (at most --max_queue, then 429). That is the simplest correct
choice for a CPU or a single GPU running a small model; each stream still starts as soon as its turn comes.
A client that disconnects stops its generation at the next token (a non-stream request notices within 0.2 s,
also while it waits in the queue); an error inside generation ends the
stream with an error event; a malformed request gets a 4xx in OpenAI's error shape and the server keeps serving (an
unknown "model" 404 model_not_found, a body that does not arrive within 30 s 408). Ctrl-C cancels the generations in
flight, so the server stops at once (exit 130).
The server binds 127.0.0.1 (this machine only) unless --host says otherwise; it has no authentication.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

from model.chat_format import ROLES as CHAT_ROLES  # noqa: E402
from trainer.chat_utils import (SAMPLING_RULES, ChatStream, GenerationError, ReplyParser, add_device_arg,  # noqa: E402
                                add_model_args, build_prompt, cancel_generations, context_length, load_model,
                                place_model, precision_name)
from trainer.trainer_utils import UserError, run_main  # noqa: E402

WEB = ROOT / "scripts" / "web"
ROLES = CHAT_ROLES | {"developer"}  # OpenAI's newer name for system, mapped to it in parse_request
BODY_TIMEOUT_S = 30.0  # a request body not complete after this long gets 408 (it would hold a connection forever)
SHUTDOWN_GRACE_S = 10.0  # after Ctrl-C, requests still unfinished this long are cut (their generations are
                         # cancelled at once, so only a request stuck outside generation ever waits this long)
MAX_DEPTH = 64  # JSON nesting a request may have (a tool schema needs ~10; deeper is refused before it recurses)


class ApiError(Exception):
    """A request the server refuses; sent as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status)


def error_body(message: str, type: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ----------------------------------------------------------------------------------------------------------------
# Request validation: every field is checked here, so generation only ever sees sane values


def _number(body: dict, name: str, default, integer: bool = False, rule: str | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}", name)
    if rule:
        ok, why = SAMPLING_RULES[rule]
        if not ok(v):
            raise ApiError(400, f"'{name}' {why}, got {v}", name)
    return v


def parse_request(body, limits: dict) -> dict:
    """Validate an OpenAI chat-completions body; returns the normalised fields or raises ApiError (400; 404 for a
    model this server does not serve)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model")
    if model is not None and model not in limits["models"]:
        served = ", ".join(repr(m) for m in limits["models"])
        raise ApiError(404, f"The model {model!r} does not exist on this server; it serves {served} "
                            "(GET /v1/models)", "model", "model_not_found")
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError(400, "'messages' is required", "messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty array", "messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object with a role in {sorted(ROLES)}", f"messages[{i}]")
        c = m.get("content")
        if not (c is None or isinstance(c, str) or (isinstance(c, list) and all(isinstance(p, dict) for p in c))):
            raise ApiError(400, f"messages[{i}].content must be a string or an array of content parts",
                           f"messages[{i}].content")
        if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
            raise ApiError(400, f"messages[{i}].tool_calls must be an array", f"messages[{i}].tool_calls")
        m = dict(m)
        if m["role"] == "developer":  # OpenAI's newer name for the system role
            m["role"] = "system"
        messages.append(m)
    for name in ("stream", "enable_thinking"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise ApiError(400, f"'{name}' must be true or false", name)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    max_tokens = _number(body, "max_tokens", None, integer=True, rule="max_new_tokens")
    max_tokens = _number(body, "max_completion_tokens", max_tokens, integer=True, rule="max_new_tokens")
    if max_tokens is not None and max_tokens > limits["max_tokens"]:
        raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {limits['max_tokens']} "
                            "(raise it with --max_tokens_limit)", "max_tokens", "max_tokens_too_large")
    temperature = _number(body, "temperature", limits["temperature"], rule="temperature")
    if temperature > 2:
        raise ApiError(400, f"'temperature' must be in [0, 2], got {temperature}", "temperature")
    top_p = _number(body, "top_p", limits["top_p"], rule="top_p")
    top_k = _number(body, "top_k", 0, integer=True, rule="top_k")
    seed = _number(body, "seed", None, integer=True, rule="seed")
    n = _number(body, "n", 1, integer=True)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or an array of at most 4 strings", "stop")
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ApiError(400, "'tools' must be an array of tool objects", "tools")
    if body.get("tool_choice") == "none":
        tools = None
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ApiError(400, "'chat_template_kwargs' must be an object", "chat_template_kwargs")
    thinking = body.get("enable_thinking", kwargs.get("enable_thinking"))
    return dict(messages=messages, stream=bool(body.get("stream")), include_usage=bool((opts or {}).get(
        "include_usage")), max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), top_k=top_k,
        seed=seed, stop=stop or [], tools=tools or None, enable_thinking=thinking)


async def read_body(request: Request, limit: int, timeout: float):
    """The JSON body, refusing anything over `limit` bytes before reading it all (413), a body that has not arrived
    after `timeout` seconds (408), and JSON nested deeper than MAX_DEPTH (400)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {length} bytes is over the limit of {limit} (--max_body_kb)",
                       code="request_too_large")
    data = bytearray()
    with anyio.move_on_after(timeout) as waited:
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes (--max_body_kb)",
                               code="request_too_large")
    if waited.cancelled_caught:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout")
    try:
        body = json.loads(data)
    except RecursionError:
        raise ApiError(400, f"the request body is nested deeper than {MAX_DEPTH} levels", code="invalid_json") from None
    except ValueError as e:  # not JSON, not UTF-8, or an integer too long to convert
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if json_depth(body) > MAX_DEPTH:
        raise ApiError(400, f"the request body is nested deeper than {MAX_DEPTH} levels", code="invalid_json")
    return body


def json_depth(obj) -> int:
    """Nesting depth of parsed JSON, without recursion (templates and json.dumps recurse on what we accept)."""
    depth, level = 0, [obj]
    while level:
        depth += 1
        level = [v for o in level if isinstance(o, (dict, list)) for v in (o.values() if isinstance(o, dict) else o)]
    return depth


# ----------------------------------------------------------------------------------------------------------------
# The app


def create_app(model, tokenizer, model_name: str, *, context: int | None = None, max_tokens_limit: int = 8192,
               max_body_bytes: int = 1 << 20, max_queue: int = 16, temperature: float = 0.85, top_p: float = 0.85,
               lock: threading.Lock | None = None, body_timeout: float = BODY_TIMEOUT_S) -> FastAPI:
    """The FastAPI app around one loaded model. Tests pass a fake model (anything with HF generate's
    input_ids/streamer/stopping_criteria contract) to script replies that contain <think> or tool calls."""
    context = context or context_length(model)
    limits = dict(max_tokens=max_tokens_limit, temperature=temperature, top_p=top_p, models=[model_name])
    lock = lock or threading.Lock()
    state = {"pending": 0}
    created_at = int(time.time())
    app = FastAPI(title="MiniMind OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.state.context = context
    app.state.precision = precision_name(model) if hasattr(model, "dtype") else "-"

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", kind),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created_at, "owned_by": "minimind",
            # not OpenAI fields: what the chat page shows and uses for its limits
            "context_length": context, "max_tokens_limit": max_tokens_limit,
            "defaults": {"temperature": temperature, "top_p": top_p}}]}

    @app.get("/")
    async def page():
        return FileResponse(WEB / "index.html")

    app.mount("/web", StaticFiles(directory=WEB), name="web")

    def take_slot():
        """A place in the queue, taken when the request is accepted (before any await, so requests arriving
        together cannot all pass the check) and given back exactly once, whichever way the request ends."""
        if state["pending"] >= max_queue:
            raise ApiError(429, f"{state['pending']} requests are already queued; retry later (--max_queue)",
                           code="server_busy", type="rate_limit_error")
        state["pending"] += 1
        held = [True]

        def release():
            if held:
                held.clear()
                state["pending"] -= 1
        return release

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_request(await read_body(request, max_body_bytes, body_timeout), limits)
        release = take_slot()
        handed_over = False
        try:
            prompt, max_new = await anyio.to_thread.run_sync(fit_prompt, req)
            parser = ReplyParser(tools=bool(req["tools"]), in_think=prompt.in_think)
            head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

            def start():
                return ChatStream(model, tokenizer, prompt.ids, max_new_tokens=max_new,
                                  temperature=req["temperature"], top_p=req["top_p"], top_k=req["top_k"],
                                  seed=req["seed"], stop=req["stop"], lock=lock)
            if req["stream"]:
                # generation starts when the response body does, so a client gone before that costs nothing;
                # the response gives the slot back when it ends, also if its body never started
                handed_over = True
                return SlotStreamingResponse(sse(start, parser, head, len(prompt.ids), req["include_usage"],
                                                 release), release, media_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache"})
            stream = start()
            try:
                async with anyio.create_task_group() as watch:
                    watch.start_soon(cancel_on_disconnect, request, stream)
                    events, error = await anyio.to_thread.run_sync(collect, stream, parser)
                    watch.cancel_scope.cancel()
            finally:
                stream.cancel()
        finally:
            if not handed_over:
                release()
        if isinstance(error, GenerationError):
            raise ApiError(500, str(error), type="server_error")
        if error is not None:
            raise error
        msg = {"role": "assistant", "content": "".join(v for k, v in events if k == "content")}
        reasoning = "".join(v for k, v in events if k == "reasoning")
        if reasoning:
            msg["reasoning_content"] = reasoning
        calls = [tool_call(v) for k, v in events if k == "tool_call"]
        if calls:
            msg["tool_calls"] = calls
            msg["content"] = msg["content"] or None
        return {**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": msg, "logprobs": None,
            "finish_reason": "tool_calls" if calls else stream.finish_reason}],
            "usage": usage(len(prompt.ids), stream.completion_tokens)}

    def fit_prompt(req):
        """Prompt ids cut to the context by tokens, and the number of tokens to generate."""
        budget = context - (req["max_tokens"] or 1)
        if budget < 1:
            raise ApiError(400, f"max_tokens {req['max_tokens']} leaves no room for the prompt in this model's "
                                f"context of {context} tokens", "max_tokens", "context_length_exceeded")
        try:
            prompt = build_prompt(tokenizer, req["messages"], budget, tools=req["tools"],
                                  enable_thinking=req["enable_thinking"])
        except ValueError as e:
            raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
        except Exception as e:  # the chat template rejected the messages (e.g. a malformed tool call)
            raise ApiError(400, f"cannot render the messages with the chat template: {type(e).__name__}: {e}",
                           "messages") from None
        return prompt, req["max_tokens"] or min(max_tokens_limit, context - len(prompt.ids))

    async def sse(start, parser, head, prompt_tokens, include_usage, release):
        """OpenAI's chunk stream: role first, then content / reasoning_content / tool_calls deltas, a final chunk
        with finish_reason, the usage chunk when asked, and [DONE]. Leaving early (client gone) cancels."""
        def chunk(delta, finish=None):
            return event({**head, "object": "chat.completion.chunk",
                          "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})
        stream = start()
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                # abandon_on_cancel: a disconnect cancels this await at once; stream.cancel() below then ends the
                # generation thread, which unblocks the abandoned call
                delta = await anyio.to_thread.run_sync(next, stream, None, abandon_on_cancel=True)
                events = parser.finish() if delta is None else parser.feed(delta)
                for kind, value in events:
                    if kind == "tool_call":
                        yield chunk({"tool_calls": [{"index": parser.calls - 1, **tool_call(value)}]})
                    else:
                        yield chunk({"content" if kind == "content" else "reasoning_content": value})
                if delta is None:
                    break
            yield chunk({}, "tool_calls" if parser.calls else stream.finish_reason)
            if include_usage:
                yield event({**head, "object": "chat.completion.chunk", "choices": [],
                             "usage": usage(prompt_tokens, stream.completion_tokens)})
        except Exception as e:  # noqa: BLE001 -- the client must see an error event, never a hanging stream
            message = str(e) if isinstance(e, GenerationError) else f"internal error: {type(e).__name__}: {e}"
            yield event(error_body(message, "server_error"))
        finally:
            stream.cancel()
            release()
        yield "data: [DONE]\n\n"

    return app


class SlotStreamingResponse(StreamingResponse):
    """A StreamingResponse that gives its queue slot back when it ends, however it ends (its body generator does
    too, earlier; a generator that never started cannot)."""

    def __init__(self, content, release, **kw):
        super().__init__(content, **kw)
        self.release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


async def cancel_on_disconnect(request: Request, stream, every: float = 0.2) -> None:
    """A non-stream reply has nothing to write until it is done, so poll: a client gone while its request waits or
    generates cancels the generation (and frees the queue) within `every` seconds instead of after max_tokens."""
    while not await request.is_disconnected():
        await anyio.sleep(every)
    stream.cancel()


def collect(stream, parser) -> tuple[list, Exception | None]:
    """The whole reply's parser events, and the exception that ended it early if any (returned, not raised: it is
    re-raised outside the task group, which would wrap it in an ExceptionGroup)."""
    events = []
    try:
        for delta in stream:
            events += parser.feed(delta)
    except Exception as e:  # noqa: BLE001
        return events, e
    return events + parser.finish(), None


def event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def tool_call(call: dict) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": call["arguments"]}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser(description: str = "OpenAI-compatible API + chat page for a MiniMind checkpoint"):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_device_arg(p)
    p.add_argument("--host", type=str, default="127.0.0.1",
                   help="监听地址 / bind address; 127.0.0.1 = this machine only (the API has no authentication)")
    p.add_argument("--port", type=int, default=8998, help="端口 / port")
    p.add_argument("--max_tokens_limit", type=int, default=8192, help="largest max_tokens a request may ask for")
    p.add_argument("--context", type=int, default=None,
                   help="prompt + reply token budget (default: the model's max_position_embeddings); longer prompts "
                        "lose their oldest turns")
    p.add_argument("--max_body_kb", type=int, default=1024, help="largest request body, KiB (413 above)")
    p.add_argument("--max_queue", type=int, default=16, help="requests running or waiting at once (429 above)")
    p.add_argument("--temperature", type=float, default=0.85, help="default temperature when a request has none")
    p.add_argument("--top_p", type=float, default=0.85, help="default top_p when a request has none")
    return p


def check_host(host: str) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        print(f"warning: --host {host} makes this server reachable from other machines; it has no authentication, "
              "so anyone who can reach the port can use the model (keep 127.0.0.1 unless you mean it)",
              file=sys.stderr, flush=True)


def check_port(host: str, port: int) -> None:
    import socket
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host") from None


def load_app(args) -> FastAPI:
    for name, value in (("--max_tokens_limit", args.max_tokens_limit), ("--max_body_kb", args.max_body_kb),
                        ("--max_queue", args.max_queue)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    model, tokenizer = load_model(args)
    model = place_model(model, args.device, args.dtype)
    return create_app(model, tokenizer, args.model_name, context=args.context,
                      max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_kb * 1024,
                      max_queue=args.max_queue, temperature=args.temperature, top_p=args.top_p)


def main(argv=None, on_ready=None):
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """Ctrl-C / SIGTERM: uvicorn stops accepting and waits for the requests in flight; cancelling their
            generations (from a thread: this runs inside a signal handler) lets each end at its next token instead
            of after thousands, with its final chunk and [DONE]."""
            super().handle_exit(sig, frame)
            threading.Thread(target=cancel_generations, daemon=True).start()

    args = build_parser().parse_args(argv)
    check_host(args.host)
    check_port(args.host, args.port)  # before the model load, which takes a while
    app = load_app(args)
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                   timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"

    def announce():  # after the socket is bound, so a printed URL always answers
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            print(f"serving {args.model_name} ({app.state.precision}) | chat page {url}/ | API {url}/v1 "
                  "(queued: one generation at a time)", flush=True)
            if on_ready:
                on_ready(url)
    threading.Thread(target=announce, daemon=True).start()
    server.run()


if __name__ == "__main__":
    run_main(main, interrupted="server stopped")  # Ctrl-C is how a server stops; not a training run's message
