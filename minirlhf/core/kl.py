"""Per-token estimators of KL(π‖π_ref), and the KL-shaped rewards of RLHF-PPO.

The estimators follow J. Schulman, "Approximating KL Divergence" (2020). With tokens sampled from
π and ``log r = log π_ref(y) − log π(y)``:

- ``k1 = −log r = log π − log π_ref``: unbiased, high variance, negative on some samples.
- ``k2 = ½ (log r)²``: always ≥ 0, low variance, biased (its bias is third order in the gap
  between π and π_ref, so small when they are close).
- ``k3 = (r − 1) − log r``: unbiased (E_π[r] = 1) *and* ≥ 0 (since ``log r ≤ r − 1``), low
  variance. GRPO puts it in the loss.
"""
import torch

from minirlhf.core.shapes import check_shapes

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Per-token estimate of KL(π‖π_ref) for tokens sampled from π.

    With ``Δ = log π − log π_ref``:
      - ``"k1"``: ``Δ``
      - ``"k2"``: ``½ Δ²``
      - ``"k3"``: ``e^{−Δ} − (−Δ) − 1``, computed as ``expm1(−Δ) + Δ``: ``exp(−Δ) − 1`` would
        cancel catastrophically for small Δ (and can go below 0 in float32); ``expm1`` keeps
        ``k3 ≥ 0`` and accurate. It is finite for every Δ whose ``e^{−Δ}`` is representable
        (Δ > −88 in float32).

    Shapes: ``logprobs``, ``ref_logprobs`` float, of one shape (e.g. ``[B, T]``; never broadcast)
    -> that shape. No mask: apply one to the result. Raises ValueError for an unknown estimator.

    Hint: write ``e^x − x − 1`` with ``torch.expm1``.
    """
    check_shapes("kl_penalty", logprobs=(logprobs, "...", "float"), ref_logprobs=(ref_logprobs, "...", "float"))
    # BEGIN SOLUTION
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")
    # END SOLUTION


def kl_shaped_rewards(score, logprobs, ref_logprobs, mask, beta, estimator="k1"):
    """Per-token rewards of RLHF-PPO: a KL penalty on every response token, the score at the end.

    ``r_t = −β · kl_t + 1[t = last valid token] · score``, with ``kl_t = kl_penalty(logπ_t,
    logπ_ref_t, estimator)`` (Ziegler et al. 2019; Ouyang et al. 2022). The last valid token is
    the last position where ``mask`` is 1 in each row, so left- and right-padded batches (and
    any other layout) get the score on the same token (the response's EOS when it has one).

    Shapes: ``score`` ``[B]`` (the reward model's scalar per response); ``logprobs``,
    ``ref_logprobs`` (float), ``mask`` ``[B, T]``; ``beta`` a scalar. Returns ``(rewards, kl)``,
    both ``[B, T]`` and 0 where ``mask`` is 0. The inputs come from the rollout, so no gradient
    is expected to flow here. Raises ValueError for a row with no valid token (its score would
    have nowhere to go).

    Hint: the last valid index of a row is the largest ``t`` with ``mask[t] = 1``.
    """
    check_shapes(
        "kl_shaped_rewards",
        logprobs=(logprobs, "B T", "float"),
        ref_logprobs=(ref_logprobs, "B T", "float"),
        mask=(mask, "B T"),
        score=(score, "B"),
        beta=(beta, "scalar"),
    )
    # BEGIN SOLUTION
    valid = mask.bool()
    empty_rows = (~valid.any(dim=-1)).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(f"kl_shaped_rewards: rows {empty_rows} have no valid token in mask to put the score on")
    kl = torch.where(valid, kl_penalty(logprobs, ref_logprobs, estimator), torch.zeros_like(logprobs))
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(valid)
    last = torch.where(valid, positions, -1).max(dim=-1).values
    rewards = (-beta * kl).scatter_add(-1, last[:, None], score[:, None].to(kl.dtype))
    return rewards, kl
    # END SOLUTION
