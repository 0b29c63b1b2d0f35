"""PPO with a critic (RLAIF): clipped per-token policy objective, token-level advantages, k3 KL to a frozen reference.

    cd trainer && torchrun --nproc_per_node 2 train_ppo.py --hidden_size 640 --num_hidden_layers 12 --use_moe 1 \
        --headwise_attn_output_gate 1 --use_wandb
    python trainer/train_ppo.py --data_path dataset/demo/rlaif.jsonl --hidden_size 64 --num_hidden_layers 2 \
        --reasoning 0 --max_gen_len 24 --learning_rate 1e-5 --critic_learning_rate 1e-4 --device cpu

Data: RLAIF JSONL in SFT format (MiniMind's rlaif-mini.jsonl): every message but the last is the prompt, the last
one is a reference answer (scored by the rule-based reward when it is a number, e.g. the demo arithmetic). Starts
from out/reason_* (--reasoning 1) or out/full_sft_* (--reasoning 0) unless --from_weight names another weight;
writes out/ppo_actor_{hidden}{_moe}.pth. The critic lives only in the resume file (checkpoints/).

Four models:
    actor      pi_theta, trained (DDP).
    old actor  pi_old, the behaviour policy: it samples every rollout and gives old_logp. A frozen copy of the actor,
               refreshed at the start and every --update_old_actor_freq optimizer steps (and restored on resume),
               so the ratio pi_theta / pi_old always compares against the policy that produced the data.
    reference  pi_ref, the frozen starting policy; the KL term keeps the actor near it.
    critic     V_phi: the actor's trunk (a copy of its initial weights; the trunk's final norm is applied once) and a
               zero-initialised Linear(hidden, 1) value head, so V starts at 0 rather than at noise. Trained (DDP).

Per step, over the completion tokens t of each sampled response (mask: up to and including EOS):
    reward      R from rl_utils.RewardScorer (format/tag, checkable answer, reward model), paid at the last token.
    values      V_t = V_phi at the position that predicts token t (the state in which t is chosen).
    advantage   GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t with V = 0 after the last token,
                A_t = sum_k (gamma lam)^k delta_{t+k}, returns G_t = A_t + V_t. Defaults gamma = lam = 1, i.e.
                A_t = R - V_t: the reward minus a per-token learned baseline, unbiased however poor the critic is
                (at the default critic lr of 8e-8 it stays near 0 for a long time; lam < 1 would then hand the
                early tokens of a long reply almost no credit). A is then centred over the batch's completion
                tokens (a batch baseline on top of the critic) but not divided by its std, see `center`.
    policy      ratio_t = exp(logp_t - old_logp_t) per token (never a product over the sequence, which overflows);
                L_pi = masked mean of max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps)).
    value       L_V = masked mean of (V_t - G_t)^2. No value clipping: each rollout is used for one update, so
                the clipping anchor (the values before the update) would equal the current values.
    KL          L_KL = masked mean of k3 = exp(ref - logp) - (ref - logp) - 1 (an estimator of KL(pi || ref)),
                added to the loss with gradient (not subtracted from the reward).
    loss        L_pi + vf_coef L_V + kl_coef L_KL (+ the MoE aux losses of actor and critic).
Masked means run over all completion tokens of the micro-batch. Log-probs of actor, old actor and reference come
from rl_utils.completion_logprobs under the same autocast and score the sampling distribution softmax(logits / T)
(T = --temperature), so with equal weights the ratio is exactly 1 and the KL exactly 0. Forwards per micro-step:
actor (with grad), reference, critic, and the old actor only when it differs from the actor: in the optimizer step
where it was just synced the actor's own log-probs are reused (bit-identical, with dropout 0), which saves one
forward in every --update_old_actor_freq steps (all of them at 1).
"""
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from dataset.lm_dataset import collate_rl
from trainer.rl_utils import (RewardScorer, add_rl_args, check_reward_source, check_rl_args, completion_logprobs,
                              frozen_copy, k3_kl, load_rl_dataset, masked_mean, rl_from_weight, rollout)
