"""Agent RL: the model learns to use tools from multi-turn rollouts in which its <tool_call>s really run.

    python trainer/train_agent.py --hidden_size 64 --num_hidden_layers 2 --device cpu --num_generations 4 \
        --max_gen_len 64 --beta 0 --eval_interval 10 --eval_data_path dataset/demo/tool_test.jsonl   # demo tasks
    cd trainer && torchrun --nproc_per_node 2 train_agent.py --hidden_size 640 --num_hidden_layers 12 --use_moe 1 \
        --data_path ../dataset/demo/tool_rl.jsonl --num_generations 8 --max_turns 3 --use_wandb

Data: tool tasks (scripts/make_tool_data.py writes dataset/demo/tool_{rl,test}.jsonl): {"conversations": [the
question], "tools": [schemas offered], "gt": "reference answer", "needs_tool": bool}. Starts from out/full_sft_*
(teach the call format with SFT on dataset/demo/tool_sft.jsonl first), writes out/agent_{hidden}{_moe}.pth.

A step (one rollout batch): every task of the batch is rolled out --num_generations times, all of them together
(trainer/tool_rollout.py): the model replies; its <tool_call>s are parsed and executed (trainer/tools.py, --tools);
the results are appended as the chat template renders tool messages; it replies again, until a reply without a call
(the final answer), a reply cut at --max_gen_len, --max_turns replies or --max_seq_len tokens. Reward per rollout
(task_reward, each part logged):
    reward_answer   +1.0 when the final answer holds gt (the same last number, or the text)
    reward_format   +0.2 when a task that needs a tool made at least one valid call (an offered tool, arguments
                    that fit its schema); once per task, so more calls never pay more
    reward_calls    -0.2 per malformed or invalid call (cut off, not JSON, unknown tool, bad arguments), -0.2 when a
                    task that needs a tool ends with no call tried at all (otherwise a model that cannot yet write a
                    valid call learns to stop trying: dropping the <tool_call> tag beats a malformed call), and -0.1
                    per unnecessary call (any call on a task that needs no tool, a repeat of an identical call); at
                    most -1.0 in all
Advantages within each task's group, then the GRPO-family objective of train_grpo.py (trainer/rl_objectives.py:
--loss_type, --importance_sampling_level, --epsilon/--epsilon_high, --num_iterations x --mini_batch_size optimizer
steps per rollout batch, pi_old = the rollout policy, --beta with a frozen reference) over the model's own tokens
only: the prompt, the tool results and the assistant headers that follow them carry no loss (TaskRollout.mask;
docs/tools.md shows it on an example). --loss_type dr_grpo divides by --max_gen_len per rollout as in GRPO (a
constant; a rollout may hold up to --max_turns replies).

--fsdp 1 is refused: rollouts take a different number of turns on each rank, and sharded generation needs every
rank in every forward.
"""
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from model import chat_format  # noqa: E402
from trainer.answer_eval import add_eval_args  # noqa: E402
from trainer.rl_utils import (RolloutBatch, add_policy_args, add_rl_args, check_policy_args,  # noqa: E402
                              check_rl_args, describe_objective, group_policy_updates, reference_policy, rl_metrics,
                              zero_std_groups)
from trainer.tool_rollout import as_rollout, load_tool_tasks, score_task, tool_rollout  # noqa: E402
from trainer.tools import TOOLS  # noqa: E402
from trainer.trainer_utils import (Logger, RolloutUpdates, TrainLoop, UserError, build_optimizer,  # noqa: E402
                                   build_parser, init_model, init_run, model_config_from_args, parse_args, run_main,
                                   user_path)

ANSWER_REWARD = 1.0      # the final answer holds gt
CALL_REWARD = 0.2        # a task that needs a tool made >= 1 valid call
BAD_CALL_PENALTY = 0.2   # per malformed block or invalid call
NO_CALL_PENALTY = 0.2    # a tool task with no call tried: never better than a malformed try
EXTRA_CALL_PENALTY = 0.1  # per call on a no-tool task, per repeat of an identical call
MAX_PENALTY = 1.0


# ----------------------------------------------------------------------------------------------------------------
# Rewards

def repeated_calls(messages: list[dict]) -> int:
    """Calls identical (name and arguments) to an earlier call of the same rollout."""
    seen, repeats = set(), 0
    for m in messages:
        for c in m.get("tool_calls") or []:
            key = json.dumps(c.get("function", c), sort_keys=True, ensure_ascii=False)
            repeats += key in seen
            seen.add(key)
    return repeats


def task_reward(task: dict, r) -> dict:
    """The reward parts of one rollout (module docstring); their sum is its reward."""
    s = score_task(task, r)
    bad = s["malformed_calls"] + s["calls"] - s["valid_calls"]
    extra = (s["calls"] if not s["needs_tool"] else 0) + repeated_calls(r.messages)
    untried = s["needs_tool"] and s["calls"] + s["malformed_calls"] == 0
    return {"reward_answer": ANSWER_REWARD * s["success"],
            "reward_format": CALL_REWARD * (s["needs_tool"] and s["valid_calls"] > 0),
            "reward_calls": -min(BAD_CALL_PENALTY * bad + NO_CALL_PENALTY * untried + EXTRA_CALL_PENALTY * extra,
                                 MAX_PENALTY)}


