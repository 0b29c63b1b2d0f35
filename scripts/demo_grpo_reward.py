"""Watch GRPO raise the checkable reward of a tiny model on the demo arithmetic prompts (CPU, a few minutes).

    python scripts/demo_grpo_reward.py                 # pretrain -> SFT -> GRPO, then reward before vs after
    python scripts/demo_grpo_reward.py --skip_base     # reuse the pretrain/SFT weights already in --workdir

Every stage is the real script with small flags (the commands are printed). The reward is the rule-based
checkable reward only (--reasoning 0, no reward model): 1 when the completion's last number equals the prompt's
answer in dataset/demo/rlaif.jsonl, else 0, so the mean reward is the accuracy of the sampled completions.
GRPO trains on the first --num_prompts prompts (64: each is revisited ~20 times in 160 steps; a 1.7M-parameter model
learns arithmetic far too slowly from a binary reward to show progress on all 500 within minutes).
Printed at the end: the per-step training reward (medians over the first and the last window of steps) and the
sampled accuracy (T=0.8, same seed) of the SFT model and of the GRPO model on the training prompts and on held-out
prompts of the same file. One run (2 CPU cores, ~5 min): training reward median 0.141 (steps 1-20) -> 0.266
(steps 141-160); sampled accuracy on the 64 training prompts 0.141 -> 0.246, on 128 held-out prompts 0.133 -> 0.129
(the gain does not transfer to unseen sums at this size).
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "dataset" / "demo"


def run(script, *flags):
    cmd = [sys.executable, str(ROOT / script), *map(str, flags)]
    print(f"\n=== {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        sys.exit(f"{script} failed")
    print(f"=== done in {time.time() - t0:.0f}s", flush=True)


def sampled_accuracy(weight_file, args, scorer, indices, temperature, samples=4, seed=0):
    """Mean checkable reward of `samples` sampled completions for each demo RL prompt in `indices`."""
    import torch

    from dataset.lm_dataset import RLAIFDataset
    from model.model_minimind import MiniMindForCausalLM
    from trainer.rl_utils import rollout
    from trainer.trainer_utils import load_weights, model_config_from_args

    tok = scorer.tokenizer
    config = model_config_from_args(args)
    model = MiniMindForCausalLM(config)
    load_weights(model, str(weight_file), config)
    model.eval()
    ds = RLAIFDataset(DEMO / "rlaif.jsonl", tok)
    torch.manual_seed(seed)
    rewards = []
    for s in range(0, len(indices), 16):
        items = [ds[i] for i in indices[s:s + 16]]
        ro = rollout(model, tok, [it["prompt"] for it in items], num_return_sequences=samples,
                     max_new_tokens=args.max_gen_len, max_prompt_len=args.max_seq_len, temperature=temperature)
        r, _ = scorer(ro.prompts, ro.completions, [it["answer"] for it in items for _ in range(samples)])
        rewards += r.tolist()
    return sum(rewards) / len(rewards)


def main():
    p = argparse.ArgumentParser(description="GRPO reward demo on dataset/demo/rlaif.jsonl",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", type=str, default=str(ROOT / "out" / "demo_grpo"), help="weights and logs go here")
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_hidden_layers", type=int, default=4)
    p.add_argument("--pretrain_steps", type=int, default=150)
    p.add_argument("--sft_epochs", type=int, default=3)
    p.add_argument("--num_prompts", type=int, default=64, help="GRPO trains on the first N prompts of rlaif.jsonl")
    p.add_argument("--grpo_steps", type=int, default=160)
    p.add_argument("--grpo_lr", type=float, default=3e-4)
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=8, help="GRPO prompts per step")
    p.add_argument("--max_gen_len", type=int, default=10)
    p.add_argument("--window", type=int, default=20, help="steps per window for the start/end medians")
    p.add_argument("--heldout_prompts", type=int, default=128, help="evaluated from the end of rlaif.jsonl")
    p.add_argument("--skip_base", action="store_true", help="reuse pretrain/SFT weights in --workdir")
    args = p.parse_args()
    args.use_moe, args.headwise_attn_output_gate, args.max_seq_len = 0, 1, 96

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out, ckpt = work / "out", work / "checkpoints"
    common = ["--hidden_size", args.hidden_size, "--num_hidden_layers", args.num_hidden_layers, "--device", "cpu",
              "--num_workers", "0", "--max_seq_len", args.max_seq_len, "--save_dir", out, "--checkpoint_dir", ckpt]
    if not args.skip_base:
        run("trainer/train_pretrain.py", *common, "--data_path", DEMO / "pretrain.jsonl", "--batch_size", 16,
            "--learning_rate", 3e-3, "--accumulation_steps", 1, "--max_steps", args.pretrain_steps,
            "--log_interval", 50)
        run("trainer/train_full_sft.py", *common, "--data_path", DEMO / "sft.jsonl", "--batch_size", 16,
            "--learning_rate", 2e-3, "--epochs", args.sft_epochs, "--log_interval", 50)
    metrics = ckpt / f"grpo_{args.hidden_size}_metrics.jsonl"
    if metrics.exists():
        metrics.unlink()  # a fresh GRPO run, not a resume
    lines = (DEMO / "rlaif.jsonl").read_text(encoding="utf-8").splitlines()
    subset = work / f"rlaif_first{args.num_prompts}.jsonl"
    subset.write_text("\n".join(lines[:args.num_prompts]) + "\n", encoding="utf-8")
    run("trainer/train_grpo.py", *common, "--data_path", subset, "--reasoning", 0,
        "--reward_model_path", "none", "--from_weight", "full_sft", "--num_generations", args.num_generations,
        "--batch_size", args.batch_size, "--max_gen_len", args.max_gen_len, "--learning_rate", args.grpo_lr,
        "--max_steps", args.grpo_steps, "--log_interval", 1, "--save_interval", 1000,
        "--epochs", math.ceil(args.grpo_steps * args.batch_size / args.num_prompts))

    rewards = [json.loads(line)["reward"] for line in metrics.read_text().splitlines()]
    w = min(args.window, len(rewards) // 2)
    first, last = statistics.median(rewards[:w]), statistics.median(rewards[-w:])
    print(f"\nGRPO training reward (mean checkable reward of the {args.batch_size}x{args.num_generations} sampled "
          f"completions per step), {len(rewards)} steps:")
    print(f"  median of steps 1-{w}: {first:.3f}   median of steps {len(rewards) - w + 1}-{len(rewards)}: {last:.3f}")
    n = len(rewards)
    print("  per-window means: " + " ".join(f"{statistics.mean(rewards[i:i + w]):.2f}" for i in range(0, n, w)))
    train_idx = list(range(args.num_prompts))
    heldout_idx = list(range(len(lines) - args.heldout_prompts, len(lines)))
    from trainer.rl_utils import RewardScorer
    from trainer.trainer_utils import load_tokenizer
    scorer = RewardScorer(argparse.Namespace(reasoning=0, reward_model_path="none", answer_reward=1.0),
                          load_tokenizer(str(ROOT / "model")), "cpu")
    print("  sampled accuracy, 4 samples per prompt at T=0.8 (same seed for both models):")
    for name in ("full_sft", "grpo"):
        weights = out / f"{name}_{args.hidden_size}.pth"
        train_acc = sampled_accuracy(weights, args, scorer, train_idx, 0.8)
        heldout_acc = sampled_accuracy(weights, args, scorer, heldout_idx, 0.8)
        print(f"  {name:8s}: {train_acc:.3f} on the {len(train_idx)} training prompts, {heldout_acc:.3f} on "
              f"{len(heldout_idx)} held-out prompts")


if __name__ == "__main__":
    main()
