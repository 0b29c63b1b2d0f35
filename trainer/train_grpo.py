"""GRPO: sample a group of completions per prompt, reward them, push up the better-than-group-average ones.

    cd trainer && torchrun --nproc_per_node 2 train_grpo.py --hidden_size 640 --num_hidden_layers 12 --use_moe 1 \
        --headwise_attn_output_gate 1 --data_path ../dataset/sft_mini_512.jsonl \
        --reward_model_path /path/to/internlm2-1_8b-reward --num_generations 1 --max_gen_len 128 --reasoning 0
    python trainer/train_grpo.py --data_path dataset/demo/rlaif.jsonl --hidden_size 64 --num_hidden_layers 2 \
        --reasoning 0 --max_gen_len 24 --num_generations 4 --device cpu     # demo prompts, rule-based reward

Data: RLAIF/SFT-format JSONL; the prompt is every message but the last, the last message is the reference answer
(used by the checkable reward when it is a number). Starts from out/reason_* (--reasoning 1) or out/full_sft_*
(--reasoning 0), writes out/grpo_{hidden}{_moe}.pth.

Objective (DeepSeekMath GRPO, single update per batch, so the importance ratio is exactly 1):
    A_i = (r_i - mean_g r) / (std_g r + 1e-4)         within each prompt's group of G samples, population std;
                                                     no second normalisation over the batch (reference §7 item 30)
    per token: -(exp(logp - sg(logp)) * A_i - beta * k3(pi, ref)),  k3 = exp(ref - logp) - (ref - logp) - 1
    loss = mean over completions of the masked mean over each completion's tokens (+ MoE aux loss)
With --num_generations 1 every advantage is 0 (a group of one has no spread): only the KL term remains.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dataset.lm_dataset import RLAIFDataset, collate_rl  # noqa: E402
from trainer.rl_utils import (RewardScorer, add_rl_args, check_rl_args, frozen_copy, policy_kl_loss,  # noqa: E402
                              rl_from_weight, rl_metrics, sample_score_logprobs)
from trainer.trainer_utils import (Logger, TrainLoop, UserError, build_optimizer, build_parser,  # noqa: E402
                                   init_model, init_run, model_config_from_args, parse_args, run_main)

ADV_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(r - group mean) / (group population std + 1e-4); rows i*G .. i*G+G-1 form prompt i's group."""
    groups = rewards.view(-1, num_generations)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + ADV_EPS)).view(-1)


def main():
    parser = build_parser("MiniMind GRPO", save_weight="grpo", epochs=1, batch_size=2, learning_rate=8e-8,
                          accumulation_steps=1, log_interval=1, save_interval=10, max_seq_len=66,
                          data_path="dataset/rlaif-mini.jsonl", from_weight="auto", wandb_project="MiniMind-GRPO")
    add_rl_args(parser)
    parser.add_argument("--num_generations", type=int, default=8,
                        help="每个 prompt 的采样数 G / completions per prompt (the group; GRPO paper: 64, "
                             "MiniMind 8); 1 makes every advantage 0")
    args = parse_args(parser)
    check_rl_args(args)
    if args.num_generations < 1:
        raise UserError(f"--num_generations {args.num_generations} must be >= 1")
    ctx = init_run(args)
    if args.num_generations == 1:
        Logger("note: --num_generations 1: a group of one has no spread, so every advantage is 0 and only the "
               "KL-to-reference term trains; use >= 2 for a policy-gradient signal")

    # ---------------------------------------------------------------- policy, reference, data, rewards
    config = model_config_from_args(args)
    model, tokenizer = init_model(config, rl_from_weight(args), args.tokenizer_path, args.save_dir, ctx.device)
    ref_model = frozen_copy(model)
    dataset = RLAIFDataset(args.data_path, tokenizer, max_length=args.max_seq_len)
    scorer = RewardScorer(args, tokenizer, ctx.device)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, ctx.device)
    loop = TrainLoop(args, ctx, model=model, optimizer=optimizer, dataset=dataset, collate_fn=collate_rl,
                     config=config, stage="GRPO", tokenizer=tokenizer,
                     run_name=f"MiniMind-GRPO-Epoch-{args.epochs}-BS-{args.batch_size}-LR-{args.learning_rate}")

    # ---------------------------------------------------------------- train
    for batch in loop:
        b = sample_score_logprobs(loop, ref_model, tokenizer, scorer, batch, args, ctx, args.num_generations)
        advantages = group_advantages(b.rewards, args.num_generations)
        policy_loss, kl = policy_kl_loss(b.logps, b.ref_logps, advantages, b.rollout.completion_mask, args.beta)
        loop.backward(policy_loss + b.aux_loss, num_tokens=b.rollout.num_tokens,
                      **rl_metrics(b, advantages, policy_loss, kl))
    loop.finish()


if __name__ == "__main__":
    run_main(main)
