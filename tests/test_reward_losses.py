"""Reward-model losses: the ``bradley_terry`` exercise's checks (minirlhf/homework/checks/), plus
Plackett–Luce and the argument checks (reference only): brute-force references, gradients, invariances.
"""
import itertools

import pytest
import torch
from torch.autograd import gradcheck

from exercise_checks import exercise_tests
from minirlhf.core.reward_losses import bradley_terry_loss as reference_bradley_terry_loss
from minirlhf.core.reward_losses import kwise_bradley_terry_loss, plackett_luce_loss

test_exercise_bradley_terry = exercise_tests("bradley_terry")


def randn(*shape, seed=0, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).requires_grad_()


# --------------------------------------------------------------------------- argument checks (not the exercise)


def test_bradley_terry_shapes_are_checked():
    with pytest.raises(ValueError, match=r"rejected_rewards must have shape \[B=4\]"):
        reference_bradley_terry_loss(torch.randn(4), torch.randn(3))  # would silently broadcast otherwise
    with pytest.raises(ValueError, match=r"\[B\]"):
        reference_bradley_terry_loss(torch.randn(4, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="two valid responses"):
        kwise_bradley_terry_loss(torch.randn(5, 3), torch.tensor([[1, 0, 0]] * 5))


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
