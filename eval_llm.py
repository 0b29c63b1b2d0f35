"""Chat with a trained checkpoint: built-in test prompts (auto), your own input (chat), or prompts piped on stdin.

    python eval_llm.py --weight full_sft                     # asks: auto test prompts or chat; sizes from the sidecar
    python eval_llm.py --weight full_sft --mode auto --max_new_tokens 128
    printf 'hello\\n3 + 4 = ?\\n' | python eval_llm.py --weight full_sft      # one prompt per stdin line
    python eval_llm.py --weight full_sft --lora_weight lora_identity
    python eval_llm.py --hf_dir ./MiniMind2-hf                 # a transformers-format folder (scripts/convert_model.py)
    python eval_llm.py --weight full_sft --tools calculator,unit_convert   # the model may call built-in tools

Native weights are out/{weight}_{hidden}{_moe}.pth; the model sizes are read from the .json sidecar next to them,
so they need not be repeated (a flag that contradicts the sidecar is an error). Replies stream token by token;
<think> reasoning is shown apart from the answer. --temperature 0 decodes greedily. Prompt building, sampling,
streaming and <think> parsing are trainer/chat_utils.py, shared with the API server and the chat page.
In chat mode an empty line, Ctrl-D or Ctrl-C quits; with stdin not a terminal every line is a prompt until EOF.
With --tools the model's <tool_call>s run (trainer/tools.py), the call and its result are shown, and the reply
goes on with the result in the conversation, up to TOOL_TURNS replies per prompt.
"""
import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from model.model_minimind import MiniMindForCausalLM, count_params  # noqa: E402
from trainer.chat_utils import (ChatStream, GenerationError, ReplyParser, add_device_arg, add_model_args,  # noqa: E402
                                build_prompt, context_length, is_hf_dir, load_model, place_model, precision_name,
                                sampling_flag)
from trainer.tools import TOOLS, run_tool_call, tool_schemas  # noqa: E402
from trainer.trainer_utils import UserError, run_main  # noqa: E402

AUTO_PROMPTS = [
    "你好，请介绍一下你自己。",
    "3 加 4 等于多少？",
    "中国的首都是哪里？",
    "请写一首关于春天的短诗。",
    "What is 12 plus 7?",
    "Explain what a neural network is in one sentence.",
    "如何保持健康的生活习惯？",
    "地球为什么有四季？",
]
DIM, RESET = "\033[2m", "\033[0m"
TOOL_TURNS = 4  # model replies per prompt when it calls tools (the last one may still call; then it stops)


