"""Checks of the ``kl`` exercise: ``kl_penalty`` (k1, k2, k3) and ``kl_shaped_rewards`` (core/kl.py)."""
import math

import torch

from minirlhf.homework.check import Check, gradients, leaves, permutation, random, random_response_mask, to_left_padded

ESTIMATORS = ("k1", "k2", "k3")


def estimator(name, delta):
    return {"k1": delta, "k2": 0.5 * delta**2, "k3": torch.expm1(-delta) + delta}[name]


def categorical_pair(seed, n=12, spread=1.0):
    logp = torch.log_softmax(spread * random(n, seed=seed), -1)
    logq = torch.log_softmax(spread * random(n, seed=seed + 1), -1)
    return logp, logq


def exact_expectations(f, x):
    """E_π[k] = Σ_y π(y) k(y), exactly, on five random categorical pairs."""
    return {name: torch.stack([(lp.exp() * f.kl_penalty(lp, lq, name)).sum()
                               for lp, lq in (categorical_pair(s) for s in range(5))]) for name in ESTIMATORS}


def exact_kl():
    return torch.stack([(lp.exp() * (lp - lq)).sum() for lp, lq in (categorical_pair(s) for s in range(5))])


def k2_bias(f, x):
    """π_ref ∝ π·e^{εh}: KL = O(ε²), E[k2] − KL = O(ε³): the relative bias halves with ε."""
    logp = torch.log_softmax(random(10, seed=1), -1)
    h = random(10, seed=2).exp()
    out = []
    for eps in (0.02, 0.01, 0.005):
        logq = torch.log_softmax(logp + eps * h, -1)
        kl = (logp.exp() * (logp - logq)).sum()
        out.append(abs((logp.exp() * f.kl_penalty(logp, logq, "k2")).sum() - kl) / kl)
    return {"relative bias": torch.stack(out)}


def monte_carlo(f, x):
    """Each estimate's mean over the samples, in standard errors from the exact KL."""
    out = {}
    for s in (0.3, 1.0, 2.0):
        k1, k3 = (f.kl_penalty(x[f"logp {s}"], x[f"logq {s}"], k) for k in ("k1", "k3"))
        for name, values in (("k1", k1), ("k3", k3)):
            z = (values.mean() - x[f"kl {s}"]).abs() / (values.std() / math.sqrt(values.numel()))
            out[f"spread {s}: {name}'s mean within 5 standard errors of the KL"] = bool(z < 5)
        out[f"spread {s}: k3 never negative"] = bool((k3 >= 0).all())
        out[f"spread {s}: k1 negative on some samples"] = bool((k1 < 0).any())
        if s < 1:  # close distributions: k3 has a far lower variance than k1
            out[f"spread {s}: k3's std below half of k1's"] = bool(k3.std() < k1.std() / 2)
    return out


MONTE_CARLO_PROPERTIES = [f"spread {s}: {p}" for s in (0.3, 1.0, 2.0) for p in (
    "k1's mean within 5 standard errors of the KL", "k3's mean within 5 standard errors of the KL",
    "k3 never negative", "k1 negative on some samples")] + ["spread 0.3: k3's std below half of k1's"]


def monte_carlo_inputs():
    x, generator = {}, torch.Generator().manual_seed(2)
    for s in (0.3, 1.0, 2.0):
        logp, logq = categorical_pair(int(10 * s), n=8, spread=s)
        samples = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=generator)
        x |= {f"logp {s}": logp[samples], f"logq {s}": logq[samples], f"kl {s}": (logp.exp() * (logp - logq)).sum()}
    return x


def float32_k3():
    magnitudes = torch.logspace(-12, 3, 400, dtype=torch.float64)
    delta = torch.cat([-magnitudes, torch.zeros(1, dtype=torch.float64), magnitudes])
    return {"logp": delta[delta > -88].float()}  # e^{−Δ} overflows float32 below −88


def k3_in_float32(f, x):
    k3 = f.kl_penalty(x["logp"], torch.zeros_like(x["logp"]), "k3")
    return {"k3 (|Δ| > 1e-3)": k3[x["logp"].abs() > 1e-3], "finite": bool(torch.isfinite(k3).all()),
            "never negative": bool((k3 >= 0).all())}