def score_rollouts(tasks: list[dict], results: list) -> tuple[torch.Tensor, dict]:
    """(rewards [N], logged means: the reward parts, calls / malformed-or-invalid calls / replies per task, and
    the share of rollouts that ended with a final answer)."""
    parts = [task_reward(t, r) for t, r in zip(tasks, results)]
    rewards = torch.tensor([sum(p.values()) for p in parts], dtype=torch.float32)
    n = len(results)
    metrics = {k: sum(p[k] for p in parts) / n for k in parts[0]}
    metrics.update(calls_per_task=sum(r.calls for r in results) / n,
                   bad_calls_per_task=sum(r.malformed_calls + r.calls - r.valid_calls for r in results) / n,
                   turns_per_task=sum(len(r.replies) for r in results) / n,
                   finished=sum(r.finished for r in results) / n)
    return rewards, metrics


# ----------------------------------------------------------------------------------------------------------------
# Data and held-out evaluation

class ToolTaskDataset(Dataset):
    """The tool tasks of a JSONL file (trainer/tool_rollout.py load_tool_tasks), checked against --tools and
    --max_seq_len up front so a bad task stops the run before the first step, not hours into it."""

    def __init__(self, path: str, tokenizer, tools: list[str], args):
        self.tasks = load_tool_tasks(path, tools=tools)
        # the resume file records which data it belongs to (spine/checkpoint.py run_identity reads file.path)
        self.file = SimpleNamespace(path=user_path(path))
        texts = [chat_format.render(tokenizer, t["conversations"], t["tools"], add_generation_prompt=True)
                 for t in self.tasks]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[longest] + args.max_gen_len > args.max_seq_len:
            raise UserError(f"{path}: task {longest + 1}'s prompt (question and tool schemas) takes "
                            f"{lengths[longest]} tokens, so --max_seq_len {args.max_seq_len} (the whole rollout: "
                            f"prompt, replies, tool results) has no room for one reply of --max_gen_len "
                            f"{args.max_gen_len}; raise it to at least {lengths[longest] + args.max_gen_len}")

    def __len__(self):
        return len(self.tasks)

    def __getitem__(self, i):
        return self.tasks[i]


def collate_tasks(batch):
    return {"task": list(batch)}


def rollout_tasks(model, tokenizer, tasks, args, ctx, temperature: float):
    with ctx.autocast():
        return tool_rollout(model, tokenizer, tasks, max_turns=args.max_turns, max_new_tokens=args.max_gen_len,
                            max_total_len=args.max_seq_len, temperature=temperature)


