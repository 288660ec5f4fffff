"""Group advantages (GRPO, Dr. GRPO), RLOO, and the GRPO loss."""
import math

import pytest
import torch

from padded_batches import random_response_mask, to_left_padded


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.mark.exercise("group_advantages")
def test_group_advantages_by_hand(impl):
    # Two prompts, G = 3, laid out group by group.
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0], dtype=torch.float64)
    centered = torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0], dtype=torch.float64)
    std = torch.tensor([1.0] * 3 + [math.sqrt(12.0)] * 3, dtype=torch.float64)  # unbiased group std
    assert torch.allclose(impl.group_advantages(rewards, 3, scale=None), centered)
    assert torch.allclose(impl.group_advantages(rewards, 3), centered / (std + 1e-4))
    assert torch.allclose(impl.group_advantages(rewards, 3, eps=0.5), centered / (std + 0.5))


@pytest.mark.exercise("group_advantages")
@pytest.mark.parametrize("scale", ["std", None])
def test_zero_variance_group_gives_exactly_zero_and_no_nan(impl, scale):
    # In float32 the mean of eight 0.1s is not 0.1: r − mean is rounding noise, which /(std + eps)
    # would blow up into a spurious advantage. A constant group must give exactly 0.
    rewards = torch.tensor([0.1] * 8 + [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0] + [7.0] * 8)
    assert rewards[:8].mean() != rewards[0]  # the trap is real
    advantages = impl.group_advantages(rewards, 8, scale=scale)
    assert torch.isfinite(advantages).all()
    assert (advantages[:8] == 0).all() and (advantages[16:] == 0).all()
    assert (advantages[8:16] != 0).all()
    assert (impl.group_advantages(torch.zeros(8), 4, scale=scale) == 0).all()


@pytest.mark.exercise("group_advantages")
def test_group_advantages_layout_and_order(impl):
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(4 * 5, generator=generator)
    advantages = impl.group_advantages(rewards, 5)
    assert torch.allclose(advantages.view(4, 5).sum(-1), torch.zeros(4), atol=1e-5)  # centred per group
    assert torch.allclose(advantages.view(4, 5).std(-1), torch.ones(4), atol=1e-3)  # unit std per group
    # Reordering whole groups, or samples inside a group, reorders the advantages the same way.
    group_order = torch.randperm(4, generator=generator)
    within = torch.randperm(5, generator=generator)
    reorder = (group_order[:, None] * 5 + within[None, :]).flatten()
    assert torch.allclose(impl.group_advantages(rewards[reorder], 5), advantages[reorder])
    # Splitting the batch at a group boundary changes nothing.
    halves = torch.cat([impl.group_advantages(rewards[:10], 5), impl.group_advantages(rewards[10:], 5)])
    assert torch.allclose(halves, advantages)


@pytest.mark.exercise("group_advantages")
def test_group_advantages_errors(impl):
    with pytest.raises(ValueError, match="divisible"):
        impl.group_advantages(torch.randn(7), 3)
    with pytest.raises(ValueError, match="std"):
        impl.group_advantages(torch.randn(6), 3, scale="max")
    with pytest.raises(ValueError, match="at least 2"):
        impl.group_advantages(torch.randn(6), 1)


@pytest.mark.exercise("rloo_advantages")
def test_rloo_is_reward_minus_mean_of_the_others(impl):
    generator = torch.Generator().manual_seed(1)
    rewards = torch.randn(3 * 4, generator=generator, dtype=torch.float64)
    advantages = impl.rloo_advantages(rewards, 4)
    grouped = rewards.view(3, 4)
    for p in range(3):
        for i in range(4):
            others = torch.cat([grouped[p, :i], grouped[p, i + 1 :]])
            assert advantages[p * 4 + i].item() == pytest.approx((grouped[p, i] - others.mean()).item())
    # Identity: r − (Σ − r)/(G − 1) = G/(G − 1) · (r − mean).
    expected = 4 / 3 * (grouped - grouped.mean(-1, keepdim=True))
    assert torch.allclose(advantages, expected.flatten())


@pytest.mark.exercise("rloo_advantages")
def test_rloo_errors_and_constant_group(impl):
    with pytest.raises(ValueError):
        impl.rloo_advantages(torch.randn(4), 1)
    with pytest.raises(ValueError):
        impl.rloo_advantages(torch.randn(5), 2)
    assert torch.allclose(impl.rloo_advantages(torch.full((6,), 0.3), 3), torch.zeros(6), atol=1e-7)
    assert torch.allclose(impl.rloo_advantages(torch.tensor([1.0, 0.0]), 2), torch.tensor([1.0, -1.0]))


# ---- grpo_loss ----


