"""RL step time: a stage script's own main() run in-process on the demo RL prompts with a small random model; prints
the median time per step, split into rollout (generation) and the rest (rewards, log-prob forwards, backward,
optimizer step), over the steps after a warm-up. Both wall time and this process's CPU time are given: with one
thread (the default) the CPU time barely moves when other jobs share the machine, the wall time does.

    python scripts/bench_rl.py --stage grpo --hidden_size 128 --num_hidden_layers 4 --steps 12
    python scripts/bench_rl.py --stage ppo --update_old_actor_freq 1

To compare two versions of trainer/, copy this file into the other checkout's scripts/ and run both, interleaved
(timings on a shared CPU are noisy: alternate A/B runs and compare medians).
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from trainer import rl_utils, train_grpo, train_ppo, train_spo  # noqa: E402
from trainer.trainer_utils import TrainLoop  # noqa: E402

parser = argparse.ArgumentParser(description="median RL step time (in-process, demo prompts, random weights)")
parser.add_argument("--stage", choices=["grpo", "spo", "ppo"], default="grpo")
parser.add_argument("--hidden_size", type=int, default=128)
parser.add_argument("--num_hidden_layers", type=int, default=4)
parser.add_argument("--use_moe", type=int, default=0)
parser.add_argument("--steps", type=int, default=12, help="steps timed after --warmup")
parser.add_argument("--warmup", type=int, default=2)
parser.add_argument("--batch_size", type=int, default=4)
parser.add_argument("--num_generations", type=int, default=4, help="GRPO only")
parser.add_argument("--max_gen_len", type=int, default=32)
parser.add_argument("--update_old_actor_freq", type=int, default=4, help="PPO only")
parser.add_argument("--threads", type=int, default=1)
cli = parser.parse_args()
torch.set_num_threads(cli.threads)

# (wall, cpu) stamps: the end of every backward (one per step) and the duration of every rollout
ends, rollouts = [], []
_backward, _rollout = TrainLoop.backward, rl_utils.rollout


def now():
    return time.perf_counter(), time.process_time()


def timed_backward(self, *a, **kw):
    out = _backward(self, *a, **kw)
    ends.append(now())
    return out


def timed_rollout(*a, **kw):
    t = now()
    out = _rollout(*a, **kw)
    rollouts.append([b - a for a, b in zip(t, now())])
    return out


TrainLoop.backward = timed_backward
rl_utils.rollout = train_ppo.rollout = timed_rollout

tmp = tempfile.mkdtemp(prefix="bench_rl_")
total = cli.warmup + cli.steps + 1
argv = ["--hidden_size", cli.hidden_size, "--num_hidden_layers", cli.num_hidden_layers, "--use_moe", cli.use_moe,
        "--device", "cpu", "--num_workers", 0, "--max_seq_len", 66, "--data_path", ROOT / "dataset/demo/rlaif.jsonl",
        "--from_weight", "none", "--reasoning", "0", "--reward_model_path", "none", "--max_gen_len", cli.max_gen_len,
        "--batch_size", cli.batch_size, "--learning_rate", 1e-5, "--log_interval", 1000, "--save_interval", 100000,
        "--max_steps", total, "--save_dir", f"{tmp}/out", "--checkpoint_dir", f"{tmp}/checkpoints"]
if cli.stage == "grpo":
    argv += ["--num_generations", cli.num_generations]
if cli.stage == "spo":
    argv += ["--accumulation_steps", 1]
if cli.stage == "ppo":
    argv += ["--update_old_actor_freq", cli.update_old_actor_freq]
argv = [str(a) for a in argv]
module = {"grpo": train_grpo, "spo": train_spo, "ppo": train_ppo}[cli.stage]
if cli.stage == "ppo":
    module.main(argv)
else:
    sys.argv = [module.__file__, *argv]
    module.main()

# step k's time runs from the end of step k-1's backward to the end of step k's (rollout and optimizer step included)
parts = []
for i in (0, 1):  # wall, cpu
    steps = [b[i] - a[i] for a, b in zip(ends, ends[1:])][cli.warmup:]
    gens = [g[i] for g in rollouts[1 + cli.warmup:1 + cli.warmup + len(steps)]]
    rest = [s - g for s, g in zip(steps, gens)]
    parts.append(f"{('wall', 'cpu')[i]}: step {1000 * statistics.median(steps):.1f} ms, rollout "
                 f"{1000 * statistics.median(gens):.1f} ms, rest {1000 * statistics.median(rest):.1f} ms")
print(f"{cli.stage} hidden {cli.hidden_size} x {cli.num_hidden_layers}{' moe' if cli.use_moe else ''} "
      f"(median of {len(steps)} steps) | " + " | ".join(parts))
