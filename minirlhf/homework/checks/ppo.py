"""Checks of the ``ppo`` exercise: ``clipped_surrogate``, ``ppo_policy_loss`` and ``ppo_value_loss``
(core/ppo_losses.py)."""
import math

import torch

from minirlhf.homework.check import Check, gradients, leaves, permutation, random, random_response_mask, to_left_padded

EPS = 0.2
AGGREGATIONS = ("token_mean", "sequence_mean", "fixed_length")
# (advantage, ratio, clipped?) with ε = 0.2: the clip only removes the incentive to move further in
# the direction the advantage rewards; the other direction is never clipped.
POLICY_CASES = [(+1.0, 1.1, False), (+1.0, 1.5, True), (+1.0, 0.5, False),
                (-1.0, 1.1, False), (-1.0, 1.5, False), (-1.0, 0.5, True)]
# (old value, new value, return, clipped?) with c = 0.2: no gradient where the new value moved more
# than c from V_old AND the clipped error is the larger one.
VALUE_CASES = [(1.0, 1.1, 0.0, False), (1.0, 1.5, 0.0, False), (1.0, 0.5, 0.0, True),
               (1.0, 1.5, 2.0, True), (1.0, 0.5, 2.0, False)]


def weight_of(mask, aggregation):
    mask = mask.double()
    return {"token_mean": mask / mask.sum(), "sequence_mean": mask / mask.sum(-1, keepdim=True) / len(mask),
            "fixed_length": mask / mask.numel()}[aggregation]


def surrogate_case(advantage, ratio, clipped):
    def run(f, x):
        logprobs = (x["old"] + math.log(ratio)).requires_grad_(True)
        loss, is_clipped = f.clipped_surrogate(logprobs, x["old"], x["advantages"], EPS)
        return {"loss": loss, "clipped": is_clipped} | gradients({"loss": loss}, {"loss": 1.0}, {"log π": logprobs})

    def expect(x, got):
        used = min(max(ratio, 1 - EPS), 1 + EPS) if clipped else ratio
        return {"loss": torch.tensor([-used * advantage], dtype=torch.float64), "clipped": torch.tensor([clipped]),
                "∂L/∂log π": torch.tensor([0.0 if clipped else -ratio * advantage], dtype=torch.float64)}

    side = "above 1+ε" if ratio > 1 + EPS else "below 1−ε" if ratio < 1 - EPS else "inside [1−ε, 1+ε]"
    outcome = "clipped, gradient 0" if clipped else "ρA, gradient −ρA"
    return Check(f"clipped_surrogate, A = {advantage:+g}, ρ = {ratio} ({side}): {outcome}",
                 lambda: {"old": torch.tensor([-1.3], dtype=torch.float64),
                          "advantages": torch.tensor([advantage], dtype=torch.float64)}, run, expect,
                 hint="−min(ρA, clip(ρ)A): the clipped branch is active where it is strictly smaller")


def surrogate_batch():
    old = random(5, 7, seed=1)
    return {"old": old, "logprobs": old + 0.4 * random(5, 7, seed=2), "advantages": random(5, 7, seed=3),
            "w": random(5, 7, seed=4)}


def surrogate(f, x):
    inputs = leaves(x, ["logprobs"])
    loss, clipped = f.clipped_surrogate(x["logprobs"], x["old"], x["advantages"], EPS)
    return {"loss": loss, "clipped": clipped} | gradients({"loss": loss}, {"loss": x["w"]}, inputs)


def surrogate_expect(x, got):
    ratio, a = (x["logprobs"] - x["old"]).exp(), x["advantages"]
    clipped = ratio.clamp(1 - EPS, 1 + EPS) * a < ratio * a
    return {"loss": -torch.minimum(ratio * a, ratio.clamp(1 - EPS, 1 + EPS) * a), "clipped": clipped,
            "∂L/∂logprobs": x["w"] * torch.where(clipped, 0.0, -ratio * a)}