def grpo_batch(generator, batch_size=6, num_tokens=8):
    mask = random_response_mask(batch_size, num_tokens, generator)
    old = -torch.rand(batch_size, num_tokens, generator=generator, dtype=torch.float64) * 3
    logprobs = old + 0.3 * torch.randn(batch_size, num_tokens, generator=generator, dtype=torch.float64)
    ref = old + 0.5 * torch.randn(batch_size, num_tokens, generator=generator, dtype=torch.float64)
    advantages = torch.randn(batch_size, generator=generator, dtype=torch.float64)
    return logprobs, old, ref, advantages, mask


@pytest.mark.exercise("grpo_loss")
@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "fixed_length"])
def test_grpo_loss_gradient_analytic_and_gradcheck(impl, aggregation):
    logprobs, old, ref, advantages, mask = grpo_batch(torch.Generator().manual_seed(2))
    logprobs.requires_grad_(True)
    beta = 0.04
    loss, clip_fraction, kl = impl.grpo_loss(logprobs, old, ref, advantages, mask, 0.2, beta, aggregation)
    loss.backward()
    ratio = (logprobs - old).exp().detach()
    a = advantages[:, None]
    clipped = ratio.clamp(0.8, 1.2) * a < ratio * a
    # ∂ℓ/∂logπ = −ρA (0 where clipped) + β(1 − π_ref/π), times each token's aggregation weight.
    per_token = torch.where(clipped, 0.0, -ratio * a) + beta * (1 - (ref - logprobs.detach()).exp())
    weight = {
        "sequence_mean": mask / mask.sum(-1, keepdim=True) / len(mask),
        "token_mean": mask / mask.sum(),
        "fixed_length": mask / mask.numel(),
    }[aggregation]
    assert clipped[mask].any() and (~clipped[mask]).any()
    assert torch.allclose(logprobs.grad, weight * per_token)
    assert clip_fraction.item() == pytest.approx(clipped[mask].double().mean().item())
    k3 = (ref - logprobs).exp() - (ref - logprobs) - 1
    assert kl.item() == pytest.approx(k3[mask].mean().item()) and not kl.requires_grad
    x = logprobs.detach().requires_grad_(True)
    loss_of = lambda x: impl.grpo_loss(x, old, ref, advantages, mask, 0.2, beta, aggregation)[0]  # noqa: E731
    assert torch.autograd.gradcheck(loss_of, (x,))


@pytest.mark.exercise("grpo_loss")
def test_grpo_loss_default_is_sequence_mean_and_beta_zero_is_the_surrogate(impl):
    logprobs, old, ref, advantages, mask = grpo_batch(torch.Generator().manual_seed(3))
    ratio = (logprobs - old).exp()
    a = advantages[:, None]
    surrogate = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    per_sequence = (surrogate * mask).sum(-1) / mask.sum(-1)
    loss, _, _ = impl.grpo_loss(logprobs, old, ref, advantages, mask, beta=0.0)
    assert loss.item() == pytest.approx(per_sequence.mean().item())
    # β = 0 drops the KL term, so even an overflowing k3 (π_ref ≫ π) cannot turn into 0 · inf = NaN.
    huge_ref = ref.clone()
    huge_ref[0, 0] = logprobs[0, 0] + 1000.0
    loss, _, kl = impl.grpo_loss(logprobs, old, huge_ref, advantages, mask, beta=0.0)
    assert loss.item() == pytest.approx(per_sequence.mean().item()) and kl.item() == math.inf


@pytest.mark.exercise("grpo_loss")
def test_grpo_loss_invariances_and_all_masked_rows(impl):
    logprobs, old, ref, advantages, mask = grpo_batch(torch.Generator().manual_seed(4))
    for aggregation in ("sequence_mean", "token_mean"):
        loss = impl.grpo_loss(logprobs, old, ref, advantages, mask, aggregation=aggregation)
        left = [to_left_padded(x, mask) for x in (logprobs, old, ref)]
        left_loss = impl.grpo_loss(*left, advantages, to_left_padded(mask, mask), aggregation=aggregation)
        order = torch.randperm(len(mask))
        permuted = impl.grpo_loss(*(x[order] for x in (logprobs, old, ref, advantages, mask)), aggregation=aggregation)
        wide = [torch.cat([x, torch.zeros(len(mask), 3, dtype=x.dtype)], 1) for x in (logprobs, old, ref, mask)]
        widened = impl.grpo_loss(*wide[:3], advantages, wide[3], aggregation=aggregation)
        for other in (left_loss, permuted, widened):
            assert all(a.item() == pytest.approx(b.item()) for a, b in zip(loss, other))
    # An empty row is skipped by sequence_mean; an all-empty batch gives 0, never NaN.
    empty_row = mask.clone()
    empty_row[0] = False
    keep = slice(1, None)
    assert impl.grpo_loss(logprobs, old, ref, advantages, empty_row)[0].item() == pytest.approx(
        impl.grpo_loss(logprobs[keep], old[keep], ref[keep], advantages[keep], mask[keep])[0].item()
    )
    assert all(x.item() == 0.0 for x in impl.grpo_loss(logprobs, old, ref, advantages, torch.zeros_like(mask)))
