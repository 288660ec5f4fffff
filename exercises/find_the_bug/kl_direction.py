"""Find the bug (2 of 3): the k3 estimator of the KL penalty.

This function runs, returns the right shape, and is never negative, just like the real k3. It
is wrong. Find the one line that is wrong and fix it (keep the signature).

Hint: on a small categorical distribution, compute KL(π‖π_ref) exactly, then average the
estimator over many tokens sampled from π. Which ratio is ρ?
"""
import torch


def k3_penalty(logprobs, ref_logprobs):
    """Per-token k3 estimate of ``KL(π ‖ π_ref)`` for tokens sampled from ``π`` (Schulman, 2020).

    ``k3 = (ρ − 1) − log ρ`` with ``ρ = π_ref(y_t) / π(y_t)``. Because ``E_π[ρ] = 1``, the mean
    of k3 over samples from π is exactly ``KL(π ‖ π_ref)``; and ``ρ − 1 ≥ log ρ`` makes every
    single estimate ≥ 0 (unlike k1 = −log ρ, which is unbiased but often negative).

    Shapes: ``logprobs`` and ``ref_logprobs`` ``[B, T]`` (``log π(y_t)``, ``log π_ref(y_t)``);
    returns ``[B, T]``.
    """
    log_rho = logprobs - ref_logprobs
    return torch.expm1(log_rho) - log_rho
