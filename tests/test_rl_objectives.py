"""The GRPO-family objectives (trainer/rl_objectives.py) against hand computations: each --loss_type's value and
gradient on a tiny tensor whose ratios leave the clip range (as from the 2nd update of a rollout batch), GSPO's
sequence-level ratio, CISPO's clipped detached weight, and `grpo` with pi_old = sg(pi) equal to the objective the
stages used before --loss_type existed.

    python -m pytest tests/test_rl_objectives.py -q
"""
import math

import pytest
import torch

from trainer.rl_objectives import k3_kl, masked_mean, objective_units, policy_objective

# ratios pi / pi_old per token; the last token of row 1 is padding (its ratio 2.0 must not count)
RATIOS = [[1.5, 0.9, 1.1], [0.5, 1.0, 2.0]]
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -0.7]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADV = torch.tensor([1.0, -2.0])
EPS, EPS_HIGH, L = 0.2, 0.28, 4


def logp_leaf():
    return (OLD + torch.tensor(RATIOS).log()).requires_grad_()


def run(loss_type, level="token", **kw):
    logp = logp_leaf()
    loss, stats = policy_objective(logp, OLD, ADV, MASK, loss_type=loss_type, importance_sampling_level=level,
                                   epsilon=EPS, epsilon_high=EPS_HIGH, max_gen_len=L, **kw)
    loss.backward()
    return loss.item(), logp.grad, stats


# per-token -min(r A, clip(r, 0.8, 1.28) A): row 0 (A = 1): 1.5 -> -1.28 (clipped high), 0.9 -> -0.9, 1.1 -> -1.1;
# row 1 (A = -2): 0.5 -> +1.6 (clipped low: min(-1.0, -1.6)), 1.0 -> +2.0
ROW0, ROW1 = [-1.28, -0.9, -1.1], [1.6, 2.0]
# d/dlogp of -r A where not clipped (r = exp(logp - old)): -r A; clipped tokens: 0
G0, G1 = [0.0, -0.9, -1.1], [0.0, 2.0]


def expected_grad(row0_scale, row1_scale):
    return torch.tensor([[g * row0_scale for g in G0], [G1[0] * row1_scale, G1[1] * row1_scale, 0.0]])


def test_grpo_per_sequence_mean_then_mean():
    loss, grad, st = run("grpo")
    assert loss == pytest.approx((sum(ROW0) / 3 + sum(ROW1) / 2) / 2, rel=1e-6)
    torch.testing.assert_close(grad, expected_grad(1 / 3 / 2, 1 / 2 / 2), rtol=1e-5, atol=1e-7)
    # one token of five clipped high (ratio 1.5 > 1.28 with A > 0), one low (0.5 < 0.8 with A < 0)
    assert st["clip_ratio_high"].item() == pytest.approx(0.2) and st["clip_ratio_low"].item() == pytest.approx(0.2)
    approx_kl = sum(1 / r + math.log(r) - 1 for r in (1.5, 0.9, 1.1, 0.5, 1.0)) / 5  # k3 with d = -log r
    assert st["approx_kl"].item() == pytest.approx(approx_kl, rel=1e-5)


def test_dapo_mean_over_all_active_tokens():
    loss, grad, st = run("dapo")
    assert loss == pytest.approx((sum(ROW0) + sum(ROW1)) / 5, rel=1e-6)
    torch.testing.assert_close(grad, expected_grad(1 / 5, 1 / 5), rtol=1e-5, atol=1e-7)
    assert objective_units(MASK, "dapo", L).tolist() == [3.0, 2.0]


def test_dr_grpo_constant_normaliser():
    loss, grad, _ = run("dr_grpo")
    assert loss == pytest.approx((sum(ROW0) + sum(ROW1)) / (2 * L), rel=1e-6)
    torch.testing.assert_close(grad, expected_grad(1 / 8, 1 / 8), rtol=1e-5, atol=1e-7)
    assert objective_units(MASK, "dr_grpo", L).tolist() == [4.0, 4.0]


