"""KL estimators (Schulman's k1, k2, k3) and the KL-shaped per-token rewards of RLHF-PPO."""
import math

import pytest
import torch

from padded_batches import random_response_mask, to_left_padded

ESTIMATORS = ["k1", "k2", "k3"]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def random_categorical_pair(num_categories, generator, spread=1.0):
    """Log-probs of two random categorical distributions π, π_ref over the same categories."""
    logp = torch.log_softmax(spread * torch.randn(num_categories, generator=generator, dtype=torch.float64), -1)
    logq = torch.log_softmax(spread * torch.randn(num_categories, generator=generator, dtype=torch.float64), -1)
    return logp, logq


@pytest.mark.exercise("kl_penalty")
def test_estimators_by_formula(impl):
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    logq = torch.tensor([-1.5, -0.5, -0.5], dtype=torch.float64)
    delta = logp - logq
    assert torch.allclose(impl.kl_penalty(logp, logq, "k1"), delta)
    assert torch.allclose(impl.kl_penalty(logp, logq, "k2"), 0.5 * delta**2)
    assert torch.allclose(impl.kl_penalty(logp, logq, "k3"), torch.exp(-delta) + delta - 1)
    assert torch.equal(impl.kl_penalty(logp, logq), impl.kl_penalty(logp, logq, "k1"))  # default
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        impl.kl_penalty(logp, logq, "k4")


@pytest.mark.exercise("kl_penalty")
def test_exact_expectations_k1_k3_unbiased_k2_biased(impl):
    # E_π[k] = Σ_y π(y) k(y) exactly, over every category: k1 and k3 are unbiased for KL(π‖π_ref).
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        logp, logq = random_categorical_pair(12, generator)
        kl = (logp.exp() * (logp - logq)).sum()
        expectation = {name: (logp.exp() * impl.kl_penalty(logp, logq, name)).sum() for name in ESTIMATORS}
        assert expectation["k1"].item() == pytest.approx(kl.item(), rel=1e-10)
        assert expectation["k3"].item() == pytest.approx(kl.item(), rel=1e-10)
        assert abs(expectation["k2"].item() - kl.item()) > 1e-3 * kl.item()  # k2 is biased


@pytest.mark.exercise("kl_penalty")
def test_k2_bias_is_third_order_when_distributions_are_close(impl):
    # π_ref ∝ π · e^{εh}: KL = O(ε²) but E[k2] − KL = O(ε³), so the relative bias halves with ε.
    generator = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(10, generator=generator, dtype=torch.float64), -1)
    h = torch.randn(10, generator=generator, dtype=torch.float64).exp()  # skewed, so the ε³ term is clear
    relative_bias = []
    for eps in (0.02, 0.01, 0.005):
        logq = torch.log_softmax(logp + eps * h, -1)
        kl = (logp.exp() * (logp - logq)).sum()
        k2 = (logp.exp() * impl.kl_penalty(logp, logq, "k2")).sum()
        relative_bias.append(abs(k2 - kl).item() / kl.item())
    assert relative_bias[0] > 1e-3  # biased...
    for larger, smaller in zip(relative_bias, relative_bias[1:]):
        assert smaller / larger == pytest.approx(0.5, abs=0.02)  # ...by a third-order term


@pytest.mark.exercise("kl_penalty")
def test_monte_carlo_k1_and_k3_estimate_kl_within_five_standard_errors(impl):
    generator = torch.Generator().manual_seed(2)
    num_samples = 200_000
    for spread in (0.3, 1.0, 2.0):
        logp, logq = random_categorical_pair(8, generator, spread)
        kl = (logp.exp() * (logp - logq)).sum().item()
        samples = torch.multinomial(logp.exp(), num_samples, replacement=True, generator=generator)
        k1 = impl.kl_penalty(logp[samples], logq[samples], "k1")
        k3 = impl.kl_penalty(logp[samples], logq[samples], "k3")
        for estimate in (k1, k3):
            standard_error = estimate.std().item() / math.sqrt(num_samples)
            assert abs(estimate.mean().item() - kl) < 5 * standard_error
        assert (k3 >= 0).all()
        assert (k1 < 0).any()  # k1 is negative on some samples (tokens π_ref likes more than π)
        if spread < 1:  # close distributions: k3 has a far lower variance than k1
            assert k3.std() < k1.std() / 2


@pytest.mark.exercise("kl_penalty")
def test_k3_is_nonnegative_and_accurate_in_float32_including_huge_log_ratios(impl):
    magnitudes = torch.logspace(-12, 3, 400, dtype=torch.float64)
    delta = torch.cat([-magnitudes, torch.zeros(1, dtype=torch.float64), magnitudes])
    delta = delta[delta > -88]  # e^{−Δ} overflows float32 beyond this: k3 itself is not representable
    logp = delta.float()
    k3 = impl.kl_penalty(logp, torch.zeros_like(logp), "k3")
    assert torch.isfinite(k3).all()
    assert (k3 >= 0).all()
    exact = torch.expm1(-delta.float().double()) + delta.float().double()
    accurate = delta.abs() > 1e-3
    assert torch.allclose(k3.double()[accurate], exact[accurate], rtol=1e-3)
    # The naive formula loses everything to cancellation at small Δ (and goes negative).
    naive = torch.exp(-logp) + logp - 1
    assert (naive[~accurate] - exact[~accurate].float()).abs().max() > 1e3 * (k3 - exact.float())[~accurate].abs().max()


