"""Checks of the ``grpo`` exercise: ``group_advantages``, ``rloo_advantages`` and ``grpo_loss``
(core/grpo.py)."""
import math

import torch

from minirlhf.homework.check import Check, gradients, leaves, permutation, random, random_response_mask, to_left_padded

REWARDS = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0], dtype=torch.float64)  # two prompts, G = 3
CENTERED = torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0], dtype=torch.float64)
STD = torch.tensor([1.0] * 3 + [math.sqrt(12.0)] * 3, dtype=torch.float64)  # unbiased group std
AGGREGATIONS = ("sequence_mean", "token_mean", "fixed_length")
ZERO = torch.tensor(0.0, dtype=torch.float64)


def advantages(f, x, **override):
    args = {"rewards": x["rewards"], "group_size": x["group_size"]} | {k: x[k] for k in ("scale", "eps") if k in x} | override
    return {"advantages": f.group_advantages(**args)}


def rloo(f, x, **override):
    args = {"rewards": x["rewards"], "group_size": x["group_size"]} | override
    return {"advantages": f.rloo_advantages(args["rewards"], args["group_size"])}


def leave_one_out(x, got):
    grouped = x["rewards"].view(-1, x["group_size"])
    baselines = torch.stack([torch.cat([row[:i], row[i + 1:]]).mean() for row in grouped for i in range(len(row))])
    return {"advantages": x["rewards"] - baselines}


def grpo_batch(seed, **extra):
    mask = random_response_mask(6, 8, seed=seed)
    old = -3 * random(6, 8, seed=seed + 1).abs()
    return {"logprobs": old + 0.3 * random(6, 8, seed=seed + 2), "old": old, "ref": old + 0.5 * random(6, 8, seed=seed + 3),
            "advantages": random(6, seed=seed + 4), "mask": mask} | extra


def grpo(f, x, **override):
    args = {k: x[k] for k in ("logprobs", "old", "ref", "advantages", "mask")} | override
    kwargs = {k: x[k] for k in ("beta", "aggregation") if k in x}
    loss, fraction, kl = f.grpo_loss(args["logprobs"], args["old"], args["ref"], args["advantages"], args["mask"],
                                     clip_eps=0.2, **kwargs)
    return {"loss": loss, "clip_fraction": fraction, "kl": kl}


def grpo_gradient(f, x):
    inputs = leaves(x, ["logprobs"])
    out = grpo(f, x)
    return out | gradients({"loss": out["loss"]}, {"loss": 1.0}, inputs) | {
        "diagnostics detached": not out["clip_fraction"].requires_grad and not out["kl"].requires_grad}


def grpo_expect(x, got):
    """ℓ = −min(ρA, clip(ρ)A) + β·k3 per token; ∂ℓ/∂log π = −ρA (0 where clipped) + β(1 − π_ref/π),
    times each token's aggregation weight."""
    logp, mask, beta = x["logprobs"], x["mask"].double(), x["beta"]
    ratio, a = (logp - x["old"]).exp(), x["advantages"][:, None]
    clipped = ratio.clamp(0.8, 1.2) * a < ratio * a
    k3 = (x["ref"] - logp).exp() - (x["ref"] - logp) - 1
    token_losses = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a) + beta * k3
    weight = {"sequence_mean": mask / mask.sum(-1, keepdim=True) / len(mask), "token_mean": mask / mask.sum(),
              "fixed_length": mask / mask.numel()}[x.get("aggregation", "sequence_mean")]
    grad = torch.where(clipped, 0.0, -ratio * a) + beta * (1 - (x["ref"] - logp).exp())
    return {"loss": (weight * token_losses).sum(), "clip_fraction": clipped[mask.bool()].double().mean(),
            "kl": k3[mask.bool()].mean(), "∂L/∂logprobs": weight * grad, "diagnostics detached": True}


def layouts(f, x):
    mask, order = x["mask"], x["order"]
    wide = {k: torch.cat([x[k], torch.zeros(6, 3, dtype=x[k].dtype)], 1) for k in ("logprobs", "old", "ref", "mask")}
    return {"batch": grpo(f, x),
            "left-padded": grpo(f, x, **{k: to_left_padded(x[k], mask) for k in ("logprobs", "old", "ref", "mask")}),
            "rows permuted": grpo(f, x, **{k: x[k][order] for k in ("logprobs", "old", "ref", "advantages", "mask")}),
            "3 extra padding columns": grpo(f, x, **wide)}


def empty_rows(f, x):
    empty_row = x["mask"].clone()
    empty_row[0] = False
    return {"row 0 empty": grpo(f, x, mask=empty_row)["loss"],
            "row 0 removed": grpo(f, x, **{k: x[k][1:] for k in ("logprobs", "old", "ref", "advantages", "mask")})["loss"],
            "all rows empty": grpo(f, x, mask=torch.zeros_like(x["mask"]))}


def huge_reference(f, x):
    ref = x["ref"].clone()
    ref[0, 0] = x["logprobs"][0, 0] + 1000.0  # k3 overflows to inf here
    return grpo(f, x, ref=ref)


