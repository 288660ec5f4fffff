"""Checks of the ``gae`` exercise: ``gae_advantages`` (core/gae.py)."""
import torch

from minirlhf.homework.check import Check, permutation, random, random_response_mask, to_left_padded


def brute_force_gae(rewards, values, mask, gamma, lam):
    """``A_t = Σ_l (γλ)^l δ_{t+l}`` with Python loops over each row's valid tokens only."""
    advantages = torch.zeros_like(values)
    for i in range(values.shape[0]):
        steps = mask[i].nonzero().flatten().tolist()
        r, v = rewards[i, steps].tolist(), values[i, steps].tolist() + [0.0]  # V after the end is 0
        deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(len(steps))]
        for k, t in enumerate(steps):
            advantages[i, t] = sum((gamma * lam) ** l * deltas[k + l] for l in range(len(steps) - k))
    return advantages


def rollout(seed, batch_size=6, num_tokens=9, **extra):
    return {"rewards": random(batch_size, num_tokens, seed=seed), "values": random(batch_size, num_tokens, seed=seed + 1),
            "mask": random_response_mask(batch_size, num_tokens, seed=seed + 2), **extra}


def gae(f, x, **override):
    args = {k: x[k] for k in ("rewards", "values", "mask", "gamma", "lam")} | override
    advantages, returns = f.gae_advantages(args["rewards"], args["values"], args["mask"], args["gamma"], args["lam"])
    return {"advantages": advantages, "returns": returns}


def expect_brute_force(x, got):
    advantages = brute_force_gae(x["rewards"], x["values"], x["mask"], x["gamma"], x["lam"])
    return {"advantages": advantages, "returns": torch.where(x["mask"], advantages + x["values"], 0.0)}


def monte_carlo(x, got):
    """λ = 1: A_t = Σ_{k≥t} γ^{k−t} r_k − V_t, returns = the Monte-Carlo return (right-padded rows)."""
    rewards, values, mask, gamma = x["rewards"], x["values"], x["mask"], x["gamma"]
    returns = torch.zeros_like(values)
    for i in range(len(mask)):
        n = int(mask[i].sum())
        for t in range(n):
            returns[i, t] = sum(gamma ** (k - t) * rewards[i, k] for k in range(t, n))
    return {"advantages": torch.where(mask, returns - values, 0.0), "returns": returns}


def td_error(x, got):
    rewards, values, mask, gamma = x["rewards"], x["values"], x["mask"], x["gamma"]
    next_is_valid = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)  # right-padded rows
    next_values = torch.where(next_is_valid, values.roll(-1, dims=1), 0.0)
    return {"advantages": torch.where(mask, rewards + gamma * next_values - values, 0.0)}


def left_padded(f, x):
    left = {k: to_left_padded(x[k], x["mask"]) for k in ("rewards", "values", "mask")}
    return {"right-padded": gae(f, x), "left-padded": gae(f, x, **left)}


def wide(f, x):
    mask, pad = x["mask"], torch.full((len(x["mask"]), 4), 1e6, dtype=torch.float64)
    garbage = {"rewards": torch.cat([torch.where(mask, x["rewards"], 1e6), pad], 1),
               "values": torch.cat([torch.where(mask, x["values"], -1e6), pad], 1),
               "mask": torch.cat([mask, pad < 0], 1)}
    return {"narrow": gae(f, x), "garbage in the padding, 4 extra columns": gae(f, x, **garbage)}


def permuted(f, x):
    order = permutation(len(x["mask"]), seed=0)
    return {"in order": gae(f, x), "rows permuted": gae(f, x, **{k: x[k][order] for k in ("rewards", "values", "mask")}),
            "order": order}


def split(f, x):
    halves = [gae(f, x, **{k: x[k][s] for k in ("rewards", "values", "mask")}) for s in (slice(0, 2), slice(2, None))]
    return {"whole batch": gae(f, x), "rows 0-1 and 2-5 separately": {
        k: torch.cat([h[k] for h in halves]) for k in ("advantages", "returns")}}


