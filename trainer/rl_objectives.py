"""The policy objectives of the RL stages as small pure functions on per-token tensors [N, R] (N completions, R
completion positions, a 0/1 mask): GRPO, SPO and PPO (its policy term) call them, the agent stage will too.

    from trainer.rl_objectives import policy_objective, objective_units
    loss, stats = policy_objective(logp, old_logp, advantages, mask, loss_type="dapo", epsilon=0.2,
                                   epsilon_high=0.28, ref_logp=ref_logp, beta=0.02, max_gen_len=128)
    units = objective_units(mask, "dapo", 128)           # per row: what `loss` is a mean over (see below)

Test: python -m pytest tests/test_rl_objectives.py -q

Importance weight w of a token (its log is `log_importance_weights`):
    token     w_t = pi(y_t) / pi_old(y_t)                                   (PPO, GRPO, DAPO)
    sequence  w   = exp(mean_t log(pi(y_t) / pi_old(y_t))) for every token of the completion, gradient through every
              token's log-ratio (GSPO, Zheng et al. 2025: the length-normalised sequence ratio)
pi_old is the policy that sampled the rollout; with one optimizer step per rollout the caller passes
old_logp = logp.detach(), so w is 1 in value and its gradient is grad(logp) (REINFORCE).

Per-token loss (A: the advantage of the token's completion, or per token for PPO):
    clipped (grpo, dapo, dr_grpo)  -min(w A, clip(w, 1 - epsilon, 1 + epsilon_high) A): a token whose ratio left the
                                   trust region in the direction its advantage pushes gets no gradient
    cispo                          -sg(min(w, 1 + epsilon_high)) A log pi(y_t): the weight is clipped and detached,
                                   every token keeps a gradient (MiniMax-M1, CISPO)
    + beta k3(pi, ref), k3 = exp(ref - logp) - (ref - logp) - 1, when beta > 0.

Aggregation (what the loss is a mean over, `objective_units`; the training loop divides the sum over every
micro-batch and rank of an optimizer step by the total, so the split never changes the gradient):
    grpo     per completion the masked mean over its tokens, then the mean over completions (DeepSeekMath):
             unit = one completion
    dapo     the sum over all active tokens of the step / their count (DAPO, Yu et al. 2025): unit = one token
    dr_grpo  the sum over all tokens / (completions x max_gen_len), a constant per completion (Dr. GRPO, Liu et al.
             2025): unit = max_gen_len per completion
    cispo    like dapo
"""
from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "cispo")
IS_LEVELS = ("token", "sequence")
MAX_LOG_RATIO = 20.0  # exp(20) is far outside any clip range; the clamp only keeps a wild ratio from being inf


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(x*mask)/max(sum(mask), 1): an all-masked row gives 0, never NaN."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref) on samples from pi: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def default_epsilon_high(loss_type: str, epsilon: float) -> float:
    """--epsilon_high when not given: DAPO's clip-higher 0.28 for dapo, 4.0 (weight cap 5, ScaleRL / MiniMind's
    CISPO) for cispo, symmetric (= epsilon) for grpo and dr_grpo as in their papers."""
    return {"dapo": 0.28, "cispo": 4.0}.get(loss_type, epsilon)


def log_importance_weights(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                           level: str = "token") -> torch.Tensor:
    """log w: [N, R] per token, or [N, 1] per sequence (GSPO: the masked mean of the token log-ratios)."""
    log_ratio = (logp - old_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    if level == "token":
        return log_ratio
    if level == "sequence":
        return masked_mean(log_ratio, mask, dim=1)[:, None]
    raise ValueError(f"importance sampling level {level!r} must be one of {IS_LEVELS}")


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float):
    """PPO's clipped surrogate, per token: -min(w A, clip(w, 1 - eps, 1 + eps_high) A). ratio and advantages
    broadcast ([N, R] or [N, 1]). Returns (loss, low_clipped, high_clipped): the masks of the tokens whose clipped
    term is active (ratio below 1 - eps with A < 0, above 1 + eps_high with A > 0), which get no policy gradient."""
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        low = (ratio < 1.0 - epsilon) & (advantages < 0)
        high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
    return loss, low, high


