"""GRPO: sample a group of completions per prompt, reward them, push up the better-than-group-average ones.

    cd trainer && torchrun --nproc_per_node 2 train_grpo.py --hidden_size 640 --num_hidden_layers 12 --use_moe 1 \
        --headwise_attn_output_gate 1 --data_path ../dataset/sft_mini_512.jsonl \
        --reward_model_path /path/to/internlm2-1_8b-reward --num_generations 1 --max_gen_len 128 --reasoning 0
    python trainer/train_grpo.py --data_path dataset/demo/rlaif.jsonl --hidden_size 64 --num_hidden_layers 2 \
        --reasoning 0 --max_gen_len 24 --num_generations 4 --device cpu     # demo prompts, rule-based reward

Data: RLAIF/SFT-format JSONL; the prompt is every message but the last, the last message is the reference answer
(used by the checkable reward when it is a number). Starts from out/reason_* (--reasoning 1) or out/full_sft_*
(--reasoning 0), writes out/grpo_{hidden}{_moe}.pth.

Objective (trainer/rl_objectives.py; --loss_type, default dapo):
    A_i = (r_i - mean_g r) / (std_g r + 1e-4)         within each prompt's group of G samples, population std
                                                     (--scale_rewards group; batch: the std of the whole rollout
                                                     batch on all ranks; none: no division, Dr. GRPO); no second
                                                     normalisation over the batch (reference §7 item 30)
    per token: -min(w A_i, clip(w, 1 - eps, 1 + eps_high) A_i) + beta k3(pi, ref),  w = pi / pi_old
    aggregated per --loss_type: grpo (per completion, then mean: the objective before --loss_type existed),
    dapo (over all tokens of the step), dr_grpo (/ completions x max_gen_len); cispo: -sg(min(w, 1 + eps_high))
    A_i log pi. The rollout batch (--batch_size x --accumulation_steps prompts x G, one batched generate) takes
    --num_iterations x mini-batch (--mini_batch_size) optimizer steps; pi_old is the rollout policy, so the first
    update has w = 1 and later ones clip. --beta 0 builds no reference model.

Groups whose G rewards are all equal have A = 0: they carry no signal (logged as frac_reward_zero_std).
--dynamic_sampling 1 (DAPO) replaces them with groups of further prompts drawn from the data (seeded by step and
rank, so a resumed run draws the same), at most DYNAMIC_ROUNDS extra generate calls per rollout batch; a batch
still short keeps some all-equal groups (logged: dynamic_rounds, dynamic_short).

"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dataset.lm_dataset import collate_rl  # noqa: E402
from trainer.answer_eval import PeriodicEval, add_eval_args  # noqa: E402
from trainer.rl_utils import (ADV_EPS, RewardScorer, RolloutBatch, add_policy_args, add_rl_args,  # noqa: E402
                              check_policy_args, check_reward_source, check_rl_args, concat_rollouts,
                              describe_objective, group_policy_updates, load_rl_dataset, reference_policy,
                              rl_from_weight, rl_metrics, sample_and_score, zero_std_groups)
# the group advantages moved to rl_utils (the agent stage shares them); tests call them here
from trainer.rl_utils import advantages_of, batch_advantages, group_advantages  # noqa: E402,F401
from trainer.trainer_utils import (Logger, RolloutUpdates, TrainLoop, UserError, build_optimizer,  # noqa: E402
                                   build_parser, init_model, init_run, model_config_from_args, parse_args, run_main)

DYNAMIC_ROUNDS = 3  # extra generate calls per rollout batch at most under --dynamic_sampling 1


def group_rows(groups: torch.Tensor, num_generations: int) -> torch.Tensor:
    return (groups[:, None] * num_generations + torch.arange(num_generations)).reshape(-1)


def take_rows(b: RolloutBatch, rows: torch.Tensor) -> RolloutBatch:
    return RolloutBatch(b.rollout.select(rows), b.rewards[rows.to(b.rewards.device)], b.reward_metrics,
                        [b.answers[i] for i in rows.tolist()])


def fill_informative_groups(b: RolloutBatch, loop, tokenizer, scorer, args, ctx) -> tuple[RolloutBatch, dict]:
    """DAPO's dynamic sampling: drop the all-equal groups and fill the batch with informative groups of further
    prompts (drawn from the data with a generator seeded by seed, micro-step and rank), one batched generate per
    round, at most DYNAMIC_ROUNDS rounds; a batch still short keeps the first dropped groups so every rank takes
    the same number of optimizer steps."""
    G = args.num_generations
    zero = zero_std_groups(b.rewards, G).cpu()
    need = int(zero.sum())
    if need == 0:
        return b, {"dynamic_rounds": 0.0, "dynamic_short": 0.0}
    parts = [take_rows(b, group_rows((~zero).nonzero().flatten(), G))] if need < len(zero) else []
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + 7_919 * loop.global_step + ctx.rank)
    rounds = 0
    while need > 0 and rounds < DYNAMIC_ROUNDS:
        rounds += 1
        items = [loop.dataset[i] for i in torch.randint(len(loop.dataset), (need,), generator=gen).tolist()]
        nb = sample_and_score(loop.raw_model, tokenizer, scorer, [it["prompt"] for it in items],
                              [it["answer"] for it in items], args, ctx, G)
        good = (~zero_std_groups(nb.rewards, G).cpu()).nonzero().flatten()[:need]
        if len(good):
            parts.append(take_rows(nb, group_rows(good, G)))
            need -= len(good)
    short = need
    if short:
        parts.append(take_rows(b, group_rows(zero.nonzero().flatten()[:short], G)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    merged = RolloutBatch(concat_rollouts([p.rollout for p in parts], pad), torch.cat([p.rewards for p in parts]),
                          b.reward_metrics, [a for p in parts for a in p.answers])
    return merged, {"dynamic_rounds": float(rounds), "dynamic_short": float(short)}


def main():
    # rollouts are not batches of the supervised collates: no --pack / --group_by_length
    parser = build_parser("MiniMind GRPO", skip=("pack", "group_by_length"), save_weight="grpo", epochs=1, batch_size=2,
                          learning_rate=8e-8,
                          accumulation_steps=1, log_interval=1, save_interval=10, max_seq_len=66,
                          data_path="dataset/rlaif-mini.jsonl", from_weight="auto", wandb_project="MiniMind-GRPO")
    add_rl_args(parser)
    add_policy_args(parser)
    add_eval_args(parser)
    parser.add_argument("--num_generations", type=int, default=8,
                        help="每个 prompt 的采样数 G / completions per prompt (the group; GRPO paper: 64, "
                             "MiniMind 8); 1 = no group: the batch on all ranks is the baseline")
    parser.add_argument("--scale_rewards", type=str, default="group", choices=["group", "batch", "none"],
                        help="优势的标准差归一化 / divide advantages by the group's reward std (GRPO; TRL default), "
                             "the whole batch's (batch), or not at all (none: Dr. GRPO's recommendation, no "
                             "difficulty bias)")
    parser.add_argument("--dynamic_sampling", type=int, default=0, choices=[0, 1],
                        help=f"动态采样 / DAPO's dynamic sampling: replace groups whose rewards are all equal by "
                             f"groups of further prompts (at most {DYNAMIC_ROUNDS} extra generate calls per rollout "
                             "batch); needs --num_generations >= 2")
    args = parse_args(parser)
    check_rl_args(args)
    check_policy_args(args)
    if args.num_generations < 1:
        raise UserError(f"--num_generations {args.num_generations} must be >= 1")
    if args.dynamic_sampling and args.num_generations < 2:
        raise UserError("--dynamic_sampling 1 drops groups whose rewards are all equal; a group of one always is: "
                        "use --num_generations >= 2")
    ctx = init_run(args)
    if args.num_generations == 1:
        n = args.batch_size * args.accumulation_steps * ctx.world_size
        if n < 2:
            raise UserError("--num_generations 1 uses the batch as the baseline and needs >= 2 completions per "
                            "step; raise --batch_size (or --num_generations)")
        Logger(f"note: --num_generations 1: a group of one has no baseline, so the batch is the baseline: "
               f"A = (r - mean) / (std + {ADV_EPS:g}) over the {n} completions of each step on all {ctx.world_size} "
               "rank(s) (batch_size x accumulation_steps x world_size); --num_generations >= 2 gives per-prompt "
               "groups")

    # ---------------------------------------------------------------- policy, reference, data, rewards
    config = model_config_from_args(args)
    model, tokenizer = init_model(config, rl_from_weight(args), args.tokenizer_path, args.save_dir, ctx.device)
    ref_model = reference_policy(model, args.beta)
    dataset = load_rl_dataset(args, tokenizer)
    scorer = RewardScorer(args, tokenizer, ctx.device)
    check_reward_source(scorer, dataset, args.data_path)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, ctx.device, args.optimizer)
    loop = TrainLoop(args, ctx, model=model, optimizer=optimizer, dataset=dataset, collate_fn=collate_rl,
                     config=config, stage="GRPO", tokenizer=tokenizer,
                     evaluate=PeriodicEval(args, tokenizer, ctx, model),
                     rollout=RolloutUpdates(args.num_iterations, args.mini_batch_size, args.num_generations),
                     run_name=f"MiniMind-GRPO-Epoch-{args.epochs}-BS-{args.batch_size}-LR-{args.learning_rate}")
    Logger(describe_objective(args) + f", rewards scaled by {args.scale_rewards} std"
           + (", dynamic sampling" if args.dynamic_sampling else ""))

    # ---------------------------------------------------------------- train
    G = args.num_generations
    for batch in loop:
        b = sample_and_score(loop.raw_model, tokenizer, scorer, batch["prompt"], batch["answer"], args, ctx, G)
        extra = {}
        if G > 1:
            extra["frac_reward_zero_std"] = zero_std_groups(b.rewards, G).float().mean()
        metrics = rl_metrics(b)  # of the data's prompts, before dynamic sampling picks groups
        if args.dynamic_sampling:
            b, filled = fill_informative_groups(b, loop, tokenizer, scorer, args, ctx)
            extra.update(filled)
        metrics.update(extra)
        group_policy_updates(loop, b, args, ctx, ref_model=ref_model, metrics=metrics)
    loop.finish()


if __name__ == "__main__":
    run_main(main)
