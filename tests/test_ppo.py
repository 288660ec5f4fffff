"""PPO-clip policy and value losses: case tables, analytic gradients, gradcheck, invariances."""
import math

import pytest
import torch

from minirlhf import ppo_value_loss
from padded_batches import random_response_mask, to_left_padded

EPS = 0.2


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# (advantage, ratio, clipped branch active?) with ε = 0.2. The clip only ever removes the incentive
# to move further in the direction the advantage rewards; the other direction is never clipped.
POLICY_CASES = [
    (+1.0, 1.1, False),  # A > 0, ρ inside [0.8, 1.2]: plain ρA
    (+1.0, 1.5, True),  # A > 0, ρ above 1+ε: already pushed up enough, gradient 0
    (+1.0, 0.5, False),  # A > 0, ρ below 1−ε: the min keeps ρA (smaller), gradient flows to push up
    (-1.0, 1.1, False),  # A < 0, ρ inside
    (-1.0, 1.5, False),  # A < 0, ρ above 1+ε: the min keeps ρA (more negative), gradient flows to push down
    (-1.0, 0.5, True),  # A < 0, ρ below 1−ε: already pushed down enough, gradient 0
]


@pytest.mark.exercise("clipped_surrogate")
@pytest.mark.parametrize("advantage, ratio, clipped", POLICY_CASES)
def test_clipped_surrogate_case_table(impl, advantage, ratio, clipped):
    old = torch.tensor([-1.3], dtype=torch.float64)
    logprobs = (old + math.log(ratio)).requires_grad_(True)
    advantages = torch.tensor([advantage], dtype=torch.float64)
    loss, is_clipped = impl.clipped_surrogate(logprobs, old, advantages, EPS)
    expected_ratio = min(max(ratio, 1 - EPS), 1 + EPS) if clipped else ratio
    assert loss.item() == pytest.approx(-expected_ratio * advantage)
    assert is_clipped.item() == clipped
    loss.sum().backward()
    # ∂(−ρA)/∂logπ = −ρA when unclipped; the clipped term is a constant, gradient 0.
    assert logprobs.grad.item() == pytest.approx(0.0 if clipped else -ratio * advantage)


@pytest.mark.exercise("clipped_surrogate")
def test_clipped_surrogate_zero_advantage_is_zero_and_unclipped(impl):
    logprobs = torch.tensor([-1.0, -2.0, -3.0])
    loss, clipped = impl.clipped_surrogate(logprobs, logprobs - torch.tensor([0.0, 1.0, -1.0]), torch.zeros(3))
    assert (loss == 0).all() and not clipped.any()


@pytest.mark.exercise("clipped_surrogate")
def test_clipped_surrogate_gradient_analytic_and_gradcheck(impl):
    old = torch.randn(5, 7, dtype=torch.float64)
    logprobs = (old + 0.4 * torch.randn(5, 7, dtype=torch.float64)).requires_grad_(True)
    advantages = torch.randn(5, 7, dtype=torch.float64)
    loss, clipped = impl.clipped_surrogate(logprobs, old, advantages, EPS)
    loss.sum().backward()
    ratio = (logprobs - old).exp().detach()
    assert clipped.any() and (~clipped).any()
    assert torch.allclose(logprobs.grad, torch.where(clipped, 0.0, -ratio * advantages))
    assert torch.autograd.gradcheck(lambda x: impl.clipped_surrogate(x, old, advantages, EPS)[0], (logprobs,))


def policy_batch(generator, batch_size=6, num_tokens=8):
    mask = random_response_mask(batch_size, num_tokens, generator)
    old = -torch.rand(batch_size, num_tokens, generator=generator, dtype=torch.float64) * 3
    logprobs = old + 0.3 * torch.randn(batch_size, num_tokens, generator=generator, dtype=torch.float64)
    advantages = torch.randn(batch_size, num_tokens, generator=generator, dtype=torch.float64)
    return logprobs, old, advantages, mask


