"""Tool-use evaluation: held-out tasks run with real tool execution, multi-turn, batched across tasks.

    python scripts/eval_toolcall.py --weight full_sft                       # dataset/demo/tool_test.jsonl
    python scripts/eval_toolcall.py --weight agent --data_path tasks.jsonl --max_turns 3 --out out/tools.json
    python scripts/eval_toolcall.py --hf_dir ./MiniMind2-hf                  # a transformers folder

Each task's reply may call the tools its record offers; the calls run (trainer/tools.py), the results are appended
as the chat template renders tool messages, and generation goes on until a reply without a call (the final answer)
or --max_turns replies (trainer/tool_rollout.py, the same rollout the agent RL stage trains on). Greedy by default.

Reported (and written as JSON to --out, with one record per task): success (the final answer holds the reference:
the same number, or the text), split into tasks that need a tool and tasks that do not; call validity (calls naming
an offered tool with schema-valid arguments, over every <tool_call> block written, malformed ones included); calls
per task; tool tasks answered without any call; no-tool tasks that called anyway. Task format and the data:
scripts/make_tool_data.py.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.chat_utils import add_device_arg, add_model_args, inference_context, load_model, place_model  # noqa: E402
from trainer.tool_rollout import load_tool_tasks, score_task, summarize, tool_rollout  # noqa: E402
from trainer.trainer_utils import UserError, atomic_write_text, run_main, user_path  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description="Tool-use success, call validity and calls per task on held-out tasks",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_device_arg(p)
    p.add_argument("--data_path", type=str, default=str(ROOT / "dataset" / "demo" / "tool_test.jsonl"),
                   help="留出任务 / held-out tool tasks (JSONL: conversations, tools, gt, needs_tool)")
    p.add_argument("--max_tasks", type=int, default=0, help="评估前 N 条 / only the first N tasks (0 = all)")
    p.add_argument("--max_turns", type=int, default=3, help="每个任务最多回复轮数 / model replies per task, at most")
    p.add_argument("--max_new_tokens", type=int, default=128, help="每轮最大生成长度 / max new tokens per reply")
    p.add_argument("--max_total_len", type=int, default=1024,
                   help="对话总长上限 / token limit of a whole task (prompt, replies, tool results)")
    p.add_argument("--temperature", type=float, default=0.0, help="采样温度 / temperature (0 = greedy)")
    p.add_argument("--seed", type=int, default=0, help="随机种子 / sampling seed (used when temperature > 0)")
    p.add_argument("--batch_size", type=int, default=32, help="tasks generated together")
    p.add_argument("--out", type=str, default=None, help="JSON path (default: {save_dir}/eval_tools_{model}.json)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.max_tasks < 0:
        raise UserError(f"--max_tasks {args.max_tasks} must be >= 0")
    for name in ("max_turns", "max_new_tokens", "max_total_len", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} must be >= 1")
    tasks = load_tool_tasks(args.data_path, args.max_tasks)
    model, tokenizer = load_model(args)
    model = place_model(model, args.device, args.dtype)
    torch.manual_seed(args.seed)
    t0, results = time.time(), []
    for i in range(0, len(tasks), args.batch_size):
        with inference_context(model):
            results += tool_rollout(model, tokenizer, tasks[i:i + args.batch_size], max_turns=args.max_turns,
                                    max_new_tokens=args.max_new_tokens, max_total_len=args.max_total_len,
                                    temperature=args.temperature)
    scores = [score_task(t, r) for t, r in zip(tasks, results)]
    summary = summarize(scores)
    records = [{"question": t["conversations"][-1].get("content"), "gt": t["gt"], "kind": t.get("kind"), **s,
                "messages": r.messages} for t, r, s in zip(tasks, results, scores)]
    out = user_path(args.out) if args.out else str(Path(args.save_dir) / f"eval_tools_{args.model_name}.json")
    res = {"model": args.model_file, "data_path": str(Path(user_path(args.data_path))), "max_turns": args.max_turns,
           "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed, **summary,
           "seconds": round(time.time() - t0, 2), "records": records}
    atomic_write_text(json.dumps(res, ensure_ascii=False, indent=1) + "\n", out)

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"
    print(f"success {pct(summary['success'])} ({summary['tasks']} tasks; tool tasks "
          f"{pct(summary['success_tool_tasks'])}, no-tool tasks {pct(summary['success_no_tool_tasks'])}) | "
          f"call validity {pct(summary['call_validity'])} ({summary['valid_calls']}/{summary['call_attempts']}) | "
          f"calls/task {summary['calls_per_task']:.2f} | answered without a needed tool "
          f"{summary['answered_without_tool']}/{summary['tool_tasks']} | {res['seconds']:.1f}s | wrote {out}")


if __name__ == "__main__":
    run_main(main)
