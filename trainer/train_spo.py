"""SPO (Single-stream Policy Optimization, arXiv 2509.13232): one sample per prompt, baseline from a tracker.

    cd trainer && torchrun --nproc_per_node 2 train_spo.py --hidden_size 640 --num_hidden_layers 12 --use_moe 1 \
        --headwise_attn_output_gate 1 --use_wandb
    python trainer/train_spo.py --data_path dataset/demo/rlaif.jsonl --hidden_size 64 --num_hidden_layers 2 \
        --reasoning 0 --max_gen_len 24 --device cpu                          # demo prompts, rule-based reward

Data and weights as train_grpo.py; writes out/spo_{hidden}{_moe}.pth.

Instead of a group of samples, the baseline comes from `AutoAdaptiveValueTracker`: a Beta(alpha, beta) estimate of
the success rate p, updated with each micro-batch's mean normalised reward and discounted by rho (adaptive: the
more the policy moved since the last update, the faster the old evidence fades). Advantage of a sample:
    A = r - (lo + p_hat * (hi - lo)),    p_hat = alpha / (alpha + beta) taken BEFORE this batch's update,
where [lo, hi] is the scorer's actual reward range, so the normalised reward (r - lo)/(hi - lo) that updates the
tracker stays in [0, 1] (the reference divided by a fixed 3 and could exceed 1: §7 item 31). |A| <= hi - lo, so no
clipping is needed. The loss is GRPO's family (trainer/rl_objectives.py: --loss_type, --epsilon, --epsilon_high,
--importance_sampling_level, --mask_truncated_completions), with the k3 KL (--beta; 0 builds no reference model).
A rollout batch is --batch_size x --accumulation_steps prompts, one sample each, generated in one call; it takes
--num_iterations x mini-batch (--mini_batch_size) optimizer steps against the rollout's log-probs (pi_old). The
tracker is updated once per rollout batch, after its advantages were taken.

The baseline is one global value (the reference's simplification), not the paper's per-prompt tracker: with
datasets of mixed difficulty it is a coarser baseline. Its state is all-reduced across ranks (identical everywhere)
and saved in the resume file, so --from_resume 1 continues it.
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dataset.lm_dataset import collate_rl  # noqa: E402
from trainer.answer_eval import PeriodicEval, add_eval_args  # noqa: E402
from trainer.rl_utils import (RewardScorer, add_policy_args, add_rl_args, check_policy_args,  # noqa: E402
                              check_reward_source, check_rl_args, describe_objective,
                              load_rl_dataset, masked_mean, policy_updates, reference_policy, rl_from_weight,
                              rl_metrics, sample_and_score)
from trainer.trainer_utils import (Logger, RolloutUpdates, TrainLoop, UserError, build_optimizer,  # noqa: E402
                                   build_parser, init_model, init_run, model_config_from_args, parse_args, run_main)


class AutoAdaptiveValueTracker:
    """Global Beta-distribution baseline of SPO with an adaptive forgetting factor rho.

    Start: N0 = 1 / (1 - clip_lower), alpha = beta = N0 / 2 (p_hat = 0.5). Per micro-batch, with r~ the batch mean of
    the rewards normalised to [0, 1] by reward_range and m the masked mean per-token log-prob of the batch:
        rho = rho_const                                  (rho_mode 'constant', and the first update in 'kl' mode)
        rho = clip(2 ** (-|m_prev - m| / D_half), clip_lower, clip_upper)                       (rho_mode 'kl')
        alpha <- rho * alpha + r~,   beta <- rho * beta + (1 - r~),   m_prev <- m
    |m_prev - m| is the reference's cheap stand-in for the KL between the previous and the current policy: the
    change of the mean log-prob of consecutive batches (it also moves when the prompts differ, not only the policy).
    """

    def __init__(self, reward_range: tuple[float, float], rho_mode: str = "kl", rho_const: float = 0.9,
                 D_half: float = 0.06, clip_lower: float = 0.5, clip_upper: float = 0.96):
        lo, hi = reward_range
        if not hi > lo:
            raise ValueError(f"reward_range {reward_range} must have hi > lo")
        if rho_mode not in ("kl", "constant"):
            raise ValueError(f"rho_mode {rho_mode!r} must be 'kl' or 'constant'")
        self.lo, self.hi = float(lo), float(hi)
        self.rho_mode, self.rho_const, self.D_half = rho_mode, rho_const, D_half
        self.clip_lower, self.clip_upper = clip_lower, clip_upper
        n0 = 1.0 / (1.0 - clip_lower)
        self.alpha = self.beta = 0.5 * n0
        self.prev_logp = None
        self.rho = rho_const

    def baseline(self) -> float:
        """p_hat in [0, 1]."""
        return self.alpha / (self.alpha + self.beta)

    def baseline_reward(self) -> float:
        """p_hat mapped back to the reward scale."""
        return self.lo + self.baseline() * (self.hi - self.lo)

    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        return ((rewards.float() - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)

    def compute_rho(self, mean_logp: float) -> float:
        if self.rho_mode == "constant" or self.prev_logp is None:
            return self.rho_const
        rho = 2.0 ** (-abs(self.prev_logp - mean_logp) / self.D_half)
        return min(max(rho, self.clip_lower), self.clip_upper)

    @torch.no_grad()
    def update(self, rewards: torch.Tensor, logps: torch.Tensor, mask: torch.Tensor) -> float:
        """One update from a micro-batch (pooled over all ranks, so every rank holds the same state). Returns rho."""
        stats = torch.stack([self.normalize(rewards).sum(), torch.tensor(float(rewards.numel()), device=rewards.device),
                             (logps.detach().float() * mask).sum(), mask.sum().float()]).double()
        if dist.is_initialized():
            dist.all_reduce(stats)
        r_mean, mean_logp = (stats[0] / stats[1]).item(), (stats[2] / stats[3].clamp(min=1)).item()
        self.rho = self.compute_rho(mean_logp)
        self.prev_logp = mean_logp
        self.alpha = self.rho * self.alpha + r_mean
        self.beta = self.rho * self.beta + (1.0 - r_mean)
        return self.rho

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "prev_logp": self.prev_logp, "rho": self.rho,
                "reward_range": [self.lo, self.hi]}

    def load_state_dict(self, state: dict) -> None:
        if [float(v) for v in state["reward_range"]] != [self.lo, self.hi]:
            raise UserError(f"the resume file's SPO tracker used reward range {state['reward_range']}, this run's is "
                            f"[{self.lo}, {self.hi}] (different --reasoning/--reward_model_path/--answer_reward); "
                            "use the same reward flags or --from_resume 0")
        self.alpha, self.beta, self.prev_logp, self.rho = state["alpha"], state["beta"], state["prev_logp"], \
            state["rho"]


def main():
    # rollouts are not batches of the supervised collates: no --pack / --group_by_length
    parser = build_parser("MiniMind SPO", skip=("pack", "group_by_length"), save_weight="spo", epochs=1, batch_size=2,
                          learning_rate=1e-7,
                          accumulation_steps=4, log_interval=1, save_interval=10, max_seq_len=66,
                          data_path="dataset/rlaif-mini.jsonl", from_weight="auto", wandb_project="MiniMind-SPO")
    add_rl_args(parser)
    add_policy_args(parser)
    add_eval_args(parser)
    parser.add_argument("--rho_mode", type=str, default="kl", choices=["kl", "constant"],
                        help="基线遗忘因子 rho: kl=按策略变化自适应, constant=固定 / forgetting factor of the baseline")
    parser.add_argument("--rho_const", type=float, default=0.9, help="constant 模式 (及首步) 的 rho / rho when constant")
    parser.add_argument("--D_half", type=float, default=0.06,
                        help="rho 减半所需的策略变化 / policy change that halves rho (SPO paper: 0.06)")
    parser.add_argument("--clip_lower", type=float, default=0.5, help="rho 下界 / lower bound of rho (also sets N0)")
    parser.add_argument("--clip_upper", type=float, default=0.96, help="rho 上界 / upper bound of rho")
    args = parse_args(parser)
    check_rl_args(args)
    check_policy_args(args)
    if not 0 < args.clip_lower <= args.clip_upper < 1 or not 0 < args.rho_const < 1 or not args.D_half > 0 \
            or not math.isfinite(args.D_half):
        raise UserError("need 0 < --clip_lower <= --clip_upper < 1, 0 < --rho_const < 1 and --D_half > 0")
    ctx = init_run(args)

    # ---------------------------------------------------------------- policy, reference, data, rewards, tracker
    config = model_config_from_args(args)
    model, tokenizer = init_model(config, rl_from_weight(args), args.tokenizer_path, args.save_dir, ctx.device)
    ref_model = reference_policy(model, args.beta)
    dataset = load_rl_dataset(args, tokenizer)
    scorer = RewardScorer(args, tokenizer, ctx.device)
    check_reward_source(scorer, dataset, args.data_path)
    tracker = AutoAdaptiveValueTracker(scorer.reward_range, args.rho_mode, args.rho_const, args.D_half,
                                       args.clip_lower, args.clip_upper)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, ctx.device, args.optimizer)
    loop = TrainLoop(args, ctx, model=model, optimizer=optimizer, dataset=dataset, collate_fn=collate_rl,
                     config=config, stage="SPO", tokenizer=tokenizer, resume_objects={"tracker": tracker},
                     evaluate=PeriodicEval(args, tokenizer, ctx, model),
                     rollout=RolloutUpdates(args.num_iterations, args.mini_batch_size, 1),
                     run_name=f"MiniMind-SPO-Epoch-{args.epochs}-BS-{args.batch_size}-LR-{args.learning_rate}")
    Logger(describe_objective(args))

    # ---------------------------------------------------------------- train
    for batch in loop:
        b = sample_and_score(loop.raw_model, tokenizer, scorer, batch["prompt"], batch["answer"], args, ctx, 1)
        baseline = tracker.baseline()
        advantages = b.rewards - tracker.baseline_reward()
        metrics = dict(rl_metrics(b), baseline=baseline, advantage_mean=advantages.mean(),
                       advantage_std=advantages.std(unbiased=False) if advantages.numel() > 1 else 0.0)
        logp = policy_updates(loop, b.rollout, advantages, args, ctx, ref_model=ref_model, metrics=metrics)
        # the tracker's policy-change signal: the rollout policy's mean log-prob (no extra forward)
        mask = b.rollout.completion_mask
        rho = tracker.update(b.rewards, logp, mask)
        loop.log_metrics(rho=rho, batch_mean_logp=masked_mean(logp, mask))
    loop.finish()


if __name__ == "__main__":
    run_main(main)