def nonneg_int(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 0")
    return int(text)


def build_parser():
    p = argparse.ArgumentParser(description="Chat with a MiniMind checkpoint",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_device_arg(p)
    p.add_argument("--max_new_tokens", type=sampling_flag("max_new_tokens", int), default=8192,
                   help="最大生成长度 / max new tokens (>= 1)")
    p.add_argument("--temperature", type=sampling_flag("temperature"), default=0.85,
                   help="采样温度 / temperature (0 = greedy)")
    p.add_argument("--top_p", type=sampling_flag("top_p"), default=0.85, help="nucleus sampling top_p, in (0, 1]")
    p.add_argument("--historys", type=nonneg_int, default=0,
                   help="携带的历史消息数 / past messages kept (2 = the last question and answer; odd rounds up)")
    p.add_argument("--mode", type=str, default=None, choices=["auto", "chat"],
                   help="auto = built-in test prompts (or --prompts); chat = your input (typed, or stdin lines when "
                        "stdin is not a terminal); default: ask on a terminal, stdin lines otherwise")
    p.add_argument("--prompts", type=str, nargs="*", default=None, help="prompts for auto mode (default: built-in)")
    p.add_argument("--enable_thinking", type=int, default=None, choices=[0, 1],
                   help="chat template switch: 0 closes the <think> block in the prompt (default: the model decides)")
    p.add_argument("--seed", type=sampling_flag("seed", int), default=None,
                   help="固定随机种子 / fix sampling seed (default: random)")
    p.add_argument("--tools", type=str, default=None,
                   help=f"内置工具 / built-in tools the model may call, comma-separated: {','.join(TOOLS)}")
    return p


def prompt_source(args):
    """Yields the prompts: auto list, typed input, or stdin lines. Says how to quit when a person types."""
    if args.prompts or args.mode == "auto":
        for prompt in args.prompts or AUTO_PROMPTS:
            print(f"👶: {prompt}")
            yield prompt
        return
    if not sys.stdin.isatty():  # piped or redirected: every non-empty line is one prompt
        for line in sys.stdin:
            if line.strip():
                print(f"👶: {line.strip()}")
                yield line.strip()
        return
    if args.mode is None:
        args.mode = ask_mode()
        if args.mode is None:  # Ctrl-D at the menu
            print()
            return
        if args.mode == "auto":
            yield from prompt_source(args)
            return
    print("输入消息回车发送；空行、Ctrl-D 或 Ctrl-C 退出 / type a message and press Enter; "
          "an empty line, Ctrl-D or Ctrl-C quits")
    while True:
        try:
            prompt = input("👶: ").strip()
        except EOFError:
            print()
            return
        if not prompt:
            return
        yield prompt


def ask_mode():
    """The terminal menu: "auto" or "chat", None on Ctrl-D. Asks again until the answer is 0 or 1."""
    while True:
        try:
            choice = input("[0] 自动测试 auto  [1] 手动输入 chat  请选择 / choose: ").strip()
        except EOFError:
            return None
        if choice in ("0", "1"):
            return "auto" if choice == "0" else "chat"
        print("请输入 0 或 1 / type 0 or 1")


def show_reply(stream: ChatStream, parser: ReplyParser, color: bool, calls: list | None = None) -> str:
    """Print the streamed reply, reasoning dimmed and marked; returns the answer text (kept as history) and adds
    the reply's tool calls to `calls`."""
    def events():
        for delta in stream:
            yield from parser.feed(delta)
        yield from parser.finish()
    answer, section = [], None
    for kind, value in events():
        section = _show(kind, value, section, color, answer)
        if kind == "tool_call" and calls is not None:
            calls.append(value)
    if section == "reasoning" and color:
        print(RESET, end="")
    print()
    return "".join(answer)


def _show(kind, value, section, color, answer):
    if kind == "reasoning":
        if section != "reasoning":
            print((DIM if color else "") + "[think] ", end="")
        print(value, end="", flush=True)
    elif kind == "content":
        if section == "reasoning":
            print((RESET if color else "") + "\n", end="")
        print(value, end="", flush=True)
        answer.append(value)
    else:  # a tool call (only when the prompt offered tools)
        print(f"\n[tool call] {value['name']}({value['arguments']})", flush=True)
    return kind


def tool_flag(args) -> tuple[list[str], list[dict] | None]:
    """--tools a,b -> (names, their schemas for the chat template); ([], None) without the flag."""
    names = [n.strip() for n in (args.tools or "").split(",") if n.strip()]
    try:
        return names, (tool_schemas(names) if names else None)
    except ValueError as e:
        raise UserError(f"--tools: {e}") from None


def with_tool_turns(prompts, calls: list):
    """The prompts, each followed by None while the latest reply made tool calls (at most TOOL_TURNS replies)."""
    for prompt in prompts:
        yield prompt
        for _ in range(TOOL_TURNS - 1):
            if not calls:
                break
            yield None


def main(argv=None):
    args = build_parser().parse_args(argv)
    model, tokenizer = load_model(args)
    raw = args.weight == "pretrain" and not is_hf_dir(args)  # a pretrained model continues text, no chat template
    model = place_model(model, args.device, args.dtype)
    if isinstance(model, MiniMindForCausalLM):
        total, active = count_params(model)
        print(f"Model Params: {total:.2f}M" + (f"-A{active:.2f}M" if model.config.use_moe else "")
              + f" | {precision_name(model)} on {args.device}")
    budget = context_length(model) - args.max_new_tokens
    if budget < 1:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in the model's context "
                        f"of {context_length(model)} tokens; lower it")
    color = sys.stdout.isatty()
    names, tools = tool_flag(args)
    history, calls = [], []
    for prompt in with_tool_turns(prompt_source(args), calls):
        if prompt is not None:  # None: the model goes on after its tool calls' results
            keep = args.historys + args.historys % 2  # whole question/answer pairs
            history = history[-keep:] if keep else []
            while history and history[0]["role"] != "user":  # never open with an orphan answer or tool result
                history.pop(0)
            history.append({"role": "user", "content": prompt})
        built = build_prompt(tokenizer, history, budget, tools=tools, enable_thinking=args.enable_thinking, raw=raw)
        if built.dropped or built.cut_tokens:
            print(f"(prompt cut to the context: {built.dropped} old turns dropped, {built.cut_tokens} tokens cut)")
        print("🤖: ", end="", flush=True)
        t0 = time.time()
        stream = ChatStream(model, tokenizer, built.ids, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed if args.seed is not None else random.randint(0, 2**31 - 1))
        try:
            calls.clear()
            reply = show_reply(stream, ReplyParser(tools=bool(tools), in_think=built.in_think), color, calls)
        except GenerationError as e:
            raise UserError(str(e)) from None
        finally:
            stream.close()
        n = stream.completion_tokens
        print(f"[{n} tokens, {n / max(time.time() - t0, 1e-9):.1f} tok/s]\n")
        history.append({"role": "assistant", "content": reply, **({"tool_calls": list(calls)} if calls else {})})
        for call in calls:
            result = run_tool_call(call, allowed=names)
            print(f"[tool result] {result}\n", flush=True)
            history.append({"role": "tool", "content": result})


def cli():
    # Ctrl-C: stop quietly (exit 130); the generation thread is a daemon and ends with us
    run_main(main, interrupted="(interrupted)")


if __name__ == "__main__":
    cli()