@pytest.mark.exercise("ppo_policy_loss")
@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "fixed_length"])
def test_ppo_policy_loss_gradient_is_the_aggregated_per_token_gradient(impl, aggregation):
    logprobs, old, advantages, mask = policy_batch(torch.Generator().manual_seed(0))
    logprobs.requires_grad_(True)
    loss, clip_fraction, approx_kl = impl.ppo_policy_loss(logprobs, old, advantages, mask, EPS, aggregation)
    loss.backward()
    ratio = (logprobs - old).exp().detach()
    clipped = ratio.clamp(1 - EPS, 1 + EPS) * advantages < ratio * advantages
    weight = {
        "token_mean": mask / mask.sum(),
        "sequence_mean": mask / mask.sum(-1, keepdim=True) / len(mask),
        "fixed_length": mask / mask.numel(),
    }[aggregation]
    assert clipped[mask].any() and (~clipped[mask]).any()
    assert torch.allclose(logprobs.grad, weight * torch.where(clipped, 0.0, -ratio * advantages))
    assert clip_fraction.item() == pytest.approx(clipped[mask].double().mean().item())
    # approx_kl: mean k3 for KL(π_old‖π) = mean of (ρ − 1) − log ρ, detached.
    assert approx_kl.item() == pytest.approx(((ratio - 1) - ratio.log())[mask].mean().item())
    assert not clip_fraction.requires_grad and not approx_kl.requires_grad
    x = logprobs.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: impl.ppo_policy_loss(x, old, advantages, mask, EPS, aggregation)[0], (x,))


@pytest.mark.exercise("ppo_policy_loss")
def test_ppo_policy_loss_invariances_and_all_masked_rows(impl):
    logprobs, old, advantages, mask = policy_batch(torch.Generator().manual_seed(1))
    loss = impl.ppo_policy_loss(logprobs, old, advantages, mask)
    left = impl.ppo_policy_loss(*(to_left_padded(x, mask) for x in (logprobs, old, advantages, mask)))
    order = torch.randperm(len(mask))
    permuted = impl.ppo_policy_loss(logprobs[order], old[order], advantages[order], mask[order])
    for other in (left, permuted):
        assert all(a.item() == pytest.approx(b.item()) for a, b in zip(loss, other))
    garbage = torch.where(mask, advantages, float("nan"))  # padding never leaks into the loss
    assert impl.ppo_policy_loss(logprobs, old, garbage, mask)[0].item() == pytest.approx(loss[0].item())
    empty = impl.ppo_policy_loss(logprobs, old, advantages, torch.zeros_like(mask))
    assert all(x.item() == 0.0 for x in empty)


# (old value, new value, return, clipped branch active?) with clip range c = 0.2.
VALUE_CASES = [
    (1.0, 1.1, 0.0, False),  # inside [V_old − c, V_old + c]: both terms equal
    (1.0, 1.5, 0.0, False),  # moved past the range *away* from R: the unclipped error is larger, kept
    (1.0, 0.5, 0.0, True),  # moved past the range *towards* R: the clipped error is larger, gradient 0
    (1.0, 1.5, 2.0, True),  # towards R from below: clipped
    (1.0, 0.5, 2.0, False),  # away from R: unclipped
]


@pytest.mark.exercise("ppo_value_loss")
@pytest.mark.parametrize("old_value, value, target, clipped", VALUE_CASES)
def test_ppo_value_loss_case_table(impl, old_value, value, target, clipped):
    values = torch.tensor([[value]], dtype=torch.float64, requires_grad=True)
    old_values = torch.tensor([[old_value]], dtype=torch.float64)
    returns = torch.tensor([[target]], dtype=torch.float64)
    loss, clip_fraction = impl.ppo_value_loss(values, old_values, returns, torch.ones(1, 1), clip_range=0.2)
    used = min(max(value, old_value - 0.2), old_value + 0.2) if clipped else value
    assert loss.item() == pytest.approx(0.5 * (used - target) ** 2)
    assert clip_fraction.item() == float(clipped)
    loss.backward()
    # ∂/∂V of ½(V − R)² is V − R; the clipped term is constant in V outside the range.
    assert values.grad.item() == pytest.approx(0.0 if clipped else value - target)


