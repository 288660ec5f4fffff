"""GAE against brute-force sums, its λ = 0 / λ = 1 limits, and padding layouts."""
import pytest
import torch

from padded_batches import random_response_mask, to_left_padded


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def brute_force_gae(rewards, values, mask, gamma, lam):
    """``A_t = Σ_l (γλ)^l δ_{t+l}`` with Python loops over the valid tokens of each row only."""
    advantages = torch.zeros_like(values)
    for i in range(values.shape[0]):
        steps = mask[i].nonzero().flatten().tolist()
        r, v = rewards[i, steps].tolist(), values[i, steps].tolist() + [0.0]  # V after the end is 0
        deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(len(steps))]
        for k, t in enumerate(steps):
            advantages[i, t] = sum((gamma * lam) ** l * deltas[k + l] for l in range(len(steps) - k))
    return advantages


def random_rollout(generator, batch_size=6, num_tokens=9):
    mask = random_response_mask(batch_size, num_tokens, generator)
    rewards = torch.randn(batch_size, num_tokens, generator=generator, dtype=torch.float64)
    values = torch.randn(batch_size, num_tokens, generator=generator, dtype=torch.float64)
    return rewards, values, mask


@pytest.mark.exercise("gae_advantages")
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.5, 0.0)])
def test_gae_matches_brute_force_sum_of_discounted_td_errors(impl, gamma, lam):
    rewards, values, mask = random_rollout(torch.Generator().manual_seed(0))
    advantages, returns = impl.gae_advantages(rewards, values, mask, gamma, lam)
    expected = brute_force_gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(advantages, expected)
    assert torch.allclose(returns, torch.where(mask, expected + values, 0.0))
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()


@pytest.mark.exercise("gae_advantages")
def test_gae_lambda_one_is_monte_carlo_return_minus_value(impl):
    rewards, values, mask = random_rollout(torch.Generator().manual_seed(1))
    gamma = 0.9
    advantages, returns = impl.gae_advantages(rewards, values, mask, gamma, lam=1.0)
    for i in range(len(mask)):
        n = int(mask[i].sum())  # right-padded: valid tokens are 0..n-1
        for t in range(n):
            mc_return = sum(gamma ** (k - t) * rewards[i, k] for k in range(t, n))
            assert advantages[i, t].item() == pytest.approx((mc_return - values[i, t]).item())
            assert returns[i, t].item() == pytest.approx(mc_return.item())  # the value target is the MC return


@pytest.mark.exercise("gae_advantages")
def test_gae_lambda_zero_is_the_td_error(impl):
    rewards, values, mask = random_rollout(torch.Generator().manual_seed(2))
    gamma = 0.8
    advantages, _ = impl.gae_advantages(rewards, values, mask, gamma, lam=0.0)
    next_is_valid = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)  # right-padded rows
    next_values = torch.where(next_is_valid, values.roll(-1, dims=1), 0.0)
    td_error = rewards + gamma * next_values - values
    assert torch.allclose(advantages, torch.where(mask, td_error, 0.0))


@pytest.mark.exercise("gae_advantages")
def test_gae_with_a_final_score_only(impl):
    # γ = λ = 1, V = 0, a single reward at the end: every token's advantage is that reward.
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    rewards = torch.tensor([[0, 0, 2.0, 0], [0, 0, 0, -1.0]])
    advantages, returns = impl.gae_advantages(rewards, torch.zeros(2, 4), mask, gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[2, 2, 2, 0], [0, -1, -1, -1]]
    assert torch.equal(returns, advantages)


@pytest.mark.exercise("gae_advantages")
def test_gae_is_invariant_to_padding_layout_order_and_split(impl):
    rewards, values, mask = random_rollout(torch.Generator().manual_seed(3))
    advantages, returns = impl.gae_advantages(rewards, values, mask, 0.95, 0.9)
    left = [to_left_padded(x, mask) for x in (rewards, values, mask)]
    left_advantages, left_returns = impl.gae_advantages(*left, 0.95, 0.9)
    assert torch.allclose(left_advantages, to_left_padded(advantages, mask))
    assert torch.allclose(left_returns, to_left_padded(returns, mask))
    # Garbage at masked positions and extra padding columns are ignored.
    pad = torch.full((len(mask), 4), 1e6, dtype=torch.float64)
    wide = impl.gae_advantages(
        torch.cat([torch.where(mask, rewards, 1e6), pad], 1),
        torch.cat([torch.where(mask, values, -1e6), pad], 1),
        torch.cat([mask, pad < 0], 1),
        0.95,
        0.9,
    )
    assert torch.allclose(wide[0][:, :9], advantages) and (wide[0][:, 9:] == 0).all()
    # Rows are independent: batch order and splitting commute with GAE.
    order = torch.randperm(len(mask))
    permuted, _ = impl.gae_advantages(rewards[order], values[order], mask[order], 0.95, 0.9)
    assert torch.allclose(permuted, advantages[order])
    halves = [impl.gae_advantages(rewards[s], values[s], mask[s], 0.95, 0.9)[0] for s in (slice(0, 2), slice(2, None))]
    assert torch.allclose(torch.cat(halves), advantages)


@pytest.mark.exercise("gae_advantages")
def test_gae_next_valid_token_skips_holes_in_the_mask(impl):
    # A masked hole (e.g. a tool's output inside a multi-turn response) is not a time step.
    rewards, values, _ = random_rollout(torch.Generator().manual_seed(4), batch_size=3, num_tokens=8)
    holes = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 1], [0, 1, 0, 1, 0, 1, 0, 1], [1, 0, 0, 0, 0, 0, 0, 0]]).bool()
    advantages, _ = impl.gae_advantages(rewards, values, holes, 0.9, 0.7)
    assert torch.allclose(advantages, brute_force_gae(rewards, values, holes, 0.9, 0.7))


@pytest.mark.exercise("gae_advantages")
def test_gae_all_masked_row_and_no_gradient(impl):
    rewards, values, mask = random_rollout(torch.Generator().manual_seed(5))
    mask[1] = False
    values.requires_grad_(True)
    advantages, returns = impl.gae_advantages(rewards, values, mask, 1.0, 0.95)
    assert (advantages[1] == 0).all() and (returns[1] == 0).all() and torch.isfinite(advantages).all()
    assert not advantages.requires_grad and not returns.requires_grad  # fixed targets