class ToolEval:
    """TrainLoop's `evaluate` hook: greedy held-out task success (--eval_data_path) every --eval_interval optimizer
    steps and at the last, as scripts/eval_toolcall.py measures it. Each rank runs its share of the tasks
    (rank::world_size) on the unwrapped model, the counts are summed. Greedy decoding draws no random numbers, so
    training goes on exactly as without evaluation."""

    def __init__(self, args, tokenizer, ctx, model, tools):
        self.interval, self.args, self.tokenizer, self.ctx, self.model = args.eval_interval, args, tokenizer, ctx, model
        if self.interval < 0:
            raise UserError(f"--eval_interval {self.interval} must be >= 0 (0 = off)")
        if self.interval and not args.eval_data_path:
            raise UserError("--eval_interval needs --eval_data_path (held-out tool tasks, e.g. "
                            "dataset/demo/tool_test.jsonl)")
        self.tasks = ToolTaskDataset(args.eval_data_path, tokenizer, tools, args).tasks \
            if self.interval else []
        self.seen = None

    def __call__(self, opt_step: int, last: bool) -> dict | None:
        before, self.seen = (self.seen if self.seen is not None else opt_step - 1), opt_step
        if not self.interval or not (last or opt_step // self.interval > before // self.interval):
            return None
        ctx, t0 = self.ctx, time.time()
        mine = self.tasks[ctx.rank::ctx.world_size]
        step = self.args.batch_size * self.args.num_generations  # as many rows as a training rollout batch
        results = []
        for i in range(0, len(mine), step):
            results += rollout_tasks(self.model, self.tokenizer, mine[i:i + step], self.args, ctx, temperature=0.0)
        scores = [score_task(t, r) for t, r in zip(mine, results)]
        counts = torch.tensor([sum(s["success"] for s in scores), sum(s["calls"] for s in scores), len(scores)],
                              dtype=torch.float64, device=ctx.device)
        if dist.is_initialized():
            dist.all_reduce(counts)
        right, calls, n = counts.tolist()
        Logger(f"held-out: task success {right / n:.3f} ({int(right)}/{int(n)}), {calls / n:.2f} calls per task "
               f"({time.time() - t0:.1f}s)")
        return {"eval_success": right / n, "eval_calls_per_task": calls / n}


# ----------------------------------------------------------------------------------------------------------------

def main():
    parser = build_parser("MiniMind agent RL (tool use)", skip=("pack", "group_by_length"), save_weight="agent",
                          epochs=1, batch_size=2, learning_rate=1e-6, accumulation_steps=1, log_interval=1,
                          save_interval=10, max_seq_len=1024, data_path="dataset/demo/tool_rl.jsonl",
                          from_weight="full_sft", wandb_project="MiniMind-Agent")
    add_rl_args(parser, max_gen_len=128, rewards=False)
    add_policy_args(parser)
    for action in parser._actions:  # what these shared flags mean in a multi-turn rollout (argparse has no setter)
        if action.dest == "max_seq_len":
            action.help = ("每个任务的总长度上限 / token limit of a whole rollout: prompt with the tool schemas, "
                           "replies, tool results")
        elif action.dest == "max_gen_len":
            action.help = "每轮回复的最大长度 / max new tokens per reply (a rollout has up to --max_turns replies)"
    parser.add_argument("--num_generations", type=int, default=8,
                        help="每个任务的 rollout 数 G / rollouts per task (the group whose mean is the baseline); "
                             ">= 2")
    parser.add_argument("--scale_rewards", type=str, default="group", choices=["group", "batch", "none"],
                        help="优势归一化 / divide advantages by the group's reward std (GRPO), the rollout batch's "
                             "(batch), or not (none: Dr. GRPO)")
    parser.add_argument("--max_turns", type=int, default=3,
                        help="每个任务最多回复轮数 / model replies per rollout, at most (each call costs one)")
    parser.add_argument("--tools", type=str, default=",".join(TOOLS),
                        help="可执行的工具 / tools the run executes, comma-separated names from trainer/tools.py; a "
                             "task without \"tools\" is offered all of them, a task offering another is an error")
    add_eval_args(parser, measures="greedy held-out task success", logged_as="eval_success",
                  data="held-out tool tasks the run does not train on (e.g. dataset/demo/tool_test.jsonl)")
    args = parse_args(parser)
    check_rl_args(args)
    check_policy_args(args)
    if args.num_generations < 2:
        raise UserError(f"--num_generations {args.num_generations}: a task's group needs >= 2 rollouts (its mean "
                        "is the baseline)")
    if args.max_turns < 1:
        raise UserError(f"--max_turns {args.max_turns} must be >= 1")
    if args.fsdp:
        raise UserError("--fsdp 1 is not supported by train_agent.py: rollouts take a different number of turns on "
                        "each rank, and sharded generation needs every rank in every forward; use DDP (--fsdp 0)")
    tools = [n.strip() for n in args.tools.split(",") if n.strip()]
    unknown = [n for n in tools if n not in TOOLS]
    if unknown or not tools:
        raise UserError(f"--tools {args.tools}: unknown tool(s) {', '.join(unknown) or '(none given)'}; known: "
                        f"{', '.join(TOOLS)}")
    ctx = init_run(args)

    # ---------------------------------------------------------------- policy, reference, data
    config = model_config_from_args(args)
    model, tokenizer = init_model(config, args.from_weight, args.tokenizer_path, args.save_dir, ctx.device)
    ref_model = reference_policy(model, args.beta)
    dataset = ToolTaskDataset(args.data_path, tokenizer, tools, args)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, ctx.device, args.optimizer)
    loop = TrainLoop(args, ctx, model=model, optimizer=optimizer, dataset=dataset, collate_fn=collate_tasks,
                     config=config, stage="Agent", tokenizer=tokenizer,
                     evaluate=ToolEval(args, tokenizer, ctx, model, tools),
                     rollout=RolloutUpdates(args.num_iterations, args.mini_batch_size, args.num_generations),
                     run_name=f"MiniMind-Agent-Epoch-{args.epochs}-BS-{args.batch_size}-LR-{args.learning_rate}")
    Logger(describe_objective(args) + f", rewards scaled by {args.scale_rewards} std; {args.num_generations} "
           f"rollouts per task, up to {args.max_turns} replies of {args.max_gen_len} tokens, tools "
           f"{', '.join(tools)}")

    # ---------------------------------------------------------------- train
    G = args.num_generations
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for batch in loop:
        tasks = [t for t in batch["task"] for _ in range(G)]  # rows i*G .. i*G+G-1: task i's group
        results = rollout_tasks(loop.raw_model, tokenizer, tasks, args, ctx, temperature=args.temperature)
        rewards, reward_metrics = score_rollouts(tasks, results)
        b = RolloutBatch(as_rollout(results, pad, ctx.device), rewards.to(ctx.device), reward_metrics,
                         [t["gt"] for t in tasks])
        metrics = rl_metrics(b)
        metrics["frac_reward_zero_std"] = zero_std_groups(b.rewards, G).float().mean()
        group_policy_updates(loop, b, args, ctx, ref_model=ref_model, metrics=metrics)
    loop.finish()


if __name__ == "__main__":
    run_main(main)