def test_cispo_clipped_detached_weight_keeps_every_token_gradient():
    loss, grad, st = run("cispo")
    logp = (OLD + torch.tensor(RATIOS).log())
    w = [[1.28, 0.9, 1.1], [0.5, 1.0]]  # min(r, 1 + 0.28): the 1.5 token's weight is capped, not zeroed
    value = sum(-w[i][j] * ADV[i].item() * logp[i, j].item() for i in range(2) for j in range(len(w[i]))) / 5
    assert loss == pytest.approx(value, rel=1e-6)
    # d/dlogp = -sg(w) A / 5: the capped token keeps a gradient, unlike under dapo/grpo
    want = torch.tensor([[-1.28 / 5, -0.9 / 5, -1.1 / 5], [1.0 / 5, 2.0 / 5, 0.0]])
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
    assert st["clip_ratio_high"].item() == pytest.approx(0.2) and st["clip_ratio_low"].item() == 0.0


def test_sequence_level_ratio_gspo():
    loss, grad, st = run("grpo", level="sequence")
    w0 = (1.5 * 0.9 * 1.1) ** (1 / 3)  # exp of the mean log-ratio over the 3 tokens
    w1 = 0.5 ** 0.5  # over the 2 real tokens (the padded 2.0 does not count)
    # row 0: A = 1, w0 = 1.141 inside [0.8, 1.28] -> -w0; row 1: A = -2, w1 = 0.707 < 0.8 -> clipped: +1.6
    assert loss == pytest.approx((-w0 + 1.6) / 2, rel=1e-6)
    # gradient through the mean log-ratio: d(-w0)/dlogp_t = -w0 / 3 for each token of row 0, / 2 for the batch
    # mean; row 1 is clipped: no gradient to any of its tokens
    want = torch.tensor([[-w0 / 6] * 3, [0.0, 0.0, 0.0]])
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
    assert st["ratio"].item() == pytest.approx((3 * w0 + 2 * w1) / 5, rel=1e-6)
    assert st["clip_ratio_low"].item() == pytest.approx(2 / 5)


def test_kl_term_is_aggregated_like_the_policy_term():
    ref = OLD + 0.3
    logp = logp_leaf()
    loss, st = policy_objective(logp, OLD, ADV, MASK, loss_type="dapo", epsilon=EPS, epsilon_high=EPS_HIGH,
                                ref_logp=ref, beta=0.1)
    k3 = k3_kl(logp.detach(), ref)
    assert loss.item() == pytest.approx((sum(ROW0) + sum(ROW1)) / 5 + 0.1 * (k3 * MASK).sum().item() / 5, rel=1e-6)
    assert st["kl"].item() == pytest.approx(masked_mean(k3, MASK, dim=1).mean().item(), rel=1e-6)


def old_grpo_loss(logps, ref_logps, advantages, mask, beta):
    """The objective train_grpo/train_spo used before --loss_type (single update, ratio exp(logp - sg(logp)))."""
    ratio = torch.exp(logps - logps.detach())
    d = ref_logps - logps
    per_token = -(ratio * advantages[:, None] - beta * (torch.exp(d) - d - 1))
    return masked_mean(per_token, mask, dim=1).mean()


def test_grpo_with_one_update_equals_the_old_objective():
    torch.manual_seed(0)
    base = torch.randn(4, 6) - 2
    ref = base + 0.2 * torch.randn(4, 6)
    mask = torch.tensor([[1.0] * 6, [1.0] * 3 + [0.0] * 3, [1.0] * 5 + [0.0], [1.0] + [0.0] * 5])
    adv = torch.tensor([0.7, -1.3, 0.2, 2.0])
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    old = old_grpo_loss(a, ref, adv, mask, 0.04)
    new, st = policy_objective(b, b.detach(), adv, mask, loss_type="grpo", epsilon=0.2, epsilon_high=0.28,
                               ref_logp=ref, beta=0.04)
    assert new.item() == pytest.approx(old.item(), rel=1e-6)
    old.backward()
    new.backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-8)
    assert st["ratio"].item() == 1.0 and st["clip_ratio_low"].item() == st["clip_ratio_high"].item() == 0.0
