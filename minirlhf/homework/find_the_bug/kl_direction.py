"""Find the bug (2 of 3), solved: the ratio in k3 was upside down.

The bug::

    log_rho = logprobs - ref_logprobs     # wrong: log(π / π_ref)
    log_rho = ref_logprobs - logprobs     # right: log ρ = log(π_ref / π)

k3 = (ρ − 1) − log ρ is unbiased for KL(π ‖ π_ref) only because E_{y∼π}[ρ] = Σ_y π(y) ·
π_ref(y)/π(y) = 1, so the (ρ − 1) term has mean zero and what is left is E_π[−log ρ] = KL(π ‖
π_ref). With the ratio inverted, E_π[π/π_ref] = Σ_y π(y)²/π_ref(y) ≥ 1, so the estimator's
mean is E_π[π/π_ref] − 1 − KL(π ‖ π_ref) = χ²(π ‖ π_ref) − KL(π ‖ π_ref): a different
divergence, which agrees with the KL to second order near π = π_ref and not beyond.

Why it is silent: both versions are ≥ 0 everywhere, both are 0 when π = π_ref, both have the
same second-order behaviour near π = π_ref (both ≈ ½ (log ρ)²), so while the policy stays
close to the reference every number looks right. The property that catches it: the expectation
of the estimator under π (exact on a small categorical, or a Monte-Carlo mean) against the exact
KL of a policy that has moved far from the reference (``minirlhf/homework/checks/find_the_bug_kl.py``; Schulman,
"Approximating KL divergence", 2020, http://joschu.net/blog/kl-approx.html).
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
    log_rho = ref_logprobs - logprobs
    return torch.expm1(log_rho) - log_rho
