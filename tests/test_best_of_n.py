"""Best-of-n: the pool estimator of E[v(best of n)] and the KL formula, against brute force."""
import itertools
import math

import pytest
import torch

from minirlhf import best_of_n_kl, best_of_n_value


def brute_force_best_of_n(s, v, n):
    """Mean over every n-subset of the pool of v at the subset's top s (a tie: the tied v's mean)."""
    picks = []
    for subset in itertools.combinations(range(len(s)), n):
        top = max(s[i] for i in subset)
        picks.append(sum(v[i] for i in subset if s[i] == top) / sum(s[i] == top for i in subset))
    return sum(picks) / len(picks)


def test_matches_every_subset_of_the_pool_with_ties():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 4, (3, 7), generator=g).double()  # few values: many ties
    v = torch.randn(3, 7, generator=g, dtype=torch.float64)
    for n in range(1, 8):
        expected = torch.tensor([brute_force_best_of_n(s[p].tolist(), v[p].tolist(), n) for p in range(3)],
                                dtype=torch.float64)
        assert torch.allclose(best_of_n_value(s, v, n), expected, atol=1e-12), n


def test_end_points_and_invariances():
    g = torch.Generator().manual_seed(1)
    s, v = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    assert torch.allclose(best_of_n_value(s, v, 1), v.mean(-1), atol=1e-6)
    assert torch.allclose(best_of_n_value(s, v, 9), v.gather(-1, s.argmax(-1, keepdim=True)).squeeze(-1))
    perm = torch.randperm(9, generator=g)
    assert torch.allclose(best_of_n_value(s[:, perm], v[:, perm], 4), best_of_n_value(s, v, 4), atol=1e-6)
    assert torch.allclose(best_of_n_value(s.exp(), v, 4), best_of_n_value(s, v, 4), atol=1e-6)  # monotone s
    assert torch.allclose(best_of_n_value(s, torch.ones_like(v), 5), torch.ones(4), atol=1e-6)  # weights sum to 1


def test_unbiased_for_the_expected_maximum_by_enumerating_pools():
    # Pools of N = 4 draws from a 3-valued distribution; E over pools of the estimate = E[max of n draws].
    values = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    cdf = probs.cumsum(0)
    for n in range(1, 5):
        exact = (values * (cdf**n - torch.cat([cdf.new_zeros(1), cdf[:-1]]) ** n)).sum()
        mean_estimate = 0.0
        for pool in itertools.product(range(3), repeat=4):
            draws = values[list(pool)][None]
            mean_estimate += probs[list(pool)].prod() * best_of_n_value(draws, draws, n)[0]
        assert torch.isclose(mean_estimate, exact, atol=1e-12), n


def test_large_pools_stay_finite():
    s = torch.randn(2, 400, dtype=torch.float64)
    for n in (1, 200, 400):
        assert torch.isfinite(best_of_n_value(s, s, n)).all()
    assert torch.allclose(best_of_n_value(s, torch.ones_like(s), 200), torch.ones(2, dtype=torch.float64))


def test_bad_inputs():
    s = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"values must have shape \[P=2, N=5\]"):
        best_of_n_value(s, torch.zeros(2, 4), 2)
    with pytest.raises(ValueError, match=r"selector_scores must have shape \[P, N\]"):
        best_of_n_value(torch.zeros(5), torch.zeros(5), 2)
    for n in (0, 6, 2.0):
        with pytest.raises(ValueError, match="n must be"):
            best_of_n_value(s, s, n)
    with pytest.raises(ValueError, match="n must be"):
        best_of_n_kl(0)


def exact_best_of_n_kl(probs, n):
    """KL(π_n‖π) for a categorical π whose outcomes the selector ranks in index order (no ties)."""
    cdf = probs.cumsum(0)
    best = cdf**n - torch.cat([cdf.new_zeros(1), cdf[:-1]]) ** n
    return torch.special.xlogy(best, best / probs).sum()  # 0 log 0 = 0


def test_kl_formula_is_the_continuous_limit_and_an_upper_bound():
    for n in (1, 2, 4, 16, 64):
        fine = exact_best_of_n_kl(torch.full((200_000,), 1 / 200_000, dtype=torch.float64), n)
        assert abs(fine - best_of_n_kl(n)) < 1e-3
        coarse = exact_best_of_n_kl(torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), n)
        assert coarse <= best_of_n_kl(n) + 1e-12
    assert best_of_n_kl(1) == 0.0
    ns = torch.tensor([1, 2, 8])
    assert torch.allclose(best_of_n_kl(ns), torch.tensor([best_of_n_kl(k) for k in (1, 2, 8)], dtype=torch.float64))
    assert math.isclose(best_of_n_kl(2), math.log(2) - 0.5)