def no_gradient(f, x):
    x["values"].requires_grad_(True)
    out = gae(f, x)
    return out | {"advantages need no gradient": not out["advantages"].requires_grad,
                  "returns need no gradient": not out["returns"].requires_grad}


def holes():
    x = rollout(40, batch_size=3, num_tokens=8, gamma=0.9, lam=0.7)
    x["mask"] = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 1], [0, 1, 0, 1, 0, 1, 0, 1], [1, 0, 0, 0, 0, 0, 0, 0]]).bool()
    return x


def empty_row():
    x = rollout(50, gamma=1.0, lam=0.95)
    x["mask"][1] = False
    return x


CHECKS = [
    *[Check(f"right-padded batch, γ = {gamma}, λ = {lam}: the brute-force sum Σ_l (γλ)^l δ_(t+l)",
            lambda gamma=gamma, lam=lam, seed=seed: rollout(seed, gamma=gamma, lam=lam), gae, expect_brute_force)
      for seed, (gamma, lam) in enumerate([(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.5, 0.0)])],
    Check("λ = 1: the Monte-Carlo return minus V_t (returns: the Monte-Carlo return)",
          lambda: rollout(10, gamma=0.9, lam=1.0), gae, monte_carlo),
    Check("λ = 0: the TD error δ_t = r_t + γV_(t+1) − V_t", lambda: rollout(20, gamma=0.8, lam=0.0), gae, td_error,
          hint="after the last valid token V = 0: the episode ends there"),
    Check("γ = λ = 1, V = 0, one reward at the end: every token's advantage is that reward",
          lambda: {"rewards": torch.tensor([[0, 0, 2.0, 0], [0, 0, 0, -1.0]], dtype=torch.float64),
                   "values": torch.zeros(2, 4, dtype=torch.float64),
                   "mask": torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]]).bool(), "gamma": 1.0, "lam": 1.0},
          gae, lambda x, got: {"advantages": torch.tensor([[2, 2, 2, 0], [0, -1, -1, -1]], dtype=torch.float64),
                               "returns": torch.tensor([[2, 2, 2, 0], [0, -1, -1, -1]], dtype=torch.float64)}),
    Check("left-padded batch: the right-padded result, moved", lambda: rollout(30, gamma=0.95, lam=0.9), left_padded,
          lambda x, got: {"left-padded": {k: to_left_padded(v, x["mask"]) for k, v in got["right-padded"].items()}},
          hint="time runs over the valid tokens: do not assume the response starts at column 0"),
    Check("garbage (±1e6) at masked positions and 4 extra padding columns change nothing",
          lambda: rollout(31, gamma=0.95, lam=0.9), wide,
          lambda x, got: {"garbage in the padding, 4 extra columns": {
              k: torch.cat([v, torch.zeros(len(v), 4, dtype=v.dtype)], 1) for k, v in got["narrow"].items()}},
          hint="rewards and values at masked positions must never be read"),
    Check("rows permuted: the results permuted the same way", lambda: rollout(32, gamma=0.95, lam=0.9), permuted,
          lambda x, got: {"rows permuted": {k: v[got["order"]] for k, v in got["in order"].items()}}),
    Check("the batch split in two: the same results", lambda: rollout(33, gamma=0.95, lam=0.9), split,
          lambda x, got: {"rows 0-1 and 2-5 separately": got["whole batch"]}),
    Check("holes in the mask (a masked tool output inside a response) are skipped, not time steps",
          holes, gae, expect_brute_force, hint="t+1 is the next position where the mask is 1"),
    Check("row 1 all masked: zeros there; advantages and returns carry no gradient (fixed targets)",
          empty_row, no_gradient,
          lambda x, got: expect_brute_force(x, got) | {"advantages need no gradient": True,
                                                       "returns need no gradient": True}),
]
