"""Checks of ``find_the_bug_kl``: ``k3_penalty`` (find_the_bug/kl_direction.py)."""
import torch

from minirlhf.homework.check import Check

PI = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
REF = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)


def k3(f, x):
    # One "sample" per vocabulary token; weighting by π gives the exact expectation under π.
    values = f.k3_penalty(x["pi"].log()[None, :], x["ref"].log()[None, :])
    return {"k3": values, "E_π[k3]": (x["pi"] * values[0]).sum(), "never negative": bool((values >= 0).all()),
            "0 at π = π_ref": f.k3_penalty(x["pi"].log()[None, :], x["pi"].log()[None, :])}


def exact(x, got):
    log_rho = x["ref"].log() - x["pi"].log()  # ρ = π_ref / π
    return {"k3": (torch.expm1(log_rho) - log_rho)[None, :]}


CHECKS = [
    Check("E_π[k3] over a 3-token distribution is exactly KL(π ‖ π_ref); k3 ≥ 0, and 0 at π = π_ref",
          lambda: {"pi": PI, "ref": REF}, k3,
          lambda x, got: {"E_π[k3]": (x["pi"] * (x["pi"] / x["ref"]).log()).sum(), "never negative": True,
                          "0 at π = π_ref": torch.zeros(1, 3, dtype=torch.float64)},
          hint="the mean of (ρ − 1) under π is 0 only for one of the two ratios"),
    Check("per token: (ρ − 1) − log ρ with ρ = π_ref/π", lambda: {"pi": PI, "ref": REF}, k3, exact),
    Check("a second pair of distributions, π close to uniform: per token, and E_π[k3] = KL",
          lambda: {"pi": torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64),
                   "ref": torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)},
          k3, lambda x, got: exact(x, got) | {"E_π[k3]": (x["pi"] * (x["pi"] / x["ref"]).log()).sum()}),
]
