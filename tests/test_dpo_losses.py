"""DPO-family losses. ``dpo_loss`` (all five loss types) and ``simpo_loss`` are exercises: their
checks (minirlhf/homework/checks/dpo.py, simpo.py: analytic gradients, exact optima, identities
between variants, invariances, edge cases) run on the reference, or on a student's folder with
``--impl``. The rest (argument checks, DPOP, R-DPO, ORPO, KTO, log1mexp) is reference code.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from exercise_checks import exercise_tests
from minirlhf.core.dpo_losses import (
    DPO_LOSS_TYPES,
    dpo_loss,
    dpop_penalty,
    kto_loss,
    log1mexp,
    orpo_loss,
    rdpo_length_margin,
)
test_exercise_dpo = exercise_tests("dpo")
test_exercise_simpo = exercise_tests("simpo")


def randn(*shape, seed=0, scale=3.0, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return (shift + scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).requires_grad_()


def four_logps(B=6, seed=0):
    """policy_chosen, policy_rejected, ref_chosen, ref_rejected: summed log-probs, float64 leaves."""
    return tuple(randn(B, seed=seed + i, shift=-20.0) for i in range(4))


# --------------------------------------------------------------------------- dpo_loss: argument checks


def test_dpo_rejects_bad_arguments():
    logps = [torch.randn(3) for _ in range(4)]
    with pytest.raises(ValueError, match="sigmoid.*cdpo.*robust.*ipo.*hinge"):
        dpo_loss(*logps, loss_type="simpo")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*logps, loss_type="sigmoid", label_smoothing=0.1)  # would be silently ignored
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*logps, loss_type="robust", label_smoothing=0.5)  # divides by 1 − 2ε
    with pytest.raises(ValueError, match="beta > 0"):
        dpo_loss(*logps, beta=0.0, loss_type="ipo")
    with pytest.raises(ValueError, match=r"policy_rejected_logps must have shape \[3\] \(as in policy_chosen_logps\)"):
        dpo_loss(logps[0], logps[1][:2], logps[2], logps[3])  # would broadcast to [3, 2] otherwise
    assert set(DPO_LOSS_TYPES) == {"sigmoid", "cdpo", "robust", "ipo", "hinge"}


def test_per_pair_label_smoothing_is_each_pairs_own_cdpo_with_the_soft_label_optimum():
    logps = [x.detach() for x in four_logps(seed=3)]
    flip_rates = torch.tensor([0.0, 0.1, 0.25, 0.4, 0.5, 0.05], dtype=torch.float64)
    losses, _, _ = dpo_loss(*logps, beta=0.5, loss_type="cdpo", label_smoothing=flip_rates)
    for i, eps in enumerate(flip_rates.tolist()):
        one, _, _ = dpo_loss(*(x[i : i + 1] for x in logps), beta=0.5, loss_type="cdpo", label_smoothing=eps)
        assert losses[i] == pytest.approx(float(one))
    # soft Bradley-Terry labels ε = σ(−Δr): the loss is smallest where β·h = Δr
    margins = torch.tensor([0.0, 0.3, 1.0, 2.5], dtype=torch.float64)
    h = (margins / 0.5).clone().requires_grad_()
    zeros = torch.zeros(4, dtype=torch.float64)
    losses, _, _ = dpo_loss(h, zeros, zeros, zeros, beta=0.5, loss_type="cdpo", label_smoothing=torch.sigmoid(-margins))
    losses.sum().backward()
    assert torch.allclose(h.grad, torch.zeros(4, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        dpo_loss(*logps, loss_type="cdpo", label_smoothing=flip_rates + 0.2)
    with pytest.raises(ValueError, match="applies to 'cdpo' and 'robust'"):
        dpo_loss(*logps, loss_type="sigmoid", label_smoothing=flip_rates)


# --------------------------------------------------------------------------- DPOP and R-DPO


def test_rdpo_is_dpo_with_a_length_margin():
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (x.detach() for x in four_logps(seed=8))
    chosen_lengths, rejected_lengths = torch.tensor([10, 3, 7, 7, 1, 20]), torch.tensor([4, 9, 7, 2, 1, 5])
    beta, alpha = 0.1, 0.05
    margin = rdpo_length_margin(chosen_lengths, rejected_lengths, alpha)
    losses = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, logit_offset=margin)[0]
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    expected = -F.logsigmoid(beta * h - alpha * (chosen_lengths - rejected_lengths))
    torch.testing.assert_close(losses, expected)
    equal_length = rdpo_length_margin(chosen_lengths, chosen_lengths, alpha)
    torch.testing.assert_close(
        dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, logit_offset=equal_length)[0],
        dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)[0],
    )


def test_dpop_penalises_only_a_chosen_response_below_the_reference():
    # Rows: log π(y_w) above the reference (no penalty: plain DPO), and below it (penalised).
    # Below: z = β(h − λ(log π_ref(y_w) − log π(y_w))), so ∂L/∂log π(y_w) = −β(1 + λ)σ(−z).
    beta, lam = 0.1, 5.0
    policy_chosen = torch.tensor([-4.0, -9.0], dtype=torch.float64, requires_grad=True)
    policy_rejected = torch.tensor([-8.0, -8.0], dtype=torch.float64, requires_grad=True)
    ref_chosen = torch.tensor([-5.0, -5.0], dtype=torch.float64)
    ref_rejected = torch.tensor([-6.0, -6.0], dtype=torch.float64)
    penalty = dpop_penalty(policy_chosen, ref_chosen, lam)
    torch.testing.assert_close(penalty.detach(), torch.tensor([0.0, lam * 4.0], dtype=torch.float64))
    logps = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = dpo_loss(*logps, beta=beta, logit_offset=beta * penalty)[0]
    plain = dpo_loss(*logps, beta=beta)[0]
    torch.testing.assert_close(losses[0], plain[0])
    losses.sum().backward()
    with torch.no_grad():
        h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
        z = beta * (h - penalty)
        push = torch.sigmoid(-z)
        chosen_weight = torch.tensor([1.0, 1.0 + lam], dtype=torch.float64)
        torch.testing.assert_close(policy_chosen.grad, -beta * chosen_weight * push)
        torch.testing.assert_close(policy_rejected.grad, beta * push)


def test_dpop_and_rdpo_gradcheck():
    logps = four_logps(seed=9)
    lengths_w, lengths_l = torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([9, 8, 7, 6, 5, 4])

    def loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        offset = 0.2 * dpop_penalty(policy_chosen, ref_chosen, lam=3.0) + rdpo_length_margin(lengths_w, lengths_l, 0.01)
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.2, logit_offset=offset)[0]

    assert gradcheck(loss, logps)


# --------------------------------------------------------------------------- ORPO


def test_log1mexp_is_accurate_near_zero_and_far_below():
    x = torch.tensor([-1e-20, -1e-10, -1e-3, -math.log(2), -1.0, -50.0, -1000.0], dtype=torch.float64)
    # exact values, from log(1 − eˣ) = log(−x) + log((1 − eˣ)/(−x)) and the series near 0 / far below
    expected = torch.tensor([
        math.log(1e-20), math.log(1e-10) - 5e-11, math.log(-math.expm1(-1e-3)), -math.log(2),
        math.log1p(-math.exp(-1.0)), -math.exp(-50.0), -0.0,
    ], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-14, atol=0)
    # float32: the naive formulas give −inf near 0 and 0 far below; this does not
    x32 = torch.tensor([-1e-10, -30.0])
    torch.testing.assert_close(log1mexp(x32), torch.tensor([math.log(1e-10), -math.exp(-30.0)]), rtol=1e-6, atol=0)
    assert log1mexp(torch.tensor([0.0])).item() == -math.inf
    around_the_switch = torch.tensor([-1e-3, -0.69, -0.7, -5.0, -40.0], dtype=torch.float64, requires_grad=True)
    assert gradcheck(log1mexp, (around_the_switch,))


def test_orpo_by_hand():
    # P(y_w) = 0.4, P(y_l) = 0.2: log odds ratio = log(0.4/0.6) − log(0.2/0.8)
    lam = 0.1
    losses, log_odds_ratio = orpo_loss(torch.tensor([math.log(0.4)]), torch.tensor([math.log(0.2)]), lam=lam)
    expected_ratio = math.log(0.4 / 0.6) - math.log(0.2 / 0.8)
    assert log_odds_ratio.item() == pytest.approx(expected_ratio, rel=1e-6)
    assert losses.item() == pytest.approx(lam * math.log1p(math.exp(-expected_ratio)), rel=1e-6)


def test_orpo_gradcheck_and_analytic_gradient():
    # log odds(a) = a − log(1 − eᵃ) has derivative 1/(1 − eᵃ), so with ℓ = log odds_w − log odds_l:
    #   ∂L/∂a_w = −λ σ(−ℓ) / (1 − e^{a_w}),   ∂L/∂a_l = +λ σ(−ℓ) / (1 − e^{a_l})
    lam = 0.5
    chosen = randn(5, seed=16, scale=0.5, shift=-1.5).clamp(max=-0.05).detach().requires_grad_()
    rejected = randn(5, seed=17, scale=0.5, shift=-1.5).clamp(max=-0.05).detach().requires_grad_()
    assert gradcheck(lambda a, b: orpo_loss(a, b, lam=lam)[0], (chosen, rejected))
    losses, log_odds_ratio = orpo_loss(chosen, rejected, lam=lam)
    losses.sum().backward()
    with torch.no_grad():
        push = torch.sigmoid(-log_odds_ratio)
        torch.testing.assert_close(chosen.grad, -lam * push / (1 - chosen.exp()))
        torch.testing.assert_close(rejected.grad, lam * push / (1 - rejected.exp()))


def test_orpo_edges_are_not_nan():
    # average log-prob 0 (P = 1, infinite odds), tiny, huge negative, and −inf (P = 0)
    chosen = torch.tensor([0.0, -1e-12, -1e4, -1.0, 0.0], requires_grad=True)
    rejected = torch.tensor([-1.0, -1.0, -1.0, float("-inf"), 0.0], requires_grad=True)
    losses, log_odds_ratio = orpo_loss(chosen, rejected, lam=1.0)
    losses.sum().backward()
    assert not torch.isnan(losses).any() and not torch.isnan(log_odds_ratio).any()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert losses[-1].item() == pytest.approx(math.log(2))  # both certain: no preference either way


# --------------------------------------------------------------------------- KTO


def test_kto_by_hand_and_analytic_gradient():
    # desirable:   L = λ_D(1 − σ(u)), u = β(r − z0)  ->  ∂L/∂log π = −λ_D β σ(u)σ(−u)
    # undesirable: L = λ_U(1 − σ(v)), v = β(z0 − r)  ->  ∂L/∂log π = +λ_U β σ(v)σ(−v)
    beta, z0, lam_d, lam_u = 0.5, 0.3, 1.0, 1.5
    policy, ref = randn(6, seed=18, shift=-10.0), randn(6, seed=19, shift=-10.0)
    desirable = torch.tensor([True, False, True, True, False, False])
    losses, rewards = kto_loss(policy, ref, desirable, z0, beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)
    losses.sum().backward()
    with torch.no_grad():
        r = policy - ref
        u, v = beta * (r - z0), beta * (z0 - r)
        expected_losses = torch.where(desirable, lam_d * (1 - torch.sigmoid(u)), lam_u * (1 - torch.sigmoid(v)))
        torch.testing.assert_close(losses, expected_losses)
        expected_grad = torch.where(
            desirable,
            -lam_d * beta * torch.sigmoid(u) * torch.sigmoid(-u),
            lam_u * beta * torch.sigmoid(v) * torch.sigmoid(-v),
        )
        torch.testing.assert_close(policy.grad, expected_grad)
        torch.testing.assert_close(ref.grad, -expected_grad)
        torch.testing.assert_close(rewards, beta * r)
    assert not rewards.requires_grad


def test_kto_gradcheck_and_reference_point():
    policy, ref = randn(6, seed=20, shift=-10.0), randn(6, seed=21, shift=-10.0)
    desirable = torch.tensor([1, 0, 1, 0, 1, 1])
    kl = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda p, r: kto_loss(p, r, desirable, kl.detach(), beta=0.3)[0], (policy, ref))
    losses, _ = kto_loss(policy, ref, desirable, kl, beta=0.3)
    losses.sum().backward()
    assert kl.grad is None  # z0 is a baseline: no gradient flows into the KL estimate
    # a negative KL estimate (noise) is clamped to 0
    torch.testing.assert_close(kto_loss(policy, ref, desirable, -0.7)[0], kto_loss(policy, ref, desirable, 0.0)[0])


@pytest.mark.parametrize("all_desirable", [True, False])
def test_kto_single_kind_batches_and_edges(all_desirable):
    policy = torch.tensor([-1.0, -1e6, -3.0, float("-inf")], requires_grad=True)
    ref = torch.tensor([-2.0, -2.0, -1e6, -2.0])
    desirable = torch.full((4,), all_desirable)
    losses, _ = kto_loss(policy, ref, desirable, kl_reference=0.5, beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(policy.grad).all()
    assert ((losses >= 0) & (losses <= 1)).all()
    # β = 0: every response sits at the reference point, loss λ·½ (finite rows: 0·∞ is undefined)
    torch.testing.assert_close(kto_loss(policy[:3], ref[:3], desirable[:3], 0.5, beta=0.0)[0], torch.full((3,), 0.5))


def test_kto_batch_order_invariance():
    policy, ref = (randn(8, seed=s, shift=-10.0).detach() for s in (22, 23))
    desirable = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0]).bool()
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        kto_loss(policy[perm], ref[perm], desirable[perm], 0.2)[0], kto_loss(policy, ref, desirable, 0.2)[0][perm]
    )
