"""How per-token losses become one scalar, and the length bias each choice brings.

Every policy-gradient loss here (PPO, GRPO) first computes a loss per response token, ``[B, T]``,
then calls ``aggregate_token_losses``. The three choices weigh tokens differently:

- ``"sequence_mean"`` (GRPO paper, Shao et al. 2024): ``(1/B') Σ_i (1/|o_i|) Σ_t ℓ_{i,t}``, where
  ``B'`` counts the rows with at least one valid token. Each *sequence* weighs equally, so a token
  of a short response weighs more than a token of a long one. With a negative advantage, long
  wrong answers are penalised less per token, which lets wrong answers grow longer (the bias
  Dr. GRPO points out, Liu et al. 2025).
- ``"token_mean"`` (DAPO, Yu et al. 2025; the usual PPO choice): ``Σ_{i,t} ℓ_{i,t} / Σ_i |o_i|``.
  Every *token* weighs equally, so long responses carry more total weight; but the normaliser
  ``Σ_i |o_i|`` still depends on the batch's lengths, so the scale of one sequence's gradient
  changes with what it was batched with.
- ``"fixed_length"`` (Dr. GRPO): ``Σ_{i,t} ℓ_{i,t} / (B · max_len)``, a constant normaliser, so no
  length normalisation bias at all. Pass ``max_len`` = the generation budget (max new tokens):
  the default ``T`` depends on how much padding this particular batch has.

Recombining a batch split in two (micro-batches, gradient accumulation): with ``n`` the number of
(non-empty) rows and ``N`` the number of valid tokens of each part, the full-batch value is
``(n₁L₁ + n₂L₂)/(n₁ + n₂)`` for ``sequence_mean``, ``(N₁L₁ + N₂L₂)/(N₁ + N₂)`` for
``token_mean`` (weigh by tokens, not by rows), and ``(B₁L₁ + B₂L₂)/(B₁ + B₂)`` for
``fixed_length`` with the same ``max_len``.
"""
import numbers

from minirlhf.core.masked import masked_mean, masked_sum
from minirlhf.core.shapes import check_shapes

AGGREGATIONS = ("sequence_mean", "token_mean", "fixed_length")


def aggregate_token_losses(token_losses, mask, aggregation="token_mean", max_len=None):
    """Reduce per-token losses ``[B, T]`` to a scalar over the tokens where ``mask`` is 1.

    ``aggregation`` (see the module docstring for each one's length bias):
      - ``"sequence_mean"``: ``(1/B') Σ_i (1/|o_i|) Σ_t mask_{i,t} ℓ_{i,t}`` over the ``B'`` rows
        that have a valid token (an all-masked row is skipped, not counted as a 0).
      - ``"token_mean"``: ``Σ_{i,t} mask_{i,t} ℓ_{i,t} / Σ_{i,t} mask_{i,t}``.
      - ``"fixed_length"``: ``Σ_{i,t} mask_{i,t} ℓ_{i,t} / (B · max_len)``, ``max_len`` defaults
        to ``T``.
    An all-masked batch gives 0 for every choice. Raises ValueError for an unknown name.

    Shapes: ``token_losses`` and ``mask`` ``[B, T]``; ``max_len`` None or a positive int.

    Hint: ``masked_mean`` with ``dim=-1`` gives the per-sequence means.
    """
    check_shapes("aggregate_token_losses", token_losses=(token_losses, "B T"), mask=(mask, "B T"))
    if max_len is not None and not (isinstance(max_len, numbers.Integral) and max_len >= 1):
        raise ValueError(f"aggregate_token_losses: max_len must be None or a positive int, got {max_len!r}")
    # BEGIN SOLUTION
    if aggregation == "sequence_mean":
        has_tokens = mask.bool().any(dim=-1)
        return masked_mean(masked_mean(token_losses, mask, dim=-1), has_tokens)
    if aggregation == "token_mean":
        return masked_mean(token_losses, mask)
    if aggregation == "fixed_length":
        batch_size, num_tokens = token_losses.shape
        return masked_sum(token_losses, mask) / (batch_size * (num_tokens if max_len is None else max_len))
    raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")
    # END SOLUTION
