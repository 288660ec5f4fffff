"""PPO's adaptive KL controller (Ziegler et al. 2019): steer β so that the measured KL(π‖π_ref) per
response approaches a target.

A proportional controller: when the KL is above the target, β grows (the penalty pulls harder);
below it, β shrinks. The error is clipped to ±20%, and ``n / horizon`` sets how fast β moves, so
one noisy batch cannot swing it.
"""


def adapt_kl_coef(beta, kl, target, n, horizon):
    """``β·(1 + e·n/horizon)`` with ``e = clip(KL/KL_target − 1, −0.2, 0.2)`` for ``n`` responses
    seen this update (``kl``: the measured KL per response, in nats)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n / horizon)
