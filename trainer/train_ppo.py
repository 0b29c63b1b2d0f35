"""PPO with a critic (RLAIF): clipped per-token policy objective, token-level advantages, k3 KL to a frozen reference.

    cd trainer && torchrun --nproc_per_node 2 train_ppo.py --hidden_size 640 --num_hidden_layers 12 --use_moe 1 \
        --headwise_attn_output_gate 1 --use_wandb
    python trainer/train_ppo.py --data_path dataset/demo/rlaif.jsonl --hidden_size 64 --num_hidden_layers 2 \
        --reasoning 0 --max_gen_len 24 --learning_rate 1e-5 --critic_learning_rate 1e-4 --device cpu

Data: RLAIF JSONL in SFT format (MiniMind's rlaif-mini.jsonl): every message but the last is the prompt, the last
one is a reference answer (scored by the rule-based reward when it is a number, e.g. the demo arithmetic). Starts
from out/reason_* (--reasoning 1) or out/full_sft_* (--reasoning 0) unless --from_weight names another weight;
writes out/ppo_actor_{hidden}{_moe}.pth. The critic lives only in the resume file (checkpoints/).

Models:
    actor      pi_theta, trained (DDP). It samples every rollout (--update_old_actor_freq 1, the default).
    old actor  only with --update_old_actor_freq N > 1: a frozen copy of the actor that samples the rollouts, synced
               every N optimizer steps (at the rollout boundary where a multiple of N is passed) and restored on
               resume, so the behaviour policy may lag the actor. With 1 no copy is built (one model less).
    reference  pi_ref, the frozen starting policy; the KL term keeps the actor near it (none with --kl_coef 0).
    critic     V_phi: the actor's trunk (a copy of its initial weights; the trunk's final norm is applied once) and a
               zero-initialised Linear(hidden, 1) value head, so V starts at 0 rather than at noise. Trained (DDP).

A rollout batch (--batch_size x --accumulation_steps prompts, one generate call) is scored once, without gradient:
old_logp (pi_old: the behaviour policy's log-probs), ref_logp, and the critic's values V_old; then
--ppo_update_iters passes over it in mini-batches (--mini_batch_size) take one optimizer step each, ratios against
old_logp, values clipped around V_old; --early_stop_kl ends a batch's updates when the KL to pi_old passes it.
Per rollout, over the completion tokens t of each sampled response (mask: up to and including EOS):
    reward      R from rl_utils.RewardScorer (format/tag, checkable answer, reward model), paid at the last token.
    values      V_t = V_phi at the position that predicts token t (the state in which t is chosen).
    advantage   GAE (Schulman et al. 2016) on V_old: delta_t = r_t + gamma V_{t+1} - V_t with V = 0 after the last
                token, A_t = sum_k (gamma lam)^k delta_{t+k}, returns G_t = A_t + V_t. Defaults gamma = lam = 1,
                i.e. A_t = R - V_t: the reward minus a per-token learned baseline, unbiased however poor the critic
                is (at the default critic lr of 8e-8 it stays near 0 for a long time; lam < 1 would then hand the
                early tokens of a long reply almost no credit). A is then centred over the rollout's completion
                tokens (a batch baseline on top of the critic) but not divided by its std, see `center`.
Per update, on a mini-batch:
    policy      ratio_t = exp(logp_t - old_logp_t) per token (never a product over the sequence, which overflows);
                L_pi = masked mean of max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps)) (rl_objectives).
    value       L_V = masked mean of max((V_t - G_t)^2, (V_old + clip(V_t - V_old, +-c) - G_t)^2), c =
                --cliprange_value (0: unclipped); at the first update V = V_old, so the clip only acts later.
    KL          L_KL = masked mean of k3 = exp(ref - logp) - (ref - logp) - 1 (an estimator of KL(pi || ref)),
                added to the loss with gradient (not subtracted from the reward).
    loss        L_pi + vf_coef L_V + kl_coef L_KL (+ the MoE aux losses of actor and critic).
Masked means run over all completion tokens of the mini-batch on every rank. Log-probs of actor, old actor and
reference come from rl_utils.completion_logprobs under the same autocast, in the same row chunks, and score the
sampling distribution softmax(logits / T) (T = --temperature), so with equal weights the ratio is exactly 1 and the
KL exactly 0. With one optimizer step per rollout and the actor as behaviour policy, old_logp is the update's own
log-probs (detached): no extra forward.
"""
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from dataset.lm_dataset import collate_rl
from trainer.answer_eval import PeriodicEval, add_eval_args
from trainer.rl_objectives import clipped_surrogate, log_importance_weights
from trainer.rl_utils import (RewardScorer, add_rl_args, check_reward_source, check_rl_args, completion_logprobs,
                              frozen_copy, frozen_logprobs, k3_kl, load_rl_dataset, masked_mean, reference_policy,
                              rl_from_weight, rl_metrics, rollout_forward, sample_and_score)
