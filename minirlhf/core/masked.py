"""Masked reductions: sums, means, variance and whitening over the tokens that count.

``mask`` is 1 (or True) where an element counts and 0 elsewhere; bool and 0/1 float masks are
both accepted (any nonzero counts as 1). It has exactly the shape of ``x`` (any shape, e.g.
``[B, T]``): it is never broadcast, since a ``[B]`` mask against ``[B, T]`` values would mask
*columns* when ``B == T`` instead of raising. Masked-out elements
never reach the result, even when they hold inf or NaN (padding log-probs can), because they are
selected away with ``torch.where`` instead of multiplied by 0.
"""
import torch

from minirlhf.core.shapes import check_shapes


def masked_sum(x, mask, dim=None):
    """``Σ_i mask_i · x_i`` over ``dim`` (all elements when ``dim`` is None).

    Shapes: ``x`` and ``mask`` of one shape, e.g. ``[B, T]``; the result drops ``dim`` (a scalar
    when ``dim`` is None). An all-masked row sums to 0.
    """
    check_shapes("masked_sum", x=(x, "..."), mask=(mask, "..."))
    kept = torch.where(mask.bool(), x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x, mask, dim=None):
    """``Σ_i mask_i · x_i / Σ_i mask_i`` over ``dim`` (all elements when ``dim`` is None).

    Shapes: ``x`` and ``mask`` of one shape, e.g. ``[B, T]``; the result drops ``dim``.
    An all-masked row has no mean; we define it as 0 (its count is clamped to 1), so it never
    produces NaN and contributes no gradient.

    Hint: count the valid elements with the mask; guard the division for all-masked rows.
    """
    check_shapes("masked_mean", x=(x, "..."), mask=(mask, "..."))
    # BEGIN SOLUTION
    count = masked_sum(torch.ones_like(x), mask, dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)
    # END SOLUTION


def masked_var(x, mask, unbiased=True):
    """Variance of the valid elements of ``x``, over all of them (a scalar).

    ``Var = Σ_i mask_i (x_i − μ)² / (n − 1)`` with ``μ = masked_mean(x, mask)`` and
    ``n = Σ_i mask_i`` (divide by ``n`` when ``unbiased=False``).

    Shapes: ``x`` and ``mask`` of one shape, e.g. ``[B, T]``. Raises ValueError when there are
    too few valid elements for a variance (n < 2 unbiased, n < 1 biased) rather than returning
    NaN or a silent 0. (This reads ``n`` back to the host.)
    """
    check_shapes("masked_var", x=(x, "..."), mask=(mask, "..."))
    n = int(masked_sum(torch.ones_like(x), mask))
    needed = 2 if unbiased else 1
    if n < needed:
        raise ValueError(
            f"masked_var: mask has {n} valid element(s); "
            f"{'an unbiased' if unbiased else 'a'} variance needs at least {needed}"
        )
    centered = x - masked_mean(x, mask)
    return masked_sum(centered**2, mask) / (n - 1 if unbiased else n)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """Whiten the valid elements of ``x`` with their own mean and (unbiased) variance.

    ``x̂_i = (x_i − μ) / sqrt(σ² + eps)``; with ``shift_mean=False`` the mean is added back,
    ``x̂_i = (x_i − μ) / sqrt(σ² + eps) + μ``, which rescales without re-centering (PPO's reward
    whitening keeps the sign of the mean reward). ``μ`` and ``σ²`` are taken over all valid
    elements of the whole tensor (e.g. every response token of the batch).

    Shapes: ``x`` and ``mask`` of one shape, e.g. ``[B, T]``; returns ``x``'s shape, with 0
    where ``mask`` is 0. Raises ValueError with fewer than 2 valid elements (see ``masked_var``).

    Hint: reuse ``masked_mean`` and ``masked_var``; zero the masked positions at the end.
    """
    check_shapes("masked_whiten", x=(x, "..."), mask=(mask, "..."), eps=(eps, "scalar"))
    # BEGIN SOLUTION
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))
    # END SOLUTION
