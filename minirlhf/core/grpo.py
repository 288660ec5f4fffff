"""Critic-free advantages from groups of samples per prompt (GRPO, Dr. GRPO, RLOO) and GRPO's loss.

Layout: ``rewards`` is ``[N]`` with ``N = num_prompts · group_size``, laid out group by group:
``rewards[p·G : (p+1)·G]`` are the ``G`` responses to prompt ``p`` (what
``prompts.repeat_interleave(G)`` produces), so ``rewards.view(num_prompts, G)`` has one prompt
per row.
"""
import numbers

import torch

from minirlhf.core.aggregation import aggregate_token_losses
from minirlhf.core.kl import kl_penalty
from minirlhf.core.masked import masked_mean
from minirlhf.core.ppo_losses import clipped_surrogate
from minirlhf.core.shapes import check_shapes

GROUP_SCALES = ("std", None)


def _check_group_size(function, rewards, group_size):
    """``group_size`` must be an int ≥ 2 that divides ``N = len(rewards)``."""
    if not isinstance(group_size, numbers.Integral) or group_size < 2:
        raise ValueError(f"{function}: group_size must be an int, at least 2 (a baseline needs other samples), "
                         f"got {group_size!r}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(f"{function}: rewards must have a length divisible by group_size={group_size}, "
                         f"got {list(rewards.shape)}")


def group_advantages(rewards, group_size, scale="std", eps=1e-4):
    """GRPO's outcome advantage: each response's reward relative to its group.

    ``scale="std"`` (GRPO, Shao et al. 2024): ``Â_i = (r_i − mean_g) / (std_g + eps)``, with the
    unbiased std of the group (as TRL). ``scale=None`` (Dr. GRPO, Liu et al. 2025):
    ``Â_i = r_i − mean_g``; dividing by ``std_g`` up-weights prompts that are nearly always (or
    never) solved, a question-difficulty bias. A group whose rewards are all equal carries no
    signal and gets exactly 0 (not ``0/eps`` rounding noise, never NaN).

    Shapes: ``rewards`` ``[N]`` float (1-D: not ``[P, G]``), laid out group by group (module
    docstring) -> ``[N]``. Raises ValueError if ``N`` is not a multiple of ``group_size``,
    ``group_size`` is not an int ≥ 2, or ``scale`` is unknown.

    Hint: ``view(-1, group_size)``, reduce over the last dimension, and mask constant groups.
    """
    check_shapes("group_advantages", rewards=(rewards, "N", "float"), eps=(eps, "scalar"))
    _check_group_size("group_advantages", rewards, group_size)
    # BEGIN SOLUTION
    if scale not in GROUP_SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected 'std' or None")
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=-1, keepdim=True)
    if scale == "std":
        advantages = advantages / (grouped.std(dim=-1, keepdim=True) + eps)
    # Exact zeros for constant groups: their mean can differ from r_i by a rounding error.
    constant = (grouped == grouped[:, :1]).all(dim=-1, keepdim=True)
    return torch.where(constant, torch.zeros_like(advantages), advantages).flatten()
    # END SOLUTION


def rloo_advantages(rewards, group_size):
    """REINFORCE leave-one-out advantage (Kool et al. 2019; Ahmadian et al. 2024).

    ``Â_i = r_i − (1/(G−1)) Σ_{j≠i} r_j = r_i − (Σ_g − r_i)/(G − 1)``: the baseline of each sample
    is the mean of the *other* samples of its group, so it is independent of ``r_i`` and the
    gradient estimate stays unbiased. Equivalently ``Â_i = G/(G−1) · (r_i − mean_g)``.

    Shapes: ``rewards`` ``[N]`` float (1-D: not ``[P, G]``), laid out group by group (module
    docstring) -> ``[N]``. Raises ValueError if ``group_size`` is not an int ≥ 2 or ``N`` is not
    a multiple of it.

    Hint: the group sum minus ``r_i`` is the sum of the others.
    """
    check_shapes("rloo_advantages", rewards=(rewards, "N", "float"))
    _check_group_size("rloo_advantages", rewards, group_size)
    # BEGIN SOLUTION
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).flatten()
    # END SOLUTION


def grpo_loss(
    logprobs,
    old_logprobs,
    ref_logprobs,
    advantages,
    mask,
    clip_eps=0.2,
    beta=0.04,
    aggregation="sequence_mean",
    max_len=None,
):
    """GRPO loss: PPO's clipped surrogate with one advantage per sequence, plus a k3 KL penalty.

    ``ℓ_{i,t} = −min(ρ_{i,t} Â_i, clip(ρ_{i,t}, 1−ε, 1+ε) Â_i) + β · k3_{i,t}``, with
    ``k3 = e^{logπ_ref − logπ} − (logπ_ref − logπ) − 1`` (unbiased for KL(π‖π_ref), ≥ 0), reduced
    over the tokens where ``mask`` is 1 by ``aggregate_token_losses``: ``"sequence_mean"`` is the
    GRPO paper, ``"token_mean"`` DAPO, ``"fixed_length"`` Dr. GRPO (pass ``max_len`` = the
    generation budget); see ``minirlhf/core/aggregation.py`` for their length biases. With
    ``β = 0`` (DAPO, Dr. GRPO) the KL term is left out of the loss (still measured).

    Shapes: ``logprobs`` (with gradient), ``old_logprobs``, ``ref_logprobs``, ``mask`` ``[B, T]``;
    ``advantages`` ``[B]`` (one per sequence, e.g. from ``group_advantages``, shared by each
    row's tokens, also when ``B == T``) or ``[B, T]`` (one per token, e.g. process rewards). A
    ``[B, 1]`` raises: it is neither, and broadcasting it gave ``[B, B, T]`` losses.
    Returns ``(loss, clip_fraction, kl)``: scalars; ``clip_fraction`` and ``kl`` (mean k3 over
    valid tokens) are detached diagnostics.

    Hint: ``clipped_surrogate`` (it takes ``[B]`` or ``[B, T]`` advantages), plus ``β · kl_penalty(..., "k3")``
    (left out when β = 0: ``0 · inf`` is NaN), then ``aggregate_token_losses``.
    """
    check_shapes(
        "grpo_loss",
        logprobs=(logprobs, "B T", "float"),
        old_logprobs=(old_logprobs, "B T", "float"),
        ref_logprobs=(ref_logprobs, "B T", "float"),
        advantages=(advantages, ("B", "B T"), "float"),
        mask=(mask, "B T"),
        clip_eps=(clip_eps, "scalar"),
        beta=(beta, "scalar"),
    )
    # BEGIN SOLUTION
    token_losses, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps)
    kl = kl_penalty(logprobs, ref_logprobs, "k3")
    if beta != 0:
        token_losses = token_losses + beta * kl
    loss = aggregate_token_losses(token_losses, mask, aggregation, max_len)
    with torch.no_grad():
        clip_fraction = masked_mean(clipped.to(token_losses.dtype), mask)
        mean_kl = masked_mean(kl, mask)
    return loss, clip_fraction, mean_kl
    # END SOLUTION