from trainer.trainer_utils import (Logger, TrainLoop, UserError, build_optimizer, build_parser, full_state_dict,
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
               vf_coef: float, kl_coef: float):
    """PPO loss on per-token tensors [N, R] (see the module docstring); returns (loss, detached stats).

    logp and values carry gradients; old_logp, ref_logp, advantages and returns are constants.
    clip_frac is the fraction of completion tokens whose clipped term is active (their policy gradient is zero).
    """
    # exp(20) is far outside any sane clip range; the clamp only keeps a wild ratio from becoming inf (inf*0 = NaN)
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_epsilon, 1.0 + clip_epsilon)
    policy_loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    value_loss = masked_mean((values - returns) ** 2, mask)
    kl_ref = masked_mean(k3_kl(logp, ref_logp), mask)
    loss = policy_loss + vf_coef * value_loss + kl_coef * kl_ref
    with torch.no_grad():
        stats = dict(policy_loss=policy_loss.detach(), value_loss=value_loss.detach(), kl_ref=kl_ref.detach(),
                     approx_kl=masked_mean(k3_kl(logp.detach(), old_logp), mask),
                     clip_frac=masked_mean((clipped > unclipped).float(), mask),
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
    parser.add_argument("--kl_coef", type=float, default=None,
                        help="PPO 名称下的 --beta (MiniMind 0.02) / the reference PPO's name for --beta, the k3 "
                             "KL-to-reference coefficient; given, it wins over --beta")
    parser.add_argument("--critic_learning_rate", type=float, default=8e-8,
                        help="critic 峰值学习率 / critic peak learning rate (cosine to 0.1x, like the actor's)")
    parser.add_argument("--clip_epsilon", type=float, default=0.1,
                        help="PPO 比率裁剪 / PPO ratio clip epsilon (Schulman et al. 2017 used 0.1-0.2)")
    parser.add_argument("--vf_coef", type=float, default=0.5, help="value loss 系数 / value loss coefficient")
    parser.add_argument("--update_old_actor_freq", type=int, default=4,
                        help="每 N 个优化步把 actor 复制给采样用的 old actor / copy the actor into the rollout "
                             "(behaviour) policy every N optimizer steps; 1 = fully on-policy")
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
    if args.update_old_actor_freq < 1:
        raise UserError(f"--update_old_actor_freq {args.update_old_actor_freq} must be >= 1")
    args.from_weight = rl_from_weight(args)
    ctx = init_run(args)

    # ---------------------------------------------------------------- models and data
    config = model_config_from_args(args)
    actor, tokenizer = init_model(config, args.from_weight, args.tokenizer_path, args.save_dir, ctx.device)
    old_actor, ref_model = frozen_copy(actor), frozen_copy(actor)  # before TrainLoop may load a resume file
    critic = CriticModel(copy.deepcopy(actor.model)).to(ctx.device)
    dataset = load_rl_dataset(args, tokenizer)
    scorer = RewardScorer(args, tokenizer, ctx.device, reward_model=reward_model)
    check_reward_source(scorer, dataset, args.data_path)
    actor_opt = build_optimizer(actor, args.learning_rate, args.weight_decay, ctx.device)
    critic_opt = build_optimizer(critic, args.critic_learning_rate, args.weight_decay, ctx.device)
    loop = TrainLoop(args, ctx, model=actor, optimizer={"actor": actor_opt, "critic": critic_opt}, dataset=dataset,
                     collate_fn=collate_rl, config=config, stage="PPO", tokenizer=tokenizer,
                     resume_objects={"critic": critic, "old_actor": old_actor},
                     run_name=f"MiniMind-PPO-Epoch-{args.epochs}-BS-{args.batch_size}-LR-{args.learning_rate}")
    critic_model = loop.wrap(critic)
    Logger(f"PPO from {args.from_weight}: actor lr {args.learning_rate}, critic lr {args.critic_learning_rate}, "
           f"old actor synced every {args.update_old_actor_freq} optimizer steps")

    # ---------------------------------------------------------------- train
    synced_at = None  # a resumed run keeps the restored old actor until the next sync point
    deterministic = config.dropout == 0  # train-mode forward == eval-mode forward (MoE routing is mode-free)
    for batch in loop:
        if loop.opt_step % args.update_old_actor_freq == 0 and synced_at != loop.opt_step:
            old_actor.load_state_dict(full_state_dict(actor))  # --fsdp 1: gathers the shards
            synced_at = loop.opt_step
        old_is_actor = deterministic and synced_at == loop.opt_step
        # sampling depends only on (seed, rank, step), so a resumed run draws the same rollouts
        torch.manual_seed(args.seed + 100_003 * loop.global_step + ctx.rank)

        # rollout by the behaviour policy, then rewards (before any training forward holds activations)
        with ctx.autocast():
            ro = rollout(old_actor, tokenizer, batch["prompt"], max_new_tokens=args.max_gen_len,
                         max_prompt_len=args.max_seq_len, temperature=args.temperature)
        rewards, reward_stats = scorer(ro.prompts, ro.completions, batch["answer"])
        mask = ro.completion_mask

        # one function, one precision for all three policies: equal weights give ratio 1 and KL 0 exactly
        T = args.temperature
        with ctx.autocast():
            logp, actor_aux = completion_logprobs(loop.model, ro, temperature=T)
            with torch.no_grad():
                ref_logp, _ = completion_logprobs(ref_model, ro, temperature=T)
                # right after a sync (and for the rest of that optimizer step) the old actor IS the actor: its
                # forward would repeat the actor's number for number, so reuse it (every step with
                # --update_old_actor_freq 1, one in N otherwise)
                old_logp = logp.detach() if old_is_actor else completion_logprobs(old_actor, ro, temperature=T)[0]
            values, critic_aux = critic_model(ro.input_ids, ro.attention_mask, ro.prompt_len)

        with torch.no_grad():
            advantages, returns = gae(values.detach(), rewards, mask, args.gamma, args.lam)
            adv_mean = masked_mean(advantages, mask)
            adv_std = masked_mean((advantages - adv_mean) ** 2, mask).sqrt()
            advantages = center(advantages, mask)
        loss, stats = ppo_losses(logp, old_logp, ref_logp, advantages, values, returns,
                                 mask, clip_epsilon=args.clip_epsilon, vf_coef=args.vf_coef, kl_coef=args.kl_coef)
        aux_loss = actor_aux + critic_aux
        loop.backward(loss + aux_loss, num_tokens=ro.num_tokens, **stats, aux_loss=aux_loss,
                      reward=rewards.mean(), reward_std=rewards.std(unbiased=False), **reward_stats,
                      advantage_mean=adv_mean, advantage_std=adv_std, value_mean=masked_mean(values.detach(), mask),
                      return_mean=masked_mean(returns, mask), completion_len=mask.sum(dim=1).mean())
    loop.finish()


if __name__ == "__main__":
    run_main(main)
