"""Checks of the ``simpo`` exercise: ``simpo_loss`` (core/dpo_losses.py)."""
import math

import torch
import torch.nn.functional as F

from minirlhf.homework.check import Check, gradients, leaves, random


def averages(seed, batch=5, **extra):
    """Length-averaged log-probs around −1, and a fixed random weighting."""
    return {"chosen": random(batch, seed=seed, scale=0.5, shift=-1.0),
            "rejected": random(batch, seed=seed + 1, scale=0.5, shift=-1.0), "w": random(batch, seed=seed + 2)} | extra


def simpo(f, x):
    inputs = leaves(x, ["chosen", "rejected"])
    losses, chosen, rejected = f.simpo_loss(x["chosen"], x["rejected"], beta=x["beta"], gamma=x["gamma"])
    return ({"losses": losses, "chosen_rewards": chosen, "rejected_rewards": rejected,
             "rewards detached": not chosen.requires_grad and not rejected.requires_grad}
            | gradients({"losses": losses}, {"losses": x["w"]}, inputs))


def analytic(x, got):
    """L = −log σ(z), z = β·a_w − β·a_l − γ:  ∂L/∂a_w = −β σ(−z),  ∂L/∂a_l = +β σ(−z)."""
    beta, gamma = x["beta"], x["gamma"]
    z = beta * x["chosen"] - beta * x["rejected"] - gamma
    return {"losses": -F.logsigmoid(z), "chosen_rewards": beta * x["chosen"], "rejected_rewards": beta * x["rejected"],
            "rewards detached": True, "∂L/∂chosen": -beta * torch.sigmoid(-z) * x["w"],
            "∂L/∂rejected": beta * torch.sigmoid(-z) * x["w"]}


def edges(f, x):
    chosen = torch.tensor([-1e6, -0.1, float("-inf")], requires_grad=True)
    rejected = torch.tensor([-0.1, -1e6, -0.1], requires_grad=True)
    beta_zero = f.simpo_loss(chosen, rejected, beta=0.0, gamma=0.5)[0]
    losses = f.simpo_loss(chosen, rejected)[0]
    (grad,) = torch.autograd.grad(losses.sum(), [chosen])
    return {"β = 0, finite rows": beta_zero[:2], "no NaN in the losses": not bool(torch.isnan(losses).any()),
            "finite gradient": bool(torch.isfinite(grad).all())}


CHECKS = [
    Check("β = 2, γ = 0.3: losses, detached rewards β·avg log π, and the analytic gradient",
          lambda: averages(10, beta=2.0, gamma=0.3), simpo, analytic,
          hint="SimPO is DPO's sigmoid loss with no reference and a margin: −logsigmoid(β a_w − β a_l − γ)"),
    Check("β = 2.5, γ = 1: a second batch", lambda: averages(12, batch=4, beta=2.5, gamma=1.0), simpo, analytic),
    Check("γ = 0: no margin", lambda: averages(20, beta=2.0, gamma=0.0), simpo, analytic),
    Check("the paper's check value: β = 2, a_w − a_l = 0.2, γ = 0.3 gives −log σ(0.1)",
          lambda: {"chosen": torch.tensor([-0.5]), "rejected": torch.tensor([-0.7])},
          lambda f, x: {"loss": f.simpo_loss(x["chosen"], x["rejected"], beta=2.0, gamma=0.3)[0]},
          lambda x, got: {"loss": torch.tensor([-math.log(1 / (1 + math.exp(-0.1)))])},
          hint="γ is in reward units: subtract it after multiplying by β"),
    Check("edges: β = 0 leaves only the margin; −inf and −1e6 give no NaN", lambda: {}, edges,
          lambda x, got: {"β = 0, finite rows": torch.full((2,), -math.log(1 / (1 + math.exp(0.5)))),
                          "no NaN in the losses": True, "finite gradient": True}),
    Check("SimPO = reference-free DPO with logit_offset γ",
          lambda: averages(14, batch=6, beta=2.0, gamma=0.5),
          lambda f, x: {"losses": f.simpo_loss(x["chosen"], x["rejected"], beta=2.0, gamma=0.5)[0]},
          lambda x, got: {"losses": _reference_dpo(x["chosen"], x["rejected"])}),
]


def _reference_dpo(chosen, rejected):
    from minirlhf.core.dpo_losses import dpo_loss

    zero = torch.zeros_like(chosen)
    return dpo_loss(chosen, rejected, zero, zero, beta=2.0, logit_offset=0.5)[0]
