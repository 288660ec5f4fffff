"""Generalised Advantage Estimation (Schulman et al. 2016) over masked token sequences."""
import torch

from minirlhf.core.shapes import check_shapes


@torch.no_grad()
def gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95):
    """GAE advantages and value targets for one batch of rollouts.

    ``δ_t = r_t + γ V_{t+1} − V_t`` and ``A_t = δ_t + γλ A_{t+1}`` (so ``A_t = Σ_l (γλ)^l δ_{t+l}``),
    returns ``R_t = A_t + V_t``. Time runs over the *valid* tokens of each row only: ``t+1`` is the
    next position where ``mask`` is 1, and after the last valid token ``V = 0`` and ``A = 0`` (the
    episode ends there). So any padding layout (left, right, holes) gives the same result; rewards
    and values at masked positions are ignored. ``λ = 1`` gives the Monte-Carlo return minus
    ``V_t``; ``λ = 0`` gives the TD error ``δ_t``.

    Shapes: ``rewards``, ``values`` (float), ``mask`` ``[B, T]``, all aligned: ``values`` holds no
    extra bootstrap column (the value after the last valid token is 0), so ``rewards [B, T+1]``
    is an error, not a dropped column. ``gamma``, ``lam`` scalars. Returns ``(advantages,
    returns)``, both ``[B, T]`` and 0 where ``mask`` is 0. Runs under ``torch.no_grad``:
    advantages and returns are fixed targets, no gradient flows into the values that produced them.

    Hint: loop backwards over ``t`` (vectorised over the batch), carrying ``V_{t+1}`` and
    ``A_{t+1}`` across masked positions.
    """
    check_shapes(
        "gae_advantages",
        rewards=(rewards, "B T", "float"),
        values=(values, "B T", "float"),
        mask=(mask, "B T"),
        gamma=(gamma, "scalar"),
        lam=(lam, "scalar"),
    )
    # BEGIN SOLUTION
    valid = mask.bool()
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])
    next_advantage = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # A masked position is skipped: it keeps what the next valid token carried.
        advantages[:, t] = torch.where(valid[:, t], advantage, 0.0)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_advantage = torch.where(valid[:, t], advantage, next_advantage)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns
    # END SOLUTION
