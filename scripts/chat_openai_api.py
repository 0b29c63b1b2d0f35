"""Terminal chat client for scripts/serve_openai_api.py (or any OpenAI-compatible server), on the official
`openai` package.

    python scripts/serve_openai_api.py --weight full_sft        # in one terminal
    python scripts/chat_openai_api.py                            # in another: streams replies, keeps 2 turns
    python scripts/chat_openai_api.py --history 0 --temperature 0 --base_url http://127.0.0.1:9000/v1

--history N sends the last N whole turns (each your message and the reply) before the new message; 0 sends only
the new message. Reasoning (<think>, returned as reasoning_content) is printed dimmed and marked [think], apart
from the answer, and is not sent back as history. An empty line, Ctrl-D or Ctrl-C quits.
"""
import argparse
import sys

DIM, RESET = "\033[2m", "\033[0m"


def build_parser():
    p = argparse.ArgumentParser(description="Chat with an OpenAI-compatible server from the terminal",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base_url", type=str, default="http://127.0.0.1:8998/v1", help="server address / 服务地址")
    p.add_argument("--api_key", type=str, default="none", help="sent as the bearer token (our server ignores it)")
    p.add_argument("--model", type=str, default=None, help="model id (default: the first from /v1/models)")
    p.add_argument("--history", type=int, default=2, help="历史轮数 / past turns (question + answer) sent along")
    p.add_argument("--system", type=str, default=None, help="系统提示 / system prompt")
    p.add_argument("--temperature", type=float, default=None, help="default: the server's")
    p.add_argument("--top_p", type=float, default=None, help="default: the server's")
    p.add_argument("--max_tokens", type=int, default=None, help="default: the server's")
    p.add_argument("--no_stream", action="store_true", help="wait for whole replies instead of streaming")
    return p


def request_messages(system, turns: list, history: int, prompt: str) -> list:
    """System prompt + the last `history` whole turns + the new message (never a turn cut in half)."""
    msgs = [{"role": "system", "content": system}] if system else []
    for user, answer in (turns[-history:] if history > 0 else []):
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return msgs + [{"role": "user", "content": prompt}]


def ask(client, args, messages, out=sys.stdout, color=False) -> str:
    """One reply, printed as it arrives; returns the answer text."""
    kw = {k: getattr(args, k) for k in ("temperature", "top_p", "max_tokens") if getattr(args, k) is not None}
    if args.no_stream:
        msg = client.chat.completions.create(model=args.model, messages=messages, **kw).choices[0].message
        reasoning = getattr(msg, "reasoning_content", None)
        if reasoning:
            out.write((DIM if color else "") + "[think] " + reasoning + (RESET if color else "") + "\n")
        for call in msg.tool_calls or []:
            out.write(f"[tool call] {call.function.name}({call.function.arguments})\n")
        out.write((msg.content or "") + "\n")
        return msg.content or ""
    answer, thinking = [], False
    for chunk in client.chat.completions.create(model=args.model, messages=messages, stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning = getattr(delta, "reasoning_content", None)  # not an OpenAI field: arrives as an extra
        if reasoning:
            if not thinking:
                out.write((DIM if color else "") + "[think] ")
                thinking = True
            out.write(reasoning)
        if delta.content:
            if thinking:
                out.write((RESET if color else "") + "\n")
                thinking = False
            out.write(delta.content)
            answer.append(delta.content)
        for call in delta.tool_calls or []:
            out.write(f"\n[tool call] {call.function.name}({call.function.arguments})\n")
        out.flush()
    out.write((RESET if color and thinking else "") + "\n")
    return "".join(answer)


def main(argv=None):
    from openai import APIConnectionError, APIError, OpenAI
    args = build_parser().parse_args(argv)
    if args.history < 0:
        sys.exit("error: --history must be >= 0")
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    try:
        args.model = args.model or client.models.list().data[0].id
    except APIConnectionError:
        sys.exit(f"error: no server at {args.base_url}; start one with python scripts/serve_openai_api.py "
                 "--weight full_sft, or pass --base_url")
    interactive = sys.stdin.isatty()
    color = sys.stdout.isatty()
    print(f"model {args.model} at {args.base_url}; " + ("empty line, Ctrl-D or Ctrl-C quits" if interactive
                                                        else "reading one prompt per stdin line"))
    turns = []
    while True:
        try:
            prompt = input("👶: " if interactive else "").strip()
        except EOFError:
            break
        if not prompt:
            if interactive:
                break
            continue
        if not interactive:
            print(f"👶: {prompt}")
        print("🤖: ", end="", flush=True)
        try:
            answer = ask(client, args, request_messages(args.system, turns, args.history, prompt), color=color)
        except APIError as e:
            print(f"\nerror from the server: {e}", file=sys.stderr)
            continue
        turns.append((prompt, answer))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print()
        sys.exit(130)
