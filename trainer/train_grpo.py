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

--num_generations 1 (the seed command): a group of one has no baseline (its own mean: every A_i would be 0 and only
the KL term would train). The batch is the baseline instead:
    A_i = (r_i - mean_B r) / (std_B r + 1e-4)          over all batch_size x world_size completions of the micro-step
on every rank (one all-reduce of [count, sum, sum of squares] in fp64; `batch_advantages`). That is REINFORCE with a
batch-mean baseline, normalised: completions better than the batch's average are pushed up, worse ones down. It
needs >= 2 completions per step (the script refuses --batch_size 1 on one process); with prompts of mixed difficulty
it credits easy prompts more than per-prompt groups would, so G >= 2 stays the better choice when affordable.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dataset.lm_dataset import collate_rl  # noqa: E402
from trainer.rl_utils import (RewardScorer, add_rl_args, check_reward_source, check_rl_args,  # noqa: E402
                              frozen_copy, load_rl_dataset, policy_kl_loss, rl_from_weight, rl_metrics,
                              sample_score_logprobs)
from trainer.trainer_utils import (Logger, TrainLoop, UserError, build_optimizer, build_parser,  # noqa: E402
                                   init_model, init_run, model_config_from_args, parse_args, run_main)

ADV_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(r - group mean) / (group population std + 1e-4); rows i*G .. i*G+G-1 form prompt i's group."""
    groups = rewards.view(-1, num_generations)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + ADV_EPS)).view(-1)


def batch_advantages(rewards: torch.Tensor, all_reduce=None):
    """(r - batch mean) / (batch population std + 1e-4) over the completions of every rank: the baseline of a
    group of one (--num_generations 1). all_reduce: an in-place sum over ranks (default dist.all_reduce when a
    process group is up; none on one process). Returns (advantages, mean, std), mean and std as 0-dim tensors."""
    r = rewards.detach().double()
    stats = torch.stack([torch.ones_like(r).sum(), r.sum(), (r * r).sum()])
    if all_reduce is None and dist.is_initialized():
        all_reduce = dist.all_reduce
    if all_reduce is not None:
        all_reduce(stats)
    n, total, squares = stats.unbind()
    mean = total / n
    std = (squares / n - mean * mean).clamp(min=0).sqrt()
    return ((r - mean) / (std + ADV_EPS)).to(rewards.dtype), mean.float(), std.float()


def main():
    # rollouts are not batches of the supervised collates: no --pack / --group_by_length
    parser = build_parser("MiniMind GRPO", skip=("pack", "group_by_length"), save_weight="grpo", epochs=1, batch_size=2,
                          learning_rate=8e-8,
                          accumulation_steps=1, log_interval=1, save_interval=10, max_seq_len=66,
                          data_path="dataset/rlaif-mini.jsonl", from_weight="auto", wandb_project="MiniMind-GRPO")
    add_rl_args(parser)
    parser.add_argument("--num_generations", type=int, default=8,
                        help="每个 prompt 的采样数 G / completions per prompt (the group; GRPO paper: 64, "
                             "MiniMind 8); 1 = no group: the batch on all ranks is the baseline")
    args = parse_args(parser)
    check_rl_args(args)
    if args.num_generations < 1:
        raise UserError(f"--num_generations {args.num_generations} must be >= 1")
    ctx = init_run(args)
    if args.num_generations == 1:
        n = args.batch_size * ctx.world_size
        if n < 2:
            raise UserError("--num_generations 1 uses the batch as the baseline and needs >= 2 completions per "
                            "step; raise --batch_size (or --num_generations)")
        Logger(f"note: --num_generations 1: a group of one has no baseline, so the batch is the baseline: "
               f"A = (r - mean) / (std + {ADV_EPS:g}) over the {n} completions of each step on all {ctx.world_size} "
               "rank(s) (batch_size x world_size); --num_generations >= 2 gives per-prompt groups")

    # ---------------------------------------------------------------- policy, reference, data, rewards
    config = model_config_from_args(args)
    model, tokenizer = init_model(config, rl_from_weight(args), args.tokenizer_path, args.save_dir, ctx.device)
    ref_model = frozen_copy(model)
    dataset = load_rl_dataset(args, tokenizer)
    scorer = RewardScorer(args, tokenizer, ctx.device)
    check_reward_source(scorer, dataset, args.data_path)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, ctx.device)
    loop = TrainLoop(args, ctx, model=model, optimizer=optimizer, dataset=dataset, collate_fn=collate_rl,
                     config=config, stage="GRPO", tokenizer=tokenizer,
                     run_name=f"MiniMind-GRPO-Epoch-{args.epochs}-BS-{args.batch_size}-LR-{args.learning_rate}")

    # ---------------------------------------------------------------- train
    for batch in loop:
        b = sample_score_logprobs(loop, ref_model, tokenizer, scorer, batch, args, ctx, args.num_generations)
        extra = {}
        if args.num_generations == 1:
            advantages, extra["baseline"], extra["baseline_std"] = batch_advantages(b.rewards)
        else:
            advantages = group_advantages(b.rewards, args.num_generations)
        policy_loss, kl = policy_kl_loss(b.logps, b.ref_logps, advantages, b.rollout.completion_mask, args.beta)
        loop.backward(policy_loss + b.aux_loss, num_tokens=b.rollout.num_tokens,
                      **rl_metrics(b, advantages, policy_loss, kl), **extra)
    loop.finish()


if __name__ == "__main__":
    run_main(main)
