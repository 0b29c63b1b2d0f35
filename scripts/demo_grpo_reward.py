"""Proof that RL here improves a skill on prompts it never trained on: sums of five digits with a worked trace.

    python scripts/demo_grpo_reward.py                       # seeds 3 and 4: pretrain -> SFT -> GRPO (both objectives)
    python scripts/demo_grpo_reward.py --seeds 1 --objectives grpo

The task (dataset/demo/make_demo.py `sum_*`): "计算：3+5+2+4+7" (4 zh/en templates, the expression always last). A
worked reply lists the running totals, "<think>\n3,8,10,14,21\n</think>\n<answer>\n21\n</answer>" (every digit and
every total up to 45 is one token, so total k sits at a fixed distance from digit k: one copy and one addition fact per
step); a direct reply answers at once behind an empty think block, "<think>\n\n</think>\n<answer>\n21\n</answer>"
(a hybrid-thinking model's reply with thinking off). 300 held-out prompts are orderings of 150 digit multisets that
never appear, in any order, in pretraining, SFT or RL.

Per seed, every stage is the real script (commands printed, logs in the work folder): a 128x4 model is pretrained on
worked problems laid out as chat turns (--pretrain_steps, every problem seen once), SFT'd --sft_epochs epochs on
--sft_examples replies of which --sft_trace_share are worked and the rest direct (so the SFT model answers directly
by default), then GRPO'd with the rule reward only (1 when the final answer equals the sum) on --rl_prompts other
training prompts, once per objective in --objectives from the same SFT weights with the same rollouts (batches x
prompts x generations). Held-out greedy accuracy (scripts/eval_answers.py) and the share of greedy replies that write
the trace are measured for the SFT model and for each GRPO model; each GRPO run also logs eval_accuracy every
--eval_every rollout batches. The table lists every seed, the mean and the spread.

Measured (README "GRPO demo", docs/notes_stages.md "Session 9"): the default command, run once in session 9 on fresh
seeds 3 and 4 (fixed before seed 4's result; the recipe was chosen on seeds 0-2), held-out greedy accuracy:
SFT 0.327 / 0.067, grpo 0.440 / 0.527, recommended 0.393 / 0.393: +28.7 (grpo) and +19.7 (recommended) points on the
mean of the two seeds, every seed up (+11.3 / +46.0 and +6.6 / +32.6; seed 4's SFT model answered 1-3 too low on 90%
of the prompts, a bias RL removes quickly). 20-22 minutes per seed on 2 cores with both objectives side by side.
Seeds 1 and 2 at 20 rollout batches (the default then): +3.5 (grpo) and +3.0 (recommended); at 120, grpo +10.7 / +9.0.
"""
import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "dataset" / "demo"))

import make_demo  # noqa: E402

TRACE = re.compile(r"\d,\d")  # a reply that lists running totals

# The objectives the table compares, at equal rollouts: (flags, optimizer steps per rollout batch). "recommended" is
# the setting this demo was built to test (DAPO token normalisation, clip-higher, each rollout used twice); on the
# fresh seeds it lost to mu 1 (README "GRPO demo"), so train_grpo.py's default stays dapo with mu 1.
OBJECTIVES = {
    "grpo": (["--loss_type", "grpo", "--num_iterations", "1"], 1),
    "recommended": (["--loss_type", "dapo", "--epsilon_high", "0.28", "--num_iterations", "2"], 2),
}


def run(script, *flags, log, threads=None):
    """One stage as a subprocess, its output in `log`; returns the seconds it took. `threads`: the stage's torch
    threads (OMP_NUM_THREADS), for stages run side by side; None leaves torch's default (every core)."""
    cmd = [sys.executable, str(ROOT / script), *map(str, flags)]
    print(f"=== python {' '.join(str(c) for c in cmd[1:])}\n    (log: {log})", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        env = None if threads is None else dict(os.environ, OMP_NUM_THREADS=str(threads))
        if subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"{script} failed; see {log}")
    return time.time() - t0


def write_jsonl(path, rows):
    """Write only when the bytes differ, through a rename: a second invocation (another seed) started beside a
    running one never shows it a half-written file."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def make_task(data: Path, args):
    """The task's files (same bytes for every seed: the seeds vary the models, not the data)."""
    is_train, heldout = make_demo.sum_splits(args.digits, args.heldout_sets, args.heldout_prompts)
    rng = random.Random(0)
    data.mkdir(parents=True, exist_ok=True)
    # one problem per ~33 tokens: --pretrain_steps batches of 32 documents of 5 problems, each seen once
    pretrain = make_demo.sum_train(is_train, rng, args.pretrain_steps * 32 * 5, args.digits)
    write_jsonl(data / "pretrain.jsonl", make_demo.sum_pretrain(pretrain, rng))
    write_jsonl(data / "sft.jsonl", make_demo.sum_rows(make_demo.sum_train(is_train, rng, args.sft_examples,
                                                                           args.digits), rng,
                                                       trace_share=args.sft_trace_share))
    write_jsonl(data / "rl_train.jsonl", make_demo.sum_rows(make_demo.sum_train(is_train, rng, args.rl_prompts,
                                                                                args.digits), rng, trace=False))
    write_jsonl(data / "heldout.jsonl", make_demo.sum_rows(heldout, rng, trace=False))
    return len(heldout)