def value_with_gradient(f, x):
    inputs = leaves(x, ["values"])
    out = value(f, x)
    return out | gradients({"loss": out["loss"]}, {"loss": 1.0}, inputs)


def policy_batch(seed, **extra):
    mask = random_response_mask(6, 8, seed=seed)
    old = -3 * random(6, 8, seed=seed + 1).abs()
    return {"logprobs": old + 0.3 * random(6, 8, seed=seed + 2), "old": old, "advantages": random(6, 8, seed=seed + 3),
            "mask": mask} | extra


def policy(f, x, **override):
    args = {k: x[k] for k in ("logprobs", "old", "advantages", "mask")} | override
    loss, fraction, kl = f.ppo_policy_loss(args["logprobs"], args["old"], args["advantages"], args["mask"], EPS,
                                           x.get("aggregation", "token_mean"))
    return {"loss": loss, "clip_fraction": fraction, "approx_kl": kl}


def policy_gradient(f, x):
    inputs = leaves(x, ["logprobs"])
    out = policy(f, x)
    return out | gradients({"loss": out["loss"]}, {"loss": 1.0}, inputs) | {
        "diagnostics detached": not out["clip_fraction"].requires_grad and not out["approx_kl"].requires_grad}


def policy_expect(x, got):
    ratio, a, mask = (x["logprobs"] - x["old"]).exp(), x["advantages"], x["mask"]
    clipped = ratio.clamp(1 - EPS, 1 + EPS) * a < ratio * a
    token_losses = -torch.minimum(ratio * a, ratio.clamp(1 - EPS, 1 + EPS) * a)
    weight = weight_of(mask, x["aggregation"])
    return {"loss": (weight * token_losses).sum(), "clip_fraction": clipped[mask].double().mean(),
            "approx_kl": ((ratio - 1) - ratio.log())[mask].mean(), "diagnostics detached": True,
            "∂L/∂logprobs": weight * torch.where(clipped, 0.0, -ratio * a)}


def value_case(old_value, value, target, clipped):
    def run(f, x):
        values = torch.tensor([[value]], dtype=torch.float64, requires_grad=True)
        loss, fraction = f.ppo_value_loss(values, torch.tensor([[old_value]], dtype=torch.float64),
                                          torch.tensor([[target]], dtype=torch.float64), torch.ones(1, 1), clip_range=0.2)
        return {"loss": loss, "clip_fraction": fraction} | gradients({"loss": loss}, {"loss": 1.0}, {"V": values})

    def expect(x, got):
        used = min(max(value, old_value - 0.2), old_value + 0.2) if clipped else value
        return {"loss": torch.tensor(0.5 * (used - target) ** 2, dtype=torch.float64),
                "clip_fraction": torch.tensor(float(clipped), dtype=torch.float64),
                "∂L/∂V": torch.tensor([[0.0 if clipped else value - target]], dtype=torch.float64)}

    return Check(f"ppo_value_loss, V_old = {old_value}, V = {value}, R = {target}: "
                 f"{'clipped, gradient 0' if clipped else 'unclipped, gradient V − R'}", lambda: {}, run, expect,
                 hint="clip the change V − V_old to [−c, c], then take the LARGER squared error")


def value_batch(seed, **extra):
    old = random(5, 6, seed=seed)
    return {"values": old + 0.4 * random(5, 6, seed=seed + 1), "old": old, "returns": random(5, 6, seed=seed + 2),
            "mask": random_response_mask(5, 6, seed=seed + 3)} | extra


def value(f, x, **override):
    args = {k: x[k] for k in ("values", "old", "returns", "mask")} | override
    loss, fraction = f.ppo_value_loss(args["values"], args["old"], args["returns"], args["mask"], 0.2,
                                      x.get("aggregation", "token_mean"))
    return {"loss": loss, "clip_fraction": fraction}