from trainer.trainer_utils import (Logger, RolloutUpdates, TrainLoop, UserError, build_optimizer, build_parser,
                                   full_state_dict,
                                   init_model, init_run, model_config_from_args, parse_args, run_main)


class CriticModel(nn.Module):
    """V(s) for every completion token: the policy trunk (MiniMindModel, whose output is already final-normed) and a
    Linear(hidden, 1) value head."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.model = trunk
        self.value_head = nn.Linear(trunk.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, prompt_len: int):
        """Values [N, R] in fp32 for the R completion tokens (the state before each token), and the MoE aux loss."""
        out = self.model(input_ids, attention_mask=attention_mask)
        # position p's hidden state has seen tokens <= p: the state in which token p+1 is chosen
        h = out.last_hidden_state[:, prompt_len - 1:-1]
        return self.value_head(h).squeeze(-1).float(), out.aux_loss


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation for one scalar reward per sequence, paid at its last completion token.

    values, mask [N, R] (mask a prefix of ones); rewards [N]. Returns (advantages, returns), both [N, R] and 0 on
    masked positions. The episode ends after the last real token (bootstrap value 0).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    token_rewards = torch.zeros_like(values)
    token_rewards.scatter_(1, last[:, None], (rewards.to(values.dtype) * (mask.sum(dim=1) > 0))[:, None])
    advantages = torch.zeros_like(values)
    running = values.new_zeros(values.shape[0])
    next_value = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def center(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x minus its mean over the masked entries; 0 elsewhere. Deliberately not divided by the batch std: with two
    sequences per batch, a tie in reward leaves only the critic's per-token noise in A, which a division by its own
    std would blow up to unit scale."""
    return (x - masked_mean(x, mask)) * mask


def ppo_losses(logp, old_logp, ref_logp, advantages, values, returns, mask, *, clip_epsilon: float,
               vf_coef: float, kl_coef: float, old_values=None, cliprange_value: float = 0.0):
    """PPO loss on per-token tensors [N, R] (see the module docstring); returns (loss, detached stats).

    logp and values carry gradients; old_logp, ref_logp (None: no KL term), advantages, returns and old_values (the
    rollout's values, the anchor of value clipping) are constants. clip_frac is the fraction of completion tokens
    whose clipped term is active (their policy gradient is zero), split into clip_ratio_low / clip_ratio_high;
    value_clip_frac the fraction whose clipped value error was the larger one.
    """
    ratio = torch.exp(log_importance_weights(logp, old_logp, mask, "token"))
    per_token, low, high = clipped_surrogate(ratio, advantages, clip_epsilon, clip_epsilon)
    policy_loss = masked_mean(per_token, mask)
    err = (values - returns) ** 2
    value_clip = torch.zeros((), device=values.device)
    if cliprange_value > 0 and old_values is not None:
        clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
        clipped_err = (clipped_values - returns) ** 2
        value_clip = masked_mean((clipped_err > err).float(), mask)
        err = torch.maximum(err, clipped_err)
    value_loss = masked_mean(err, mask)
    kl_ref = masked_mean(k3_kl(logp, ref_logp), mask) if ref_logp is not None else torch.zeros((), device=logp.device)
    loss = policy_loss + vf_coef * value_loss + kl_coef * kl_ref
    with torch.no_grad():
        low_frac, high_frac = masked_mean(low.float(), mask), masked_mean(high.float(), mask)
        stats = dict(policy_loss=policy_loss.detach(), value_loss=value_loss.detach(), kl_ref=kl_ref.detach(),
                     approx_kl=masked_mean(k3_kl(logp.detach(), old_logp), mask), clip_frac=low_frac + high_frac,
                     clip_ratio_low=low_frac, clip_ratio_high=high_frac, value_clip_frac=value_clip,
                     ratio=masked_mean(ratio.detach(), mask))
    return loss, stats


