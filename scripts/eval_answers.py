"""Held-out accuracy of a checkpoint on prompts with checkable answers: greedy pass@1, and pass@k over k samples.

    python scripts/eval_answers.py --weight grpo --data_path dataset/demo/rlaif.jsonl
    python scripts/eval_answers.py --weight full_sft --data_path heldout.jsonl --samples 8 --temperature 0.8 \
        --seed 0 --max_new_tokens 64 --out out/eval_full_sft.json
    python scripts/eval_answers.py --hf_dir ./MiniMind2-hf --data_path heldout.jsonl      # a transformers folder

--data_path: any RLAIF/SFT JSONL whose last message is the checkable answer, a number ("82") or a reasoning trace
whose <answer> block ends in one; the prompt is every message before it. A completion is right when the RL rule
reward would pay it (trainer/rl_utils.py answer_reward), so this accuracy is the RL stages' reward on prompts they
never saw. Sizes come from the weight's sidecar (as in eval_llm.py). Prints the summary and writes a JSON with the
numbers, the settings and one record per prompt (greedy completion, right or not, right samples out of k).
The RL stages run the same evaluation during training with --eval_interval N --eval_data_path F.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.answer_eval import evaluate_answers, load_answer_set  # noqa: E402
from trainer.chat_utils import add_device_arg, add_model_args, inference_context, load_model, place_model  # noqa: E402
from trainer.trainer_utils import UserError, atomic_write_text, run_main, user_path  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description="Greedy pass@1 and sampled pass@k on checkable answers",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_device_arg(p)
    p.add_argument("--data_path", type=str, required=True,
                   help="留出集 / RLAIF/SFT JSONL whose last message is a checkable (numeric) answer")
    p.add_argument("--max_prompts", type=int, default=0, help="评估前 N 条 / only the first N checkable records (0 = all)")
    p.add_argument("--samples", type=int, default=0, help="k: samples per prompt for pass@k (0 = greedy only)")
    p.add_argument("--temperature", type=float, default=0.8, help="采样温度 / temperature of the k samples (> 0)")
    p.add_argument("--seed", type=int, default=0, help="随机种子 / sampling seed (same seed -> same samples)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="最大生成长度 / max new tokens per answer")
    p.add_argument("--max_prompt_len", type=int, default=512,
                   help="prompt tokens kept (a longer prompt loses the middle of its last message, as in RL)")
    p.add_argument("--batch_size", type=int, default=64, help="rows generated together")
    p.add_argument("--out", type=str, default=None, help="JSON path (default: {save_dir}/eval_{model}.json)")
    return p


def main():
    args = build_parser().parse_args()
    for name in ("max_prompts", "samples"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} {getattr(args, name)} must be >= 0")
    for name in ("max_new_tokens", "max_prompt_len", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} must be >= 1")
    if args.samples and not args.temperature > 0:
        raise UserError(f"--temperature {args.temperature} must be > 0 to draw --samples {args.samples}")
    model, tokenizer = load_model(args)
    model = place_model(model, args.device, args.dtype)
    prompts, answers = load_answer_set(args.data_path, tokenizer, args.max_prompts)
    res = evaluate_answers(model, tokenizer, prompts, answers, samples=args.samples, temperature=args.temperature,
                           seed=args.seed, max_new_tokens=args.max_new_tokens, max_prompt_len=args.max_prompt_len,
                           batch_size=args.batch_size, autocast=lambda: inference_context(model))
    out = user_path(args.out) if args.out else str(Path(args.save_dir) / f"eval_{args.model_name}.json")
    summary = {"model": args.model_file, "data_path": str(Path(user_path(args.data_path))), **res}
    atomic_write_text(json.dumps(summary, ensure_ascii=False, indent=1) + "\n", out)
    line = f"greedy pass@1 {res['accuracy']:.4f} ({res['greedy_correct']}/{res['prompts']})"
    if args.samples:
        line += (f" | pass@{args.samples} {res['pass_at_k']:.4f} ({res['pass_at_k_correct']}/{res['prompts']}) | "
                 f"sampled accuracy {res['sampled_accuracy']:.4f} at T={args.temperature}")
    print(f"{line} | {res['seconds']:.1f}s | wrote {out}")


if __name__ == "__main__":
    run_main(main)