def value_expect(x, got):
    v, old, r, mask = x["values"], x["old"], x["returns"], x["mask"]
    clipped_v = old + (v - old).clamp(-0.2, 0.2)
    clipped = (clipped_v - r) ** 2 > (v - r) ** 2
    weight = weight_of(mask, x["aggregation"])
    return {"loss": (weight * 0.5 * torch.maximum((v - r) ** 2, (clipped_v - r) ** 2)).sum(),
            "clip_fraction": clipped[mask].double().mean(), "∂L/∂values": weight * torch.where(clipped, 0.0, v - r)}


CHECKS = [
    *[surrogate_case(*case) for case in POLICY_CASES],
    Check("clipped_surrogate with A = 0: loss 0, nothing clipped",
          lambda: {"logprobs": torch.tensor([-1.0, -2.0, -3.0]), "old": torch.tensor([-1.0, -3.0, -2.0])},
          lambda f, x: dict(zip(("loss", "clipped"), f.clipped_surrogate(x["logprobs"], x["old"], torch.zeros(3)))),
          lambda x, got: {"loss": torch.zeros(3), "clipped": torch.zeros(3, dtype=torch.bool)}),
    Check("clipped_surrogate on a random [5, 7] batch: values, clipped tokens, and the gradient (0 where clipped)",
          surrogate_batch, surrogate, surrogate_expect),
    *[Check(f"ppo_policy_loss, {name}: loss, clip fraction, approx KL (k3 of KL(π_old‖π)), detached diagnostics, gradient",
            lambda name=name: policy_batch(0, aggregation=name), policy_gradient, policy_expect)
      for name in AGGREGATIONS],
    Check("ppo_policy_loss: a left-padded batch gives the same three numbers", lambda: policy_batch(10),
          lambda f, x: {"right": policy(f, x), "left": policy(f, x, **{k: to_left_padded(x[k], x["mask"])
                                                                      for k in ("logprobs", "old", "advantages", "mask")})},
          lambda x, got: {"left": got["right"]}),
    Check("ppo_policy_loss: rows permuted, the same three numbers", lambda: policy_batch(11, order=permutation(6, 2)),
          lambda f, x: {"in order": policy(f, x), "permuted": policy(f, x, **{k: x[k][x["order"]]
                                                                            for k in ("logprobs", "old", "advantages", "mask")})},
          lambda x, got: {"permuted": got["in order"]}),
    Check("ppo_policy_loss: NaN advantages in the padding never reach the loss", lambda: policy_batch(12),
          lambda f, x: {"clean": policy(f, x)["loss"],
                        "NaN in the padding": policy(
                            f, x, advantages=torch.where(x["mask"], x["advantages"], float("nan")))["loss"]},
          lambda x, got: {"NaN in the padding": got["clean"]}, hint="select with torch.where: 0 · NaN is NaN"),
    Check("ppo_policy_loss: an all-masked batch gives 0 for all three (never NaN)", lambda: policy_batch(13),
          lambda f, x: policy(f, x, mask=torch.zeros_like(x["mask"])),
          lambda x, got: dict.fromkeys(("loss", "clip_fraction", "approx_kl"), torch.tensor(0.0, dtype=torch.float64))),
    *[value_case(*case) for case in VALUE_CASES],
    *[Check(f"ppo_value_loss, {name}: loss, clip fraction and gradient on a random batch",
            lambda name=name: value_batch(2, aggregation=name), value_with_gradient, value_expect)
      for name in AGGREGATIONS],
    Check("ppo_value_loss: a left-padded batch gives the same loss and clip fraction", lambda: value_batch(3),
          lambda f, x: {"right": value(f, x), "left": value(f, x, **{k: to_left_padded(x[k], x["mask"])
                                                                    for k in ("values", "old", "returns", "mask")})},
          lambda x, got: {"left": got["right"]}),
    Check("ppo_value_loss: an all-masked batch gives 0 loss and 0 clip fraction", lambda: value_batch(4),
          lambda f, x: value(f, x, mask=torch.zeros_like(x["mask"])),
          lambda x, got: dict.fromkeys(("loss", "clip_fraction"), torch.tensor(0.0, dtype=torch.float64))),
]