def build_ppo_parser():
    # rollouts are not batches of the supervised collates: no --pack / --group_by_length
    parser = build_parser("MiniMind PPO (RLAIF)", skip=("pack", "group_by_length"), save_weight="ppo_actor", epochs=1,
                          batch_size=2,
                          learning_rate=8e-8, accumulation_steps=1, log_interval=1, save_interval=10,
                          max_seq_len=66, data_path="dataset/rlaif-mini.jsonl", from_weight="auto",
                          wandb_project="MiniMind-PPO")
    add_rl_args(parser)
    add_eval_args(parser)
    parser.add_argument("--kl_coef", type=float, default=None,
                        help="PPO 名称下的 --beta (MiniMind 0.02) / the reference PPO's name for --beta, the k3 "
                             "KL-to-reference coefficient; given, it wins over --beta")
    parser.add_argument("--critic_learning_rate", type=float, default=8e-8,
                        help="critic 峰值学习率 / critic peak learning rate (cosine to 0.1x, like the actor's)")
    parser.add_argument("--clip_epsilon", type=float, default=0.1,
                        help="PPO 比率裁剪 / PPO ratio clip epsilon (Schulman et al. 2017 used 0.1-0.2)")
    parser.add_argument("--vf_coef", type=float, default=0.5, help="value loss 系数 / value loss coefficient")
    parser.add_argument("--update_old_actor_freq", type=int, default=1,
                        help="每 N 个优化步把 actor 复制给采样用的 old actor / sample rollouts with a copy of the "
                             "actor synced every N optimizer steps (MiniMind 0.x: 4); 1 = the actor samples itself "
                             "and no copy is built (MiniMind 3, recommended)")
    parser.add_argument("--ppo_update_iters", type=int, default=1,
                        help="每批 rollout 的更新轮数 / PPO epochs: optimizer passes over each rollout batch "
                             "(Schulman et al. 2017: 3-10; MiniMind 3: 2). From the 2nd pass on the ratio to pi_old "
                             "differs from 1, clipping, value clipping and --early_stop_kl act")
    parser.add_argument("--cliprange_value", type=float, default=0.2,
                        help="value 裁剪 / clip the critic's values to V_old +- c in the value loss (PPO2 / MiniMind 3: "
                             "0.2); 0 = off. Acts from the 2nd update of a rollout batch on")
    parser.add_argument("--early_stop_kl", type=float, default=0.0,
                        help="KL 提前停止 / skip a rollout batch's remaining updates once the mean k3 KL to pi_old "
                             "passes this (MiniMind 3: 0.25; OpenAI baselines used ~1.5 x a 0.01 target); 0 = off")
    parser.add_argument("--gamma", type=float, default=1.0, help="GAE 折扣 / GAE discount (1.0: one final reward)")
    parser.add_argument("--lam", type=float, default=1.0,
                        help="GAE lambda (Schulman et al. 2016). 1.0 = reward minus a per-token value baseline, "
                             "unbiased whatever the critic; < 1 (e.g. 0.95) trusts the critic more, worth it only "
                             "once the critic has learned (raise --critic_learning_rate)")
    return parser


