"""Best-of-n sampling: draw n responses from π, keep the one a selector scores highest.

The selector s is a reward model (rejection sampling against the proxy) or, in the toy world, the
gold reward. Best-of-n is a policy π_n of its own, with no training; two numbers describe it.

**Its value, from a pool.** Sample N ≥ n responses per prompt once. Averaging v (any value: the
gold reward, the RM score) of the best-of-n pick over all C(N, n) subsets of the pool is an
unbiased estimate of E_{π_n}[v]. Sort the pool by s ascending: sample i (1-based) is the pick of
a subset exactly when the subset holds it and n − 1 of the i − 1 samples below it, so

    E_{π_n}[v] ≈ Σ_i  C(i−1, n−1) / C(N, n) · v_(i)

(the counting behind Codex's unbiased pass@k estimator, Chen et al. 2021). Ties in s are broken
uniformly at random, which is the same as giving every sample of a tied block the block's mean v.

**Its KL from π.** When s has no ties, the pick's quantile u = F(s(y)) under π is the largest of
n uniforms, with density n·u^{n−1} = π_n(y)/π(y); so KL(π_n‖π) = log n + (n−1)·E[log u] =
log n − (n−1)/n (Stiennon et al. 2020). Ties (a discrete s, a response drawn twice) can only lower
it: the formula is an upper bound (Beirami et al. 2024).
"""
import math
import numbers

import torch

from minirlhf.core.shapes import check_shapes


def best_of_n_value(selector_scores, values, n):
    """Unbiased estimate of E[v(best of n)] from a pool of N ≥ n samples per prompt.

        E_{π_n}[v] ≈ Σ_{i=1..N} C(i−1, n−1) / C(N, n) · v_(i),   pool sorted by s ascending

    Shapes: ``selector_scores`` s and ``values`` v ``[P, N]`` (one row per prompt, N samples
    each; any float dtype) -> ``[P]`` in ``values``' dtype. ``n`` is an int in ``1..N``; ``n = 1``
    gives the pool mean of v, ``n = N`` the v of the top-scored sample (ties: their mean v).
    ``selector_scores`` may be ``values`` itself: then it is the expected maximum of n draws.
    """
    check_shapes("best_of_n_value", selector_scores=(selector_scores, "P N"), values=(values, "P N", "float"))
    pool = values.shape[-1]
    if not (isinstance(n, numbers.Integral) and 1 <= n <= pool):
        raise ValueError(f"best_of_n_value: n must be an int in 1..N = {pool}, got {n!r}")
    order = selector_scores.argsort(dim=-1, stable=True)
    s = selector_scores.gather(-1, order)
    v = values.gather(-1, order)
    # A tied block of s: every member gets the block's mean v (the pick among ties is uniform).
    same = s[..., :, None] == s[..., None, :]  # [P, N, N]
    v = (same.to(v.dtype) @ v[..., None]).squeeze(-1) / same.sum(-1).to(v.dtype)
    # C(i−1, n−1) / C(N, n) in log space (C(64, 32) is already 1.8e18), 0 below i = n.
    i = torch.arange(1, pool + 1, dtype=torch.float64, device=values.device)
    log_pool_subsets = math.lgamma(pool + 1) - math.lgamma(n + 1) - math.lgamma(pool - n + 1)
    log_weight = torch.lgamma(i) - math.lgamma(n) - torch.lgamma((i - n + 1).clamp(min=1)) - log_pool_subsets
    weight = torch.where(i >= n, log_weight.exp(), 0.0).to(v.dtype)
    return (weight * v).sum(-1)


def best_of_n_kl(n):
    """``KL(π_n ‖ π) = log n − (n − 1)/n`` for a selector without ties (an upper bound with ties).

    ``n`` a positive int or an int tensor; returns a float (or a float64 tensor of its shape).
    """
    if torch.is_tensor(n):
        if n.is_floating_point() or (n < 1).any():
            raise ValueError(f"best_of_n_kl: n must hold ints ≥ 1, got {n}")
        n = n.to(torch.float64)
        return n.log() - (n - 1) / n
    if not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"best_of_n_kl: n must be an int ≥ 1, got {n!r}")
    return math.log(n) - (n - 1) / n