@pytest.mark.parametrize("value, gradient, loss", [(0.5, 0.0, 0.5 * 0.8**2), (-0.5, -1.5, 0.5 * 1.5**2)])
def test_value_clip_stops_only_a_move_that_reduced_the_error(value, gradient, loss):
    # V_old = 0, R = 1, c = 0.2. V = 0.5 moved towards R past the clip range: its clipped version
    # (0.2, error 0.8) is worse than it (error 0.5), the max picks the constant clipped term, and
    # the gradient is 0. V = −0.5 moved away from R: clipped (−0.2, error 1.2) is better than it
    # (error 1.5), the max keeps ½(V − R)², and the gradient V − R = −1.5 pulls it back.
    values = torch.tensor([[value]], dtype=torch.float64, requires_grad=True)
    zero, one = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    value_loss, clip_fraction = ppo_value_loss(values, zero, one, torch.ones(1, 1), clip_range=0.2)
    value_loss.backward()
    assert values.grad.item() == pytest.approx(gradient, abs=1e-12)
    assert value_loss.item() == pytest.approx(loss, abs=1e-12)
    assert clip_fraction.item() == (1.0 if gradient == 0 else 0.0)


@pytest.mark.exercise("ppo_value_loss")
@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "fixed_length"])
def test_ppo_value_loss_gradient_analytic_and_gradcheck(impl, aggregation):
    generator = torch.Generator().manual_seed(2)
    mask = random_response_mask(5, 6, generator)
    old_values = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    values = (old_values + 0.4 * torch.randn(5, 6, generator=generator, dtype=torch.float64)).requires_grad_(True)
    returns = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    loss, clip_fraction = impl.ppo_value_loss(values, old_values, returns, mask, 0.2, aggregation)
    loss.backward()
    v = values.detach()
    clipped_v = old_values + (v - old_values).clamp(-0.2, 0.2)
    clipped = (clipped_v - returns) ** 2 > (v - returns) ** 2
    weight = {
        "token_mean": mask / mask.sum(),
        "sequence_mean": mask / mask.sum(-1, keepdim=True) / len(mask),
        "fixed_length": mask / mask.numel(),
    }[aggregation]
    assert clipped[mask].any() and (~clipped[mask]).any()
    assert torch.allclose(values.grad, weight * torch.where(clipped, 0.0, v - returns))
    assert clip_fraction.item() == pytest.approx(clipped[mask].double().mean().item())
    assert torch.autograd.gradcheck(
        lambda x: impl.ppo_value_loss(x, old_values, returns, mask, 0.2, aggregation)[0], (v.clone().requires_grad_(),)
    )


@pytest.mark.exercise("ppo_value_loss")
def test_ppo_value_loss_padding_invariance_and_all_masked(impl):
    generator = torch.Generator().manual_seed(3)
    mask = random_response_mask(5, 6, generator)
    values, old_values, returns = (torch.randn(5, 6, generator=generator, dtype=torch.float64) for _ in range(3))
    loss, fraction = impl.ppo_value_loss(values, old_values, returns, mask)
    left = [to_left_padded(x, mask) for x in (values, old_values, returns, mask)]
    left_loss, left_fraction = impl.ppo_value_loss(*left)
    assert left_loss.item() == pytest.approx(loss.item()) and left_fraction.item() == pytest.approx(fraction.item())
    empty_loss, empty_fraction = impl.ppo_value_loss(values, old_values, returns, torch.zeros_like(mask))
    assert empty_loss.item() == 0.0 and empty_fraction.item() == 0.0