def objective_units(mask: torch.Tensor, loss_type: str, max_gen_len: int) -> torch.Tensor:
    """[N] float: how many units each completion adds to the normaliser of `loss_type` (module docstring)."""
    if loss_type == "grpo":
        return torch.ones(mask.shape[0], dtype=torch.float64)
    if loss_type == "dr_grpo":
        return torch.full((mask.shape[0],), float(max_gen_len), dtype=torch.float64)
    if loss_type in ("dapo", "cispo"):
        return mask.detach().sum(dim=1).double().cpu()
    raise ValueError(f"loss_type {loss_type!r} must be one of {LOSS_TYPES}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_gen_len: int) -> torch.Tensor:
    """The loss of these rows as a mean over their units (objective_units)."""
    if loss_type == "grpo":
        return masked_mean(per_token, mask, dim=1).mean()
    total = (per_token * mask).sum()
    if loss_type == "dr_grpo":
        return total / (mask.shape[0] * max_gen_len)
    if loss_type in ("dapo", "cispo"):
        return total / mask.sum().clamp(min=1)
    raise ValueError(f"loss_type {loss_type!r} must be one of {LOSS_TYPES}")


def policy_objective(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                     loss_type: str = "dapo", importance_sampling_level: str = "token", epsilon: float = 0.2,
                     epsilon_high: float | None = None, ref_logp: torch.Tensor | None = None, beta: float = 0.0,
                     max_gen_len: int = 1):
    """The GRPO-family loss of a batch of completions (module docstring). logp [N, R] carries the gradient;
    old_logp and ref_logp [N, R] and advantages [N] (one per completion) or [N, R] are constants.

    Returns (loss, stats): loss is the mean over this batch's units (objective_units); stats (detached) hold
    policy_loss, kl (k3 to the reference, 0 without one), approx_kl (k3 to pi_old), clip_ratio_low and
    clip_ratio_high (fractions of active tokens whose update the clip stopped or, for cispo, whose weight was
    capped), ratio (mean importance weight)."""
    if epsilon_high is None:
        epsilon_high = default_epsilon_high(loss_type, epsilon)
    mask = mask.to(logp.dtype)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    log_w = log_importance_weights(logp, old_logp, mask, importance_sampling_level)
    w = torch.exp(log_w)
    if loss_type == "cispo":
        capped = w.clamp(max=1.0 + epsilon_high).detach()
        per_token = -capped * adv * logp
        low = torch.zeros_like(w, dtype=torch.bool)
        high = (w > 1.0 + epsilon_high).detach()
    elif loss_type in LOSS_TYPES:
        per_token, low, high = clipped_surrogate(w, adv, epsilon, epsilon_high)
    else:
        raise ValueError(f"loss_type {loss_type!r} must be one of {LOSS_TYPES}")
    policy_loss = aggregate(per_token.expand_as(logp), mask, loss_type, max_gen_len)
    loss = policy_loss
    kl = torch.zeros((), device=logp.device)
    if ref_logp is not None and beta != 0:
        per_kl = k3_kl(logp, ref_logp)
        loss = loss + beta * aggregate(per_kl, mask, loss_type, max_gen_len)
        kl = masked_mean(per_kl.detach(), mask, dim=1).mean()
    with torch.no_grad():
        stats = dict(policy_loss=policy_loss.detach(), kl=kl,
                     approx_kl=masked_mean(k3_kl(logp.detach(), old_logp), mask),
                     clip_ratio_low=masked_mean(low.expand_as(logp).to(mask.dtype), mask),
                     clip_ratio_high=masked_mean(high.expand_as(logp).to(mask.dtype), mask),
                     ratio=masked_mean(w.detach().expand_as(logp), mask))
    return loss, stats
