"""Reward-model losses: gradient checks, brute-force references, exact optima, invariances.

Tests marked ``@pytest.mark.exercise`` grade a homework function through the ``impl`` fixture.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from minirlhf.core.reward_losses import bradley_terry_loss as reference_bradley_terry_loss
from minirlhf.core.reward_losses import plackett_luce_loss


def randn(*shape, seed=0, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).requires_grad_()


def minimise(loss_fn, params, steps=100):
    """Run LBFGS (exact on these small smooth convex problems) and return the final loss."""
    optimizer = torch.optim.LBFGS(params, lr=1, max_iter=steps, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)
    return loss_fn().item()


# --------------------------------------------------------------------------- Bradley–Terry


@pytest.mark.exercise("bradley_terry_loss")
def test_bradley_terry_by_hand(impl):
    chosen = torch.tensor([2.0, 0.0, 1.0])
    rejected = torch.tensor([0.0, 0.0, 3.0])
    loss, accuracy = impl.bradley_terry_loss(chosen, rejected)
    expected = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert accuracy.item() == pytest.approx((1 + 0.5 + 0) / 3)  # a tie counts half


@pytest.mark.exercise("bradley_terry_loss")
def test_bradley_terry_gradcheck(impl):
    chosen, rejected = randn(6, seed=1), randn(6, seed=2)
    margin = torch.rand(6, dtype=torch.float64)
    assert gradcheck(
        lambda c, r: impl.bradley_terry_loss(c, r, margin=margin, center_coef=0.1)[0], (chosen, rejected)
    )


@pytest.mark.exercise("bradley_terry_loss")
def test_bradley_terry_analytic_gradient(impl):
    # L = (1/B) Σ_b −log σ(Δ_b − m_b) + c (1/B) Σ_b (r_c + r_r)²,  Δ = r_c − r_r:
    #   ∂L/∂r_c = [−σ(−(Δ − m)) + 2c(r_c + r_r)] / B
    #   ∂L/∂r_r = [+σ(−(Δ − m)) + 2c(r_c + r_r)] / B
    chosen, rejected = randn(5, seed=3), randn(5, seed=4)
    margin, c, B = torch.rand(5, dtype=torch.float64), 0.05, 5
    loss, _ = impl.bradley_terry_loss(chosen, rejected, margin=margin, center_coef=c)
    loss.backward()
    with torch.no_grad():
        push = torch.sigmoid(-(chosen - rejected - margin))
        center = 2 * c * (chosen + rejected)
        torch.testing.assert_close(chosen.grad, (-push + center) / B)
        torch.testing.assert_close(rejected.grad, (push + center) / B)


@pytest.mark.exercise("bradley_terry_loss")
def test_bradley_terry_exact_optimum(impl):
    # One pair seen 3 times as a ≻ b and once as b ≻ a: the MLE is σ(r_a − r_b) = 3/4, and the
    # centering term, which the likelihood ignores, puts the pair's midpoint at 0.
    r = torch.tensor([3.0, 1.0], dtype=torch.float64, requires_grad=True)

    def loss_fn():
        chosen = torch.stack([r[0], r[0], r[0], r[1]])
        rejected = torch.stack([r[1], r[1], r[1], r[0]])
        return impl.bradley_terry_loss(chosen, rejected, center_coef=0.01)[0]

    minimise(loss_fn, [r])
    assert (r[0] - r[1]).item() == pytest.approx(math.log(3), abs=1e-6)
    assert (r[0] + r[1]).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.exercise("bradley_terry_loss")
def test_bradley_terry_shapes(impl):
    chosen, rejected = torch.randn(4), torch.randn(4)
    loss, accuracy = impl.bradley_terry_loss(chosen, rejected)
    loss_col, accuracy_col = impl.bradley_terry_loss(chosen[:, None], rejected[:, None])  # score-head [B,1]
    torch.testing.assert_close(loss_col, loss)
    torch.testing.assert_close(accuracy_col, accuracy)
    with pytest.raises(ValueError, match=r"rejected_rewards must have shape \[B=4\]"):
        impl.bradley_terry_loss(chosen, rejected[:3])  # would silently broadcast otherwise
    with pytest.raises(ValueError, match=r"\[B\]"):
        impl.bradley_terry_loss(torch.randn(4, 2), torch.randn(4, 2))


@pytest.mark.exercise("bradley_terry_loss")
def test_bradley_terry_batch_order_invariance(impl):
    chosen, rejected, margin = torch.randn(7), torch.randn(7), torch.rand(7)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    a = impl.bradley_terry_loss(chosen, rejected, margin, center_coef=0.1)
    b = impl.bradley_terry_loss(chosen[perm], rejected[perm], margin[perm], center_coef=0.1)
    torch.testing.assert_close(a, b)


@pytest.mark.exercise("bradley_terry_loss")
def test_bradley_terry_extreme_rewards_are_finite(impl):
    chosen = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)
    rejected = torch.tensor([-1e4, 1e4, 0.0], requires_grad=True)
    loss, _ = impl.bradley_terry_loss(chosen, rejected)
    loss.backward()
    assert loss.item() == pytest.approx((0 + 2e4 + math.log(2)) / 3)
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


# --------------------------------------------------------------------------- K-wise (InstructGPT)


def kwise_brute_force(rewards, mask):
    """A loop over prompts and itertools.combinations: the definition, read aloud."""
    prompt_losses = []
    for row, valid in zip(rewards, mask):
        ranked = [r for r, v in zip(row, valid) if v]
        pairs = list(itertools.combinations(ranked, 2))  # (better, worse), column order kept
        if pairs:
            prompt_losses.append(sum(-F.logsigmoid(better - worse) for better, worse in pairs) / len(pairs))
    return torch.stack(prompt_losses).mean()


@pytest.mark.exercise("kwise_bradley_terry_loss")
def test_kwise_with_k2_equals_bradley_terry(impl):
    rewards = randn(6, 2, seed=5)
    loss, accuracy = impl.kwise_bradley_terry_loss(rewards)
    bt_loss, bt_accuracy = reference_bradley_terry_loss(rewards[:, 0], rewards[:, 1])
    torch.testing.assert_close(loss, bt_loss)
    torch.testing.assert_close(accuracy, bt_accuracy)


@pytest.mark.exercise("kwise_bradley_terry_loss")
def test_kwise_matches_brute_force_with_mask(impl):
    rewards = randn(4, 5, seed=6)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 1, 0]])
    loss, _ = impl.kwise_bradley_terry_loss(rewards, mask)
    torch.testing.assert_close(loss, kwise_brute_force(rewards, mask))


@pytest.mark.exercise("kwise_bradley_terry_loss")
def test_kwise_gradcheck(impl):
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    assert gradcheck(lambda r: impl.kwise_bradley_terry_loss(r, mask)[0], (randn(3, 4, seed=7),))


@pytest.mark.exercise("kwise_bradley_terry_loss")
def test_kwise_analytic_gradient(impl):
    # Pair (i, j), i < j, contributes −log σ(r_i − r_j) / (P·C), C = C(K,2); so for response k
    #   ∂L/∂r_k = [ −Σ_{j>k} σ(r_j − r_k) + Σ_{i<k} σ(r_k − r_i) ] / (P·C)
    P, K = 3, 4
    rewards = randn(P, K, seed=8)
    impl.kwise_bradley_terry_loss(rewards)[0].backward()
    r = rewards.detach()
    expected = torch.zeros_like(r)
    for k in range(K):
        pushed_up = sum(torch.sigmoid(r[:, j] - r[:, k]) for j in range(k + 1, K)) if k < K - 1 else 0
        pushed_down = sum(torch.sigmoid(r[:, k] - r[:, i]) for i in range(k)) if k > 0 else 0
        expected[:, k] = (-pushed_up + pushed_down) / (P * math.comb(K, 2))
    torch.testing.assert_close(rewards.grad, expected)


@pytest.mark.exercise("kwise_bradley_terry_loss")
def test_kwise_accuracy_counts_pairs_and_ties(impl):
    rewards = torch.tensor([[3.0, 2.0, 1.0], [1.0, 1.0, 2.0]])
    # prompt 0: 3/3 pairs right; prompt 1: (1,1) tie = ½, (1,2) wrong, (1,2) wrong
    _, accuracy = impl.kwise_bradley_terry_loss(rewards)
    assert accuracy.item() == pytest.approx(3.5 / 6)


@pytest.mark.exercise("kwise_bradley_terry_loss")
def test_kwise_ignores_whatever_is_in_padding(impl):
    rewards = randn(2, 4, seed=9)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    garbage = rewards.detach().clone()
    garbage[mask == 0] = torch.tensor([float("nan"), 1e30, float("-inf")], dtype=torch.float64)
    garbage.requires_grad_()
    loss, _ = impl.kwise_bradley_terry_loss(garbage, mask)
    loss.backward()
    torch.testing.assert_close(loss, impl.kwise_bradley_terry_loss(rewards, mask)[0])
    assert torch.isfinite(garbage.grad).all()
    assert (garbage.grad[mask == 0] == 0).all()


@pytest.mark.exercise("kwise_bradley_terry_loss")
def test_kwise_prompt_order_invariance_and_no_pairs_error(impl):
    rewards = randn(5, 3, seed=10).detach()
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(
        impl.kwise_bradley_terry_loss(rewards)[0], impl.kwise_bradley_terry_loss(rewards[perm])[0]
    )
    with pytest.raises(ValueError, match="two valid responses"):
        impl.kwise_bradley_terry_loss(rewards, torch.tensor([[1, 0, 0]] * 5))


# --------------------------------------------------------------------------- Plackett–Luce


def plackett_luce_brute_force(row):
    """−log P(ranking) for one prompt: pick the best of what is left, K times."""
    return -sum(torch.log_softmax(row[k:], dim=0)[0] for k in range(len(row)))


def test_plackett_luce_with_k2_equals_bradley_terry():
    rewards = randn(6, 2, seed=11)
    loss, accuracy = plackett_luce_loss(rewards)
    bt_loss, bt_accuracy = reference_bradley_terry_loss(rewards[:, 0], rewards[:, 1])
    torch.testing.assert_close(loss, bt_loss)
    torch.testing.assert_close(accuracy, bt_accuracy)


def test_plackett_luce_matches_brute_force_with_mask():
    rewards = randn(4, 5, seed=12)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 0, 1], [1, 0, 0, 0, 0]])
    loss, _ = plackett_luce_loss(rewards, mask)
    # the lone-response prompt (probability 1, no information) is left out of the mean
    expected = torch.stack([plackett_luce_brute_force(row[m.bool()]) for row, m in zip(rewards, mask[:3])]).mean()
    torch.testing.assert_close(loss, expected)


def test_plackett_luce_is_a_distribution_over_rankings():
    # Σ over all K! orderings of P(ordering) = 1.
    rewards = randn(1, 4, seed=13).detach()
    total = sum(
        torch.exp(-plackett_luce_loss(rewards[:, list(order)])[0]) for order in itertools.permutations(range(4))
    )
    assert total.item() == pytest.approx(1.0, abs=1e-12)


def test_plackett_luce_gradcheck_with_gaps_in_mask():
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 1, 0]])
    assert gradcheck(lambda r: plackett_luce_loss(r, mask)[0], (randn(3, 4, seed=14),))


def test_plackett_luce_analytic_gradient():
    # L = −Σ_j [r_j − log Σ_{k≥j} e^{r_k}], so ∂L/∂r_k = −1 + Σ_{j≤k} softmax(r_{j:})_k:
    # response k is pushed up once for being chosen, and down by its share of every softmax it is in.
    rewards = randn(1, 4, seed=15)
    plackett_luce_loss(rewards)[0].backward()
    r = rewards.detach()[0]
    expected = torch.stack([-1 + sum(torch.softmax(r[j:], dim=0)[k - j] for j in range(k + 1)) for k in range(4)])
    torch.testing.assert_close(rewards.grad[0], expected)


def test_plackett_luce_ignores_whatever_is_in_padding():
    rewards = randn(2, 4, seed=16)
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]])
    garbage = rewards.detach().clone()
    garbage[mask == 0] = torch.tensor([float("nan"), float("inf"), -1e30], dtype=torch.float64)
    garbage.requires_grad_()
    loss, _ = plackett_luce_loss(garbage, mask)
    loss.backward()
    torch.testing.assert_close(loss, plackett_luce_loss(rewards, mask)[0])
    assert torch.isfinite(garbage.grad).all()
    assert (garbage.grad[mask == 0] == 0).all()