def main(argv=None, reward_model=None):
    """argv: flags (default sys.argv); reward_model: an object with get_score(tokenizer, chat) used instead of
    --reward_model_path (tests, custom scorers)."""
    parser = build_ppo_parser()
    args = parse_args(parser, argv)
    check_rl_args(args)
    args.kl_coef = args.beta = args.beta if args.kl_coef is None else args.kl_coef
    for flag in ("update_old_actor_freq", "ppo_update_iters"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)} must be >= 1")
    if args.cliprange_value < 0 or args.early_stop_kl < 0:
        raise UserError("--cliprange_value and --early_stop_kl must be >= 0 (0 = off)")
    args.from_weight = rl_from_weight(args)
    ctx = init_run(args)

    # ---------------------------------------------------------------- models and data
    config = model_config_from_args(args)
    actor, tokenizer = init_model(config, args.from_weight, args.tokenizer_path, args.save_dir, ctx.device)
    # before TrainLoop may load a resume file: the copies start as the initial weights
    old_actor = frozen_copy(actor) if args.update_old_actor_freq > 1 else None
    ref_model = reference_policy(actor, args.kl_coef)
    critic = CriticModel(copy.deepcopy(actor.model)).to(ctx.device)
    dataset = load_rl_dataset(args, tokenizer)
    scorer = RewardScorer(args, tokenizer, ctx.device, reward_model=reward_model)
    check_reward_source(scorer, dataset, args.data_path)
    actor_opt = build_optimizer(actor, args.learning_rate, args.weight_decay, ctx.device, args.optimizer)
    critic_opt = build_optimizer(critic, args.critic_learning_rate, args.weight_decay, ctx.device, args.optimizer)
    loop = TrainLoop(args, ctx, model=actor, optimizer={"actor": actor_opt, "critic": critic_opt}, dataset=dataset,
                     collate_fn=collate_rl, config=config, stage="PPO", tokenizer=tokenizer,
                     resume_objects={"critic": critic, **({"old_actor": old_actor} if old_actor is not None else {})},
                     evaluate=PeriodicEval(args, tokenizer, ctx, actor),
                     rollout=RolloutUpdates(args.ppo_update_iters, args.mini_batch_size, 1, "ppo_update_iters"),
                     run_name=f"MiniMind-PPO-Epoch-{args.epochs}-BS-{args.batch_size}-LR-{args.learning_rate}")
    critic_model = loop.wrap(critic)
    Logger(f"PPO from {args.from_weight}: actor lr {args.learning_rate}, critic lr {args.critic_learning_rate}, "
           + (f"old actor synced every {args.update_old_actor_freq} optimizer steps" if old_actor is not None
              else "the actor samples its own rollouts (no old-actor copy)")
           + f", clip {args.clip_epsilon:g}, value clip {args.cliprange_value:g}, KL early stop "
           + (f"{args.early_stop_kl:g}" if args.early_stop_kl else "off"))

    # ---------------------------------------------------------------- train
    synced_at = None  # a resumed run keeps the restored old actor until the next sync point
    deterministic = config.dropout == 0  # train-mode forward == eval-mode forward (MoE routing is mode-free)
    S, N_sync = loop.steps_per_rollout, args.update_old_actor_freq
    for batch in loop:
        # the old actor is synced at the first rollout boundary of each span of N optimizer steps (stateless, so a
        # resumed run syncs where the uninterrupted one did)
        if old_actor is not None and loop.opt_step % N_sync < S and synced_at != loop.opt_step:
            old_actor.load_state_dict(full_state_dict(actor))  # --fsdp 1: gathers the shards
            synced_at = loop.opt_step
        behaviour = old_actor if old_actor is not None else loop.raw_model
        behaviour_is_actor = old_actor is None or (deterministic and synced_at == loop.opt_step)

        # rollout and rewards, then everything the updates compare against, once, without gradient
        b = sample_and_score(behaviour, tokenizer, scorer, batch["prompt"], batch["answer"], args, ctx, 1)
        ro, rewards, mask = b.rollout, b.rewards, b.rollout.completion_mask
        chunks = loop.rollout_chunks(len(ro.completions))
        if behaviour_is_actor:
            # the actor's own log-probs; with one step per rollout the update's forward gives them (no extra one)
            old_logp = frozen_logprobs(loop.model, ro, chunks, args, ctx) if S > 1 else None
        else:
            old_logp = frozen_logprobs(old_actor, ro, chunks, args, ctx)
        ref_logp = frozen_logprobs(ref_model, ro, chunks, args, ctx) if ref_model is not None else None
        old_values = rollout_forward(lambda sub: critic_model(sub.input_ids, sub.attention_mask,
                                                              sub.prompt_len)[0], ro, chunks, ctx)
        advantages, returns = gae(old_values, rewards, mask, args.gamma, args.lam)
        adv_mean = masked_mean(advantages, mask)
        adv_std = masked_mean((advantages - adv_mean) ** 2, mask).sqrt()
        advantages = center(advantages, mask)

        def loss_fn(rows, iteration):
            sub = ro.select(rows)
            R, r = sub.completion_ids.shape[1], rows.to(mask.device)
            with ctx.autocast():
                logp, actor_aux = completion_logprobs(loop.model, sub, temperature=args.temperature)
                values, critic_aux = critic_model(sub.input_ids, sub.attention_mask, sub.prompt_len)
            loss, stats = ppo_losses(logp, old_logp[r, :R] if old_logp is not None else logp.detach(),
                                     ref_logp[r, :R] if ref_logp is not None else None, advantages[r, :R], values,
                                     returns[r, :R], mask[r, :R], clip_epsilon=args.clip_epsilon,
                                     vf_coef=args.vf_coef, kl_coef=args.kl_coef, old_values=old_values[r, :R],
                                     cliprange_value=args.cliprange_value)
            return loss, dict(stats, aux=actor_aux + critic_aux, num_tokens=sub.num_tokens)

        loop.update(loss_fn, len(ro.completions), row_units=mask.sum(dim=1), stop_kl=args.early_stop_kl,
                    metrics=dict(rl_metrics(b), advantage_mean=adv_mean, advantage_std=adv_std,
                                 value_mean=masked_mean(old_values, mask), return_mean=masked_mean(returns, mask)))
    loop.finish()


if __name__ == "__main__":
    run_main(main)