def gradient_case(name):
    def run(f, x):
        inputs = leaves(x, ["logp", "logq"])
        return gradients({"kl": f.kl_penalty(x["logp"], x["logq"], name)}, {"kl": x["w"]}, inputs)

    def expect(x, got):
        delta = x["logp"] - x["logq"]
        d = {"k1": torch.ones_like(delta), "k2": delta, "k3": 1 - torch.exp(-delta)}[name] * x["w"]
        return {"∂L/∂logp": d, "∂L/∂logq": -d}

    return run, expect


def shaped(f, x, **override):
    args = {k: x[k] for k in ("score", "logp", "logq", "mask", "beta")} | {"estimator": x.get("estimator", "k1")} | override
    rewards, kl = f.kl_shaped_rewards(args["score"], args["logp"], args["logq"], args["mask"], args["beta"],
                                      args["estimator"])
    return {"rewards": rewards, "kl": kl}


def by_hand(name):
    """The same response right- then left-padded, β = 0.5, scores 10 and 20."""
    per_token = {"k1": [1.0, 0.0, -2.0], "k2": [0.5, 0.0, 2.0], "k3": [math.exp(-1), 0.0, math.exp(2) - 3]}[name]
    kl = torch.tensor([per_token + [0.0], [0.0] + per_token], dtype=torch.float64)
    score = torch.tensor([[0, 0, 10.0, 0], [0, 0, 0, 20.0]], dtype=torch.float64)
    return {"kl": kl, "rewards": -0.5 * kl + score}


def shaped_inputs(seed, batch=5, tokens=7, **extra):
    mask = random_response_mask(batch, tokens, seed=seed)
    return {"score": random(batch, seed=seed + 1), "logp": -3 * random(batch, tokens, seed=seed + 2).abs(),
            "logq": -3 * random(batch, tokens, seed=seed + 3).abs(), "mask": mask, "beta": 0.1} | extra


def shaped_expect(x, got):
    mask = x["mask"].bool()
    kl = torch.where(mask, estimator(x.get("estimator", "k1"), x["logp"] - x["logq"]), 0.0)
    last = torch.stack([row.nonzero().max() for row in mask])
    rewards = -x["beta"] * kl
    rewards[torch.arange(len(last)), last] += x["score"]
    return {"rewards": rewards, "kl": kl}