CHECKS = [
    Check("group_advantages by hand, scale=None (Dr. GRPO): r − group mean",
          lambda: {"rewards": REWARDS, "group_size": 3, "scale": None}, advantages,
          lambda x, got: {"advantages": CENTERED}, hint="view(-1, group_size): one prompt per row"),
    Check("group_advantages by hand, scale='std': (r − mean) / (unbiased std + 1e-4)",
          lambda: {"rewards": REWARDS, "group_size": 3}, advantages,
          lambda x, got: {"advantages": CENTERED / (STD + 1e-4)}, hint="torch.std is unbiased (n − 1) by default: keep it"),
    Check("group_advantages with eps = 0.5", lambda: {"rewards": REWARDS, "group_size": 3, "eps": 0.5}, advantages,
          lambda x, got: {"advantages": CENTERED / (STD + 0.5)}),
    *[Check(f"scale={scale!r}: constant groups (eight 0.1s in float32, eight 7s) give exactly 0, never NaN",
            lambda scale=scale: {"rewards": torch.tensor([0.1] * 8 + [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0] + [7.0] * 8),
                                 "group_size": 8, "scale": scale}, advantages,
            lambda x, got: {"advantages": torch.cat([torch.zeros(8), (lambda g: (g - g.mean()) / (
                (g.std() + 1e-4) if x["scale"] else 1.0))(x["rewards"][8:16]), torch.zeros(8)])},
            hint="the mean of eight float32 0.1s is not 0.1: set constant groups to 0 explicitly")
      for scale in ("std", None)],
    Check("group_advantages: each group centred with unit std (4 groups of 5)",
          lambda: {"rewards": random(20, seed=0, dtype=torch.float32), "group_size": 5},
          lambda f, x: (lambda a: {"group sums": a.view(4, 5).sum(-1), "group stds": a.view(4, 5).std(-1)})(
              advantages(f, x)["advantages"]),
          lambda x, got: {"group sums": torch.zeros(4), "group stds": torch.ones(4)},
          tol={"group sums": dict(rtol=0, atol=1e-5), "group stds": dict(rtol=0, atol=1e-3)}),
    Check("group_advantages: groups reordered and samples shuffled inside them: the advantages follow",
          lambda: {"rewards": random(20, seed=0), "group_size": 5,
                   "order": (permutation(4, 1)[:, None] * 5 + permutation(5, 2)[None, :]).flatten()},
          lambda f, x: {"in order": advantages(f, x)["advantages"],
                        "reordered": advantages(f, x, rewards=x["rewards"][x["order"]])["advantages"]},
          lambda x, got: {"reordered": got["in order"][x["order"]]}),
    Check("group_advantages: the batch split at a group boundary, the same advantages",
          lambda: {"rewards": random(20, seed=3), "group_size": 5},
          lambda f, x: {"whole": advantages(f, x)["advantages"], "two halves": torch.cat(
              [advantages(f, x, rewards=x["rewards"][:10])["advantages"],
               advantages(f, x, rewards=x["rewards"][10:])["advantages"]])},
          lambda x, got: {"two halves": got["whole"]}),
    Check("group_advantages: an unknown scale is a ValueError naming 'std'",
          lambda: {"rewards": random(6, seed=1), "group_size": 3, "scale": "max"}, advantages, raises=("ValueError", "std")),
    Check("rloo_advantages: r_i minus the mean of the OTHER samples (3 groups of 4)",
          lambda: {"rewards": random(12, seed=1), "group_size": 4}, rloo, leave_one_out,
          hint="the group sum minus r_i is the sum of the others"),
    Check("rloo_advantages: G = 2 gives ±(r_1 − r_2)", lambda: {"rewards": torch.tensor([1.0, 0.0]), "group_size": 2},
          rloo, lambda x, got: {"advantages": torch.tensor([1.0, -1.0])}),
    Check("rloo_advantages: a constant group gives 0", lambda: {"rewards": torch.full((6,), 0.3), "group_size": 3},
          rloo, lambda x, got: {"advantages": torch.zeros(6)}, tol={"advantages": dict(rtol=0, atol=1e-7)}),
    *[Check(f"grpo_loss, {name}, β = 0.04: loss, clip fraction, mean k3, detached diagnostics, gradient "
            "−ρA (0 where clipped) + β(1 − π_ref/π) times each token's weight",
            lambda name=name: grpo_batch(2, beta=0.04, aggregation=name), grpo_gradient, grpo_expect,
            hint="one advantage per row, shared by its tokens (clipped_surrogate takes [B]); k3 = exp(ref − logp) − (ref − logp) − 1")
      for name in AGGREGATIONS],
    Check("grpo_loss, defaults (sequence_mean, β = 0.04)", lambda: grpo_batch(3), grpo_gradient,
          lambda x, got: grpo_expect(x | {"beta": 0.04}, got)),
    Check("grpo_loss, β = 0 with a k3 that overflows (π_ref ≫ π): the loss is the surrogate alone, no NaN; kl = inf",
          lambda: grpo_batch(3, beta=0.0), huge_reference,
          lambda x, got: {"loss": grpo_expect(x, got)["loss"], "kl": torch.tensor(math.inf, dtype=torch.float64)},
          hint="with β = 0 leave the KL term out of the loss (0 · inf is NaN)"),
    *[Check(f"grpo_loss, {name}: left padding, row order and extra padding change nothing",
            lambda name=name: grpo_batch(4, aggregation=name, order=permutation(6, 3)), layouts,
            lambda x, got: {k: got["batch"] for k in ("left-padded", "rows permuted", "3 extra padding columns")})
      for name in ("sequence_mean", "token_mean")],
    Check("grpo_loss: an empty row is skipped (sequence_mean); an all-empty batch gives 0, never NaN",
          lambda: grpo_batch(5), empty_rows,
          lambda x, got: {"row 0 empty": got["row 0 removed"],
                          "all rows empty": dict.fromkeys(("loss", "clip_fraction", "kl"), ZERO)}),
]
