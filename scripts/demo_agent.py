"""Tool use, trained and measured on the demo tool data: SFT teaches the call format, agent RL trains on rollouts in
which the tools really run, and held-out task success is measured after each.

    python scripts/demo_agent.py                          # seeds 1,2, a 128x4 model, into /tmp/minimind_agent_demo
    python scripts/demo_agent.py --seeds 0 --rl_steps 60 --workdir out/agent_demo

First scripts/make_tool_data.py writes a larger train split into the work folder (--sft_tasks conversations, 200 RL
prompts; the train rules keep them disjoint from the held-out dataset/demo/tool_test.jsonl). Then per seed, every
stage is the real script (commands printed, logs in the work folder):
    1. trainer/train_full_sft.py from random weights on those conversations (question, tool call, tool result,
       answer; no-tool questions answered directly)
    2. scripts/eval_toolcall.py on the held-out dataset/demo/tool_test.jsonl (120 tasks, greedy, real tools)
    3. trainer/train_agent.py from that SFT model on the RL prompts
    4. scripts/eval_toolcall.py on the held-out tasks again
The table at the end lists, per seed, held-out success (all tasks, tool tasks, no-tool tasks), call validity, calls
per task, tool tasks answered without a call (and how many of those were right: the model without its tools) after
SFT and after RL, and the seconds each stage took. The flags were settled on seed 0 (docs/tools.md); seeds 1 and 2
are the reported ones. Status (docs/tools.md): the target is not reached. Held-out success after SFT 1.7% / 4.2%,
after RL 0.8% / 2.5% (seeds 1 / 2, all of it luck); the SFT model calls the right tool with valid JSON 81-92% of the
time but does not copy the question's values into the call, and RL does not teach that.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "dataset" / "demo"
sys.path.insert(0, str(ROOT / "scripts"))

from demo_grpo_reward import run  # noqa: E402 (one stage as a subprocess, logged; the seconds it took)


def evaluate(weight: str, size: list, work: Path, args) -> tuple[dict, float]:
    out = work / f"eval_{weight}.json"
    took = run("scripts/eval_toolcall.py", "--weight", weight, "--save_dir", work / "out", *size, "--device",
               args.device, "--max_turns", args.max_turns, "--max_new_tokens", args.max_gen_len, "--out", out,
               log=work / f"eval_{weight}.log")
    return json.loads(out.read_text()), took


def solved_without_call(res: dict) -> int:
    """Held-out tool tasks answered right with no call tried: what the model does without the tools."""
    return sum(r["success"] for r in res["records"] if r["answered_without_tool"])


def main():
    p = argparse.ArgumentParser(description="SFT -> agent RL on the demo tool data, held-out success after each",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", type=str, default="/tmp/minimind_agent_demo")
    p.add_argument("--seeds", type=str, default="1,2")
    p.add_argument("--sft_tasks", type=int, default=2400, help="SFT conversations the generator writes for training")
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_hidden_layers", type=int, default=4)
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--sft_epochs", type=int, default=3)
    p.add_argument("--rl_steps", type=int, default=40, help="agent RL optimizer steps (rollout batches x 2)")
    p.add_argument("--max_turns", type=int, default=3)
    p.add_argument("--max_gen_len", type=int, default=64, help="tokens per reply, in RL and in the evaluations")
    args = p.parse_args()
    size = ["--hidden_size", args.hidden_size, "--num_hidden_layers", args.num_hidden_layers]
    data = Path(args.workdir) / "data"
    data.mkdir(parents=True, exist_ok=True)
    # the committed generator, more training tasks: train splits are disjoint from tool_test.jsonl by construction
    run("scripts/make_tool_data.py", "--out_dir", data, "--sft", args.sft_tasks, "--rl", 200,
        log=Path(args.workdir) / "data.log")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        work = Path(args.workdir) / f"seed{seed}"
        work.mkdir(parents=True, exist_ok=True)
        common = [*size, "--device", args.device, "--num_workers", "0", "--seed", seed, "--save_dir", work / "out",
                  "--checkpoint_dir", work / "checkpoints"]
        sft_s = run("trainer/train_full_sft.py", *common, "--from_weight", "none", "--data_path",
                    data / "tool_sft.jsonl", "--max_seq_len", 640, "--pack", 1, "--epochs", args.sft_epochs,
                    "--batch_size", 16, "--learning_rate", "3e-3", "--log_interval", 25, "--save_interval", 100000,
                    log=work / "sft.log")
        sft, sft_eval_s = evaluate("full_sft", size, work, args)
        rl_s = run("trainer/train_agent.py", *common, "--data_path", data / "tool_rl.jsonl", "--max_seq_len", 800,
                   "--max_gen_len", args.max_gen_len, "--max_turns", args.max_turns, "--num_generations", 8,
                   "--batch_size", 4, "--learning_rate", "5e-5", "--warmup_iters", 4, "--beta", 0,
                   "--num_iterations", 2, "--max_steps", args.rl_steps, "--log_interval", 2,
                   "--save_interval", 100000, log=work / "agent.log")
        rl, rl_eval_s = evaluate("agent", size, work, args)
        rows.append(dict(seed=seed, sft=sft, rl=rl, seconds=dict(sft=sft_s, sft_eval=sft_eval_s, rl=rl_s,
                                                                  rl_eval=rl_eval_s)))

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}"
    print("\nheld-out dataset/demo/tool_test.jsonl (120 tasks, greedy, real tools), percent")
    print("| seed | model | success | tool tasks | no-tool tasks | call validity | calls/task | tool tasks answered "
          "without a call (right) | seconds (train + eval) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for name, res, train, ev in (("SFT", r["sft"], "sft", "sft_eval"), ("agent RL", r["rl"], "rl", "rl_eval")):
            print(f"| {r['seed']} | {name} | {pct(res['success'])} | {pct(res['success_tool_tasks'])} | "
                  f"{pct(res['success_no_tool_tasks'])} | {pct(res['call_validity'])} | {res['calls_per_task']:.2f} | "
                  f"{res['answered_without_tool']}/{res['tool_tasks']} ({solved_without_call(res)}) | "
                  f"{r['seconds'][train]:.0f} + {r['seconds'][ev]:.0f} |")
    if len(rows) > 1:
        gain = sum(r["rl"]["success"] - r["sft"]["success"] for r in rows) / len(rows)
        print(f"mean gain of agent RL over SFT: {100 * gain:+.1f} points")


if __name__ == "__main__":
    main()