CHECKS = [
    *[Check(f"{name} by its formula, Δ = log π − log π_ref",
            lambda: {"logp": torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64),
                     "logq": torch.tensor([-1.5, -0.5, -0.5], dtype=torch.float64)},
            lambda f, x, name=name: {name: f.kl_penalty(x["logp"], x["logq"], name)},
            lambda x, got, name=name: {name: estimator(name, x["logp"] - x["logq"])}) for name in ESTIMATORS],
    Check("the default estimator is k1", lambda: {"logp": random(5, seed=1), "logq": random(5, seed=2)},
          lambda f, x: {"default": f.kl_penalty(x["logp"], x["logq"])}, lambda x, got: {"default": x["logp"] - x["logq"]}),
    Check("an unknown estimator ('k4') is a ValueError naming k1, k2, k3", lambda: {"logp": random(3, seed=1)},
          lambda f, x: {"kl": f.kl_penalty(x["logp"], x["logp"], "k4")}, raises=("ValueError", "k1.*k2.*k3")),
    Check("exact expectations over whole categoricals: k1 and k3 are unbiased for KL(π‖π_ref), k2 is Σ π·Δ²/2",
          lambda: {}, exact_expectations,
          lambda x, got: {"k1": exact_kl(), "k3": exact_kl(), "k2": torch.stack(
              [(lp.exp() * 0.5 * (lp - lq) ** 2).sum() for lp, lq in (categorical_pair(s) for s in range(5))])}),
    Check("k2's bias is third order: halving ε halves its relative bias", lambda: {}, k2_bias,
          lambda x, got: {"relative bias": got["relative bias"][0] * torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)},
          tol={"relative bias": dict(rtol=0.04, atol=0)}),
    Check("Monte Carlo: 200,000 samples from π; k1's and k3's means are within 5 standard errors of the KL",
          monte_carlo_inputs, monte_carlo, lambda x, got: dict.fromkeys(MONTE_CARLO_PROPERTIES, True)),
    Check("k3 in float32 for |Δ| from 1e-12 to 1e3: finite, never negative, accurate (relative 1e-3) where |Δ| > 1e-3",
          float32_k3, k3_in_float32,
          lambda x, got: {"k3 (|Δ| > 1e-3)": estimator("k3", x["logp"].double())[x["logp"].abs() > 1e-3],
                          "finite": True, "never negative": True},
          tol={"k3 (|Δ| > 1e-3)": dict(rtol=1e-3, atol=0)},
          hint="exp(−Δ) − 1 cancels catastrophically near Δ = 0: torch.expm1 does not"),
    *[Check(f"{name}: gradient w.r.t. log π and log π_ref", lambda: {"logp": random(4, 6, seed=7), "logq": random(4, 6, seed=8),
                                                                   "w": random(4, 6, seed=9)},
            *gradient_case(name)) for name in ESTIMATORS],
    *[Check(f"shaped rewards with {name}, by hand: the same response right- and left-padded, β = 0.5",
            lambda name=name: {"score": torch.tensor([10.0, 20.0], dtype=torch.float64),
                               "logp": torch.tensor([[-1.0, -2.0, -3.0, -9.0], [-9.0, -1.0, -2.0, -3.0]], dtype=torch.float64),
                               "logq": torch.tensor([[-2.0, -2.0, -1.0, 0.0], [0.0, -2.0, -2.0, -1.0]], dtype=torch.float64),
                               "mask": torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]]), "beta": 0.5, "estimator": name},
            shaped, lambda x, got, name=name: by_hand(name),
            hint="the score goes to the LAST valid token of each row; −β·kl on every valid token; 0 elsewhere")
      for name in ESTIMATORS],
    Check("shaped rewards, random right-padded batch: the score lands on each row's last valid token",
          lambda: shaped_inputs(3), shaped, shaped_expect),
    Check("shaped rewards, left-padded: the right-padded result, moved", lambda: shaped_inputs(3),
          lambda f, x: {"right": shaped(f, x), "left": shaped(f, x, **{k: to_left_padded(x[k], x["mask"])
                                                                       for k in ("logp", "logq", "mask")})},
          lambda x, got: {"left": {k: to_left_padded(v, x["mask"]) for k, v in got["right"].items()}}),
    Check("shaped rewards with holes in the mask: the score still goes to the last valid token",
          lambda: shaped_inputs(4, mask=torch.tensor([[1, 0, 1, 1, 0, 0, 0]] * 5).bool(), beta=0.0),
          shaped, shaped_expect),
    Check("shaped rewards: rows permuted, β = 0.2", lambda: shaped_inputs(5, beta=0.2, order=permutation(5, 1)),
          lambda f, x: {"in order": shaped(f, x)["rewards"],
                        "permuted": shaped(f, x, **{k: x[k][x["order"]] for k in ("score", "logp", "logq", "mask")})["rewards"]},
          lambda x, got: {"permuted": got["in order"][x["order"]]}),
    Check("shaped rewards, k3: three extra padding columns holding ∓1e4 change nothing (and stay finite)",
          lambda: shaped_inputs(6, beta=0.2, estimator="k3"),
          lambda f, x: (lambda pad: {"narrow": shaped(f, x), "wide": shaped(
              f, x, logp=torch.cat([x["logp"], pad], 1), logq=torch.cat([x["logq"], -pad], 1),
              mask=torch.cat([x["mask"], pad > 0], 1))})(torch.full((5, 3), -1e4, dtype=torch.float64)),
          lambda x, got: {"wide": {k: torch.cat([v, torch.zeros(5, 3, dtype=v.dtype)], 1) for k, v in got["narrow"].items()}},
          hint="compute the estimator only where it counts, or select it away with torch.where"),
    Check("shaped rewards: a row without a valid token is a ValueError naming the row",
          lambda: shaped_inputs(7) | {"mask": random_response_mask(5, 7, seed=7).index_fill(0, torch.tensor([2]), False)},
          shaped, raises=("ValueError", r"\[2\]"), hint="say which rows: f'rows {rows} have no valid token'"),
]