def evaluate(out, weight, data, logs, args, threads=None):
    res = out / f"eval_{weight}.json"
    run("scripts/eval_answers.py", "--weight", weight, "--save_dir", out, "--data_path", data / "heldout.jsonl",
        "--device", "cpu", "--dtype", "float32", "--max_new_tokens", args.max_gen_len, "--max_prompt_len", 64,
        "--seed", 0, "--out", res, log=logs / f"eval_{weight}.log", threads=threads)
    records = json.loads(res.read_text())
    worked = sum(TRACE.search(r["greedy"]) is not None for r in records["records"]) / len(records["records"])
    return records["accuracy"], worked


def one_seed(seed, data, args):
    work = Path(args.workdir) / f"seed{seed}"
    out, ckpt, logs = work / "out", work / "checkpoints", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = ["--hidden_size", args.hidden_size, "--num_hidden_layers", args.num_hidden_layers, "--device", "cpu",
              "--dtype", "float32", "--num_workers", 0, "--save_dir", out, "--checkpoint_dir", ckpt, "--seed", seed]
    # the documents fill --pretrain_steps batches of 32; a second epoch only covers the few the default held-out
    # slice takes (it holds out 500 once they are <= 5% of the data) so that --max_steps is reached
    t = run("trainer/train_pretrain.py", *common, "--data_path", data / "pretrain.jsonl", "--max_seq_len", 200,
            "--batch_size", 32, "--accumulation_steps", 1, "--learning_rate", 3e-3, "--epochs", 2,
            "--max_steps", args.pretrain_steps, "--log_interval", 20, log=logs / "pretrain.log")
    t += run("trainer/train_full_sft.py", *common, "--data_path", data / "sft.jsonl", "--max_seq_len", 96,
             "--batch_size", 16, "--accumulation_steps", 1, "--learning_rate", 1e-3, "--epochs", args.sft_epochs,
             "--from_weight", "pretrain", "--log_interval", 10, log=logs / "sft.log")
    acc, worked = evaluate(out, "full_sft", data, logs, args)
    result = {"seed": seed, "full_sft": acc, "seconds": {"pretrain+sft": t}, "trace_share": {"full_sft": worked}}
    print(f"seed {seed}: SFT held-out greedy accuracy {acc:.3f} ({worked:.0%} of the replies with the trace)",
          flush=True)
    batches_per_epoch = args.rl_prompts // args.batch_size

    def grpo(name):
        flags, steps_per_batch = OBJECTIVES[name]
        weight = f"grpo_{name}"
        took = run("trainer/train_grpo.py", *common, "--data_path", data / "rl_train.jsonl", "--max_seq_len", 64,
                   "--reasoning", 0, "--reward_model_path", "none", "--from_weight", "full_sft",
                   "--save_weight", weight, "--num_generations", args.num_generations, "--batch_size",
                   args.batch_size, "--max_gen_len", args.max_gen_len, "--temperature", args.temperature,
                   "--learning_rate", args.grpo_lr, "--warmup_iters", args.warmup_batches * steps_per_batch,
                   "--beta", args.beta,
                   "--max_steps", args.rollout_batches * steps_per_batch,
                   "--epochs", -(-args.rollout_batches // batches_per_epoch), "--log_interval", steps_per_batch,
                   "--save_interval", 10 ** 6, "--eval_interval", args.eval_every * steps_per_batch,
                   "--eval_data_path", data / "heldout.jsonl", *flags, log=logs / f"{weight}.log", threads=threads)
        return name, *evaluate(out, weight, data, logs, args, threads), took

    # one process per objective, side by side (both start from the same SFT weights), each with its share of the
    # cores: two processes with torch's default threads each on 2 cores ran ~4x slower than one alone
    threads = max(1, len(os.sched_getaffinity(0)) // len(args.objectives))
    with ThreadPoolExecutor(len(args.objectives)) as pool:
        for name, acc, worked, took in pool.map(grpo, args.objectives):
            result[name], result["seconds"][name], result["trace_share"][name] = acc, took, worked
            print(f"seed {seed}: {name} held-out greedy accuracy {acc:.3f} ({worked:.0%} of the replies with the "
                  f"trace; {took:.0f}s)", flush=True)
    (work / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def report(results, objectives, n_heldout, args):
    cols = ["full_sft"] + objectives
    print(f"\nHeld-out greedy accuracy (pass@1) on {n_heldout} prompts never trained on; GRPO: "
          f"{args.rollout_batches} rollout batches x {args.batch_size} prompts x {args.num_generations} samples per "
          "objective (equal rollouts)")
    print("| seed | " + " | ".join(cols) + " | wall s: pretrain+SFT, " + ", ".join(objectives) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for r in results:
        secs = ", ".join(f"{r['seconds'][k]:.0f}" for k in ["pretrain+sft"] + objectives)
        print(f"| {r['seed']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + f" | {secs} |")
    means = {c: statistics.mean(r[c] for r in results) for c in cols}
    spread = {c: max(r[c] for r in results) - min(r[c] for r in results) for c in cols}
    print("| mean (spread) | " + " | ".join(f"{means[c]:.3f} ({spread[c]:.3f})" for c in cols) + " | |")
    for c in objectives:
        print(f"{c}: held-out greedy accuracy {means['full_sft']:.3f} -> {means[c]:.3f} "
              f"({100 * (means[c] - means['full_sft']):+.1f} points, mean of {len(results)} seed(s))")
    if all(c in r.get("trace_share", {}) for r in results for c in cols):
        shares = ", ".join(f"{c} {statistics.mean(r['trace_share'][c] for r in results):.0%}" for c in cols)
        print(f"greedy replies that write the running totals (mean over seeds): {shares}")


def main():
    p = argparse.ArgumentParser(description="Held-out GRPO demo: sums of five digits with a worked trace",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", type=str, default=str(ROOT / "out" / "demo_grpo"), help="data, weights, logs")
    p.add_argument("--seeds", type=int, nargs="+", default=[3, 4],
                   help="one full pipeline per seed (3, 4: the first seeds never looked at while choosing the recipe)")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES),
                   help="GRPO objectives to compare at equal rollouts")
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_hidden_layers", type=int, default=4)
    p.add_argument("--digits", type=int, default=5, help="digits per problem (0-9 each)")
    p.add_argument("--heldout_sets", type=int, default=150, help="digit multisets held out in every order")
    p.add_argument("--heldout_prompts", type=int, default=300, help="held-out prompts drawn from those multisets")
    p.add_argument("--pretrain_steps", type=int, default=300, help="batches of 32 documents of 5 worked problems")
    p.add_argument("--sft_examples", type=int, default=1000, help="chat replies for SFT (worked or direct)")
    p.add_argument("--sft_trace_share", type=float, default=1 / 3,
                   help="share of the SFT replies with the worked trace; the others answer at once (sum_direct)")
    p.add_argument("--sft_epochs", type=int, default=4)
    p.add_argument("--rl_prompts", type=int, default=2000, help="GRPO training prompts (drawn apart from SFT's; "
                   "either may repeat a training sequence, never a held-out one)")
    p.add_argument("--rollout_batches", type=int, default=120,
                   help="GRPO rollout batches per objective (optimizer steps: x its updates per batch)")
    p.add_argument("--batch_size", type=int, default=32, help="GRPO prompts per rollout batch")
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--grpo_lr", type=float, default=1e-4,
                   help="the lr measured on seed 0 (docs/notes_stages.md); small models collapse at higher ones")
    p.add_argument("--warmup_batches", type=int, default=2, help="GRPO lr warmup, in rollout batches")
    p.add_argument("--beta", type=float, default=0.0, help="0: no reference model (DAPO, Dr. GRPO)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max_gen_len", type=int, default=28)
    p.add_argument("--eval_every", type=int, default=5,
                   help="held-out eval_accuracy logged every N rollout batches during GRPO (--eval_interval)")
    p.add_argument("--report", action="store_true",
                   help="only print the table of the seeds already in --workdir (seed*/result.json)")
    args = p.parse_args()

    data = Path(args.workdir) / "data"
    n_heldout = make_task(data, args)
    if args.report:
        results = [json.loads(f.read_text()) for f in sorted(Path(args.workdir).glob("seed*/result.json"))]
        if not results:
            sys.exit(f"no seed*/result.json in {args.workdir}; run the demo first")
        report(results, [o for o in OBJECTIVES if all(o in r for r in results)], n_heldout, args)
        return
    t0 = time.time()
    results = [one_seed(seed, data, args) for seed in args.seeds]
    report(results, args.objectives, n_heldout, args)
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
