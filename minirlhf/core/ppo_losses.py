"""PPO's clipped policy and value losses (Schulman et al. 2017), per token over a response mask."""
import torch

from minirlhf.core.aggregation import aggregate_token_losses
from minirlhf.core.kl import kl_penalty
from minirlhf.core.masked import masked_mean
from minirlhf.core.shapes import check_shapes


def clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps=0.2):
    """Per-token PPO-clip loss ``−min(ρ A, clip(ρ, 1−ε, 1+ε) A)`` with ``ρ = exp(log π − log π_old)``.

    The min is pessimistic: once ``ρ`` has moved past ``1+ε`` with ``A > 0`` (or below ``1−ε``
    with ``A < 0``) the clipped term is the smaller one, it does not depend on ``π``, and the
    token's gradient is 0. Moving ``ρ`` the *other* way is never clipped, so a bad step can
    always be undone. Gradient w.r.t. ``log π``: ``−ρ A`` where unclipped, 0 where clipped.

    Shapes: ``logprobs``, ``old_logprobs`` ``[B, T]`` float (or any one shape ``[B, ...]``, e.g.
    ``[N]`` single tokens). ``advantages`` in one of two layouts:
      - ``[B, T]`` (the shape of ``logprobs``): one per token, e.g. GAE's for PPO;
      - ``[B]``: one per sequence, shared by all its tokens, e.g. GRPO's group advantage. It is
        reshaped to ``[B, 1]`` here, before the formula, so it meets each row's tokens.
    Anything else raises: a ``[B, 1]`` would broadcast into the wrong shape in ``grpo_loss``,
    and ``[T]`` would silently give each *column* an advantage. Returns ``(token_losses,
    clipped)``, both of ``logprobs``' shape: ``clipped`` is True where the clipped branch is
    active (strictly smaller), i.e. where the gradient is 0. No mask: the caller aggregates.

    Hint: ``torch.clamp`` the ratio; the clipped branch is active where it is strictly smaller.
    """
    check_shapes(
        "clipped_surrogate",
        logprobs=(logprobs, "B ...", "float"),
        old_logprobs=(old_logprobs, "B ...", "float"),
        advantages=(advantages, ("B ...", "B"), "float"),
        clip_eps=(clip_eps, "scalar"),
    )
    if advantages.dim() < logprobs.dim():  # one per sequence: [B] -> [B, 1], the same for every token
        advantages = advantages.reshape(-1, *[1] * (logprobs.dim() - 1))
    # BEGIN SOLUTION
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped
    # END SOLUTION


def ppo_policy_loss(
    logprobs, old_logprobs, advantages, mask, clip_eps=0.2, aggregation="token_mean", max_len=None
):
    """PPO-clip policy loss over response tokens.

    ``L = agg_t[ −min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t) ]`` (see ``clipped_surrogate``), reduced
    over the tokens where ``mask`` is 1 by ``aggregate_token_losses(aggregation, max_len)``.

    Shapes: ``logprobs`` (with gradient), ``old_logprobs``, ``mask`` ``[B, T]``; ``advantages``
    ``[B, T]`` (one per token, GAE's) or ``[B]`` (one per sequence, shared by its tokens, also
    when ``B == T``; see ``clipped_surrogate``). Returns ``(loss, clip_fraction, approx_kl)``, all
    scalars; the last two are detached diagnostics averaged over all valid tokens:
    ``clip_fraction`` = fraction of tokens on the clipped branch; ``approx_kl`` = mean of ``k3``
    for KL(π_old‖π), the right direction for tokens sampled from π_old: ``(ρ − 1) − log ρ``
    (always ≥ 0).

    Hint: ``clipped_surrogate`` per token, ``aggregate_token_losses`` over the mask, and the two
    diagnostics with ``masked_mean`` under ``torch.no_grad()``.
    """
    check_shapes(
        "ppo_policy_loss",
        logprobs=(logprobs, "B T", "float"),
        old_logprobs=(old_logprobs, "B T", "float"),
        advantages=(advantages, ("B T", "B"), "float"),
        mask=(mask, "B T"),
        clip_eps=(clip_eps, "scalar"),
    )
    # BEGIN SOLUTION
    token_losses, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps)
    loss = aggregate_token_losses(token_losses, mask, aggregation, max_len)
    with torch.no_grad():
        clip_fraction = masked_mean(clipped.to(token_losses.dtype), mask)
        approx_kl = masked_mean(kl_penalty(old_logprobs, logprobs, "k3"), mask)
    return loss, clip_fraction, approx_kl
    # END SOLUTION


def ppo_value_loss(
    values, old_values, returns, mask, clip_range=0.2, aggregation="token_mean", max_len=None
):
    """Clipped value loss ``½ · max((V − R)², (V_old + clip(V − V_old, −c, c) − R)²)`` per token.

    Like the policy clip, the max is pessimistic, and it only ever removes the incentive to move
    *further in the direction that helps*: a token whose new prediction ``V`` is more than ``c``
    from the rollout's ``V_old`` and whose clipped version has the larger error gets no gradient.
    That is a prediction whose move *reduced* the error (towards ``R``) beyond the clip range: it
    may not move further this update. A prediction that moved away from ``R`` keeps its full
    gradient ``V − R``, which pulls it back. With ``V_old = 0``, ``R = 1``, ``c = 0.2``:
    ``V = 0.5`` gets gradient 0 (clipped to 0.2, error 0.8 > 0.5), ``V = −0.5`` gets ``−1.5``
    (clipped to −0.2, error 1.2 < 1.5). Reduced over the tokens where ``mask`` is 1 by
    ``aggregate_token_losses(aggregation, max_len)``. Gradient w.r.t. ``V``: ``V − R`` where the
    unclipped term is used, 0 where the clipped term is strictly larger.

    Shapes: ``values`` (with gradient), ``old_values``, ``returns`` (float), ``mask`` ``[B, T]``
    (a value head's ``[B, T, 1]`` must be squeezed first); ``clip_range`` a scalar. Returns
    ``(loss, clip_fraction)``: scalars; ``clip_fraction`` (detached) is the fraction of valid
    tokens on the clipped branch.

    Hint: clip the *change* ``V − V_old`` to ``[−c, c]``, then take the larger squared error.
    """
    check_shapes(
        "ppo_value_loss",
        values=(values, "B T", "float"),
        old_values=(old_values, "B T", "float"),
        returns=(returns, "B T", "float"),
        mask=(mask, "B T"),
        clip_range=(clip_range, "scalar"),
    )
    # BEGIN SOLUTION
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_loss = 0.5 * (values - returns) ** 2
    clipped_loss = 0.5 * (clipped_values - returns) ** 2
    loss = aggregate_token_losses(torch.maximum(unclipped_loss, clipped_loss), mask, aggregation, max_len)
    clip_fraction = masked_mean((clipped_loss > unclipped_loss).to(values.dtype), mask).detach()
    return loss, clip_fraction
    # END SOLUTION