@pytest.mark.exercise("kl_penalty")
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty_gradients_match_the_analytic_formulas(impl, estimator):
    logp = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    logq = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    impl.kl_penalty(logp, logq, estimator).sum().backward()
    ratio = torch.exp(logq - logp).detach()  # r = π_ref / π
    delta = (logp - logq).detach()
    expected = {"k1": torch.ones_like(delta), "k2": delta, "k3": 1 - ratio}[estimator]  # ∂k/∂logπ
    assert torch.allclose(logp.grad, expected)
    assert torch.allclose(logq.grad, -expected)  # k depends only on logπ − logπ_ref
    assert torch.autograd.gradcheck(lambda a, b: impl.kl_penalty(a, b, estimator), (logp, logq))


# ---- kl_shaped_rewards ----


def shaped_inputs(generator, batch_size=5, num_tokens=7):
    mask = random_response_mask(batch_size, num_tokens, generator)
    logp = -torch.rand(batch_size, num_tokens, generator=generator, dtype=torch.float64) * 3
    logq = -torch.rand(batch_size, num_tokens, generator=generator, dtype=torch.float64) * 3
    score = torch.randn(batch_size, generator=generator, dtype=torch.float64)
    return score, logp, logq, mask


@pytest.mark.exercise("kl_shaped_rewards")
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_shaped_rewards_by_hand_for_right_and_left_padding(impl, estimator):
    score = torch.tensor([10.0, 20.0], dtype=torch.float64)
    logp = torch.tensor([[-1.0, -2.0, -3.0, -9.0], [-9.0, -1.0, -2.0, -3.0]], dtype=torch.float64)
    logq = torch.tensor([[-2.0, -2.0, -1.0, 0.0], [0.0, -2.0, -2.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # the same response, right- then left-padded
    rewards, kl = impl.kl_shaped_rewards(score, logp, logq, mask, beta=0.5, estimator=estimator)
    per_token = {"k1": [1.0, 0.0, -2.0], "k2": [0.5, 0.0, 2.0], "k3": [math.exp(-1) + 1 - 1, 0.0, math.exp(2) - 2 - 1]}
    expected_kl = torch.tensor(per_token[estimator], dtype=torch.float64)
    assert torch.allclose(kl[0, :3], expected_kl) and torch.allclose(kl[1, 1:], expected_kl)
    assert kl[0, 3] == 0 and kl[1, 0] == 0
    expected = -0.5 * expected_kl
    assert torch.allclose(rewards[0, :3], expected + torch.tensor([0, 0, 10.0], dtype=torch.float64))
    assert torch.allclose(rewards[1, 1:], expected + torch.tensor([0, 0, 20.0], dtype=torch.float64))
    assert rewards[0, 3] == 0 and rewards[1, 0] == 0


@pytest.mark.exercise("kl_shaped_rewards")
def test_shaped_rewards_score_lands_on_last_valid_token_for_any_layout(impl):
    generator = torch.Generator().manual_seed(3)
    score, logp, logq, mask = shaped_inputs(generator)
    rewards, kl = impl.kl_shaped_rewards(score, logp, logq, mask, beta=0.1)
    lengths = mask.sum(-1)
    for i in range(len(score)):
        last = lengths[i] - 1
        assert rewards[i, last].item() == pytest.approx(score[i].item() - 0.1 * kl[i, last].item())
    assert torch.allclose(rewards.sum(-1), score - 0.1 * kl.sum(-1))
    left_rewards, left_kl = impl.kl_shaped_rewards(
        score, to_left_padded(logp, mask), to_left_padded(logq, mask), to_left_padded(mask, mask), beta=0.1
    )
    assert torch.equal(left_rewards, to_left_padded(rewards, mask))
    assert torch.equal(left_kl, to_left_padded(kl, mask))
    # Holes in the mask (e.g. masked tool output): the score still goes to the last valid token.
    holes = torch.tensor([[1, 0, 1, 1, 0, 0, 0]] * 5).bool()
    rewards, _ = impl.kl_shaped_rewards(score, logp, logq, holes, beta=0.0)
    assert torch.equal(rewards[:, 3], score) and (rewards[:, [0, 1, 2, 4, 5, 6]] == 0).all()


@pytest.mark.exercise("kl_shaped_rewards")
def test_shaped_rewards_beta_zero_batch_order_and_extra_padding(impl):
    generator = torch.Generator().manual_seed(4)
    score, logp, logq, mask = shaped_inputs(generator)
    rewards, kl = impl.kl_shaped_rewards(score, logp, logq, mask, beta=0.0)
    assert torch.equal(rewards.sum(-1), score) and (rewards[~mask] == 0).all()
    order = torch.randperm(len(score), generator=generator)
    permuted, _ = impl.kl_shaped_rewards(score[order], logp[order], logq[order], mask[order], beta=0.2)
    assert torch.equal(permuted, impl.kl_shaped_rewards(score, logp, logq, mask, beta=0.2)[0][order])
    pad = torch.full((len(score), 3), -1e4, dtype=torch.float64)  # huge garbage in the padding
    wide, wide_kl = impl.kl_shaped_rewards(
        score, torch.cat([logp, pad], 1), torch.cat([logq, -pad], 1), torch.cat([mask, pad > 0], 1), 0.2, "k3"
    )
    narrow, narrow_kl = impl.kl_shaped_rewards(score, logp, logq, mask, 0.2, "k3")
    assert torch.equal(wide[:, :7], narrow) and (wide[:, 7:] == 0).all() and torch.isfinite(wide_kl).all()


@pytest.mark.exercise("kl_shaped_rewards")
def test_shaped_rewards_row_without_valid_token_is_a_clear_error(impl):
    score, logp, logq, mask = shaped_inputs(torch.Generator().manual_seed(5))
    mask[2] = False
    with pytest.raises(ValueError, match=r"\[2\]"):
        impl.kl_shaped_rewards(score, logp, logq, mask, beta=0.1)
