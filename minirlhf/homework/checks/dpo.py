"""Checks of the ``dpo`` exercise: ``dpo_loss``, all five loss types (core/dpo_losses.py)."""
import math

import torch
import torch.nn.functional as F

from minirlhf.homework.check import Check, gradients, leaves, minimise, permutation, random

LOGPS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
SMOOTHING = {"cdpo": 0.2, "robust": 0.2}


def four_logps(batch=6, seed=0, **extra):
    """Summed log-probs (around −20) of the four kinds, float64, and a fixed random weighting."""
    x = {name: random(batch, seed=seed + i, scale=3.0, shift=-20.0) for i, name in enumerate(LOGPS)}
    return x | {"w": random(batch, seed=seed + 10)} | extra


def dpo(f, x, logps=None, **override):
    args = {k: x[k] for k in ("beta", "loss_type", "label_smoothing") if k in x} | override
    losses, chosen, rejected = f.dpo_loss(*(logps or [x[k] for k in LOGPS]), **args)
    return {"losses": losses, "chosen_rewards": chosen, "rejected_rewards": rejected}


def dpo_with_gradients(f, x):
    inputs = leaves(x, LOGPS)
    out = dpo(f, x)
    return out | gradients({"losses": out["losses"]}, {"losses": x["w"]}, inputs)


def losses_of_h(h, beta, loss_type, eps=0.0, offset=0.0):
    """Each loss as a function of h (and the logit z = βh − offset), written out."""
    z = beta * h - offset
    return {
        "sigmoid": lambda: -F.logsigmoid(z),
        "cdpo": lambda: -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z),
        "robust": lambda: (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps),
        "ipo": lambda: (h - 1 / (2 * beta)) ** 2,
        "hinge": lambda: F.relu(1 - z),
    }[loss_type]()


def analytic(x, got):
    """Values from the formula; ∂L/∂h from it by hand, and the chain rule through h's four terms."""
    beta, loss_type, eps = x["beta"], x["loss_type"], x.get("label_smoothing", 0.0)
    h = (x["policy_chosen_logps"] - x["ref_chosen_logps"]) - (x["policy_rejected_logps"] - x["ref_rejected_logps"])
    z = beta * h
    dh = {"sigmoid": -beta * torch.sigmoid(-z),
          "cdpo": beta * (-(1 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z)),
          "robust": beta * (-(1 - eps) * torch.sigmoid(-z) - eps * torch.sigmoid(z)) / (1 - 2 * eps),
          "ipo": 2 * (h - 1 / (2 * beta)),
          "hinge": -beta * (z < 1).to(h.dtype)}[loss_type] * x["w"]
    return {"losses": losses_of_h(h, beta, loss_type, eps),
            "chosen_rewards": beta * (x["policy_chosen_logps"] - x["ref_chosen_logps"]),
            "rejected_rewards": beta * (x["policy_rejected_logps"] - x["ref_rejected_logps"]),
            "∂L/∂policy_chosen_logps": dh, "∂L/∂policy_rejected_logps": -dh,
            "∂L/∂ref_chosen_logps": -dh, "∂L/∂ref_rejected_logps": dh}


def expected_loss(f, h, p, beta, **kwargs):
    """Expected loss of one pair whose label says "a ≻ b" with probability p: with probability
    1 − p the same pair arrives swapped (h -> −h)."""
    zero = torch.zeros_like(h)
    return (p * f.dpo_loss(h, zero, zero, zero, beta=beta, **kwargs)[0]
            + (1 - p) * f.dpo_loss(zero, h, zero, zero, beta=beta, **kwargs)[0]).sum()


def optimum(f, x):
    h = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    kwargs = {k: x[k] for k in ("loss_type", "label_smoothing") if k in x}
    minimise(lambda: expected_loss(f, h, x["p"], x["beta"], **kwargs), h)
    return {"σ(βh*)": torch.sigmoid(x["beta"] * h.detach())}


def ipo_optimum(f, x):
    chosen = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    rest = [torch.tensor([v], dtype=torch.float64) for v in (-2.0, -2.5, -1.0)]
    loss_fn = lambda: f.dpo_loss(chosen, *rest, beta=x["beta"], loss_type="ipo")[0].sum()  # noqa: E731
    minimise(loss_fn, chosen)
    h = (chosen - rest[1]) - (rest[0] - rest[2])
    return {"h*": h.detach(), "loss at h*": loss_fn().detach()}


def flipped(x):
    """The same pairs with chosen and rejected swapped."""
    return [x["policy_rejected_logps"], x["policy_chosen_logps"], x["ref_rejected_logps"], x["ref_chosen_logps"]]


def extremes(f, x):
    chosen = torch.tensor([-1.0, -1e6, -1.0], requires_grad=True)
    rejected = torch.tensor([-1e6, -1.0, float("-inf")], requires_grad=True)
    ref = torch.tensor([-5.0, -5.0, -5.0])
    losses = f.dpo_loss(chosen, rejected, ref, ref, beta=0.1)[0]
    grads = torch.autograd.grad(losses.sum(), [chosen, rejected])
    return {"losses": losses, "gradients are finite": all(bool(torch.isfinite(g).all()) for g in grads)}


def variants_extremes(f, x):
    chosen = torch.tensor([-1.0, -1e6, -3.0], requires_grad=True)
    rejected = torch.tensor([-1e6, -1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-5.0, -5.0, -5.0])
    out = {}
    for loss_type in ("cdpo", "robust", "hinge"):
        for beta in (0.0, 0.1):
            losses = f.dpo_loss(chosen, rejected, ref, ref, beta=beta, loss_type=loss_type,
                                label_smoothing=SMOOTHING.get(loss_type, 0.0))[0]
            grads = torch.autograd.grad(losses.sum(), [chosen, rejected])
            out[f"{loss_type}, β = {beta}: finite"] = bool(torch.isfinite(losses).all()) and all(
                bool(torch.isfinite(g).all()) for g in grads)
    return out


def offset_case(f, x):
    inputs = leaves(x, ["policy_chosen_logps", "policy_rejected_logps"])
    losses = f.dpo_loss(*[x[k] for k in LOGPS], beta=x["beta"], logit_offset=x["offset"])[0]
    return {"losses": losses} | gradients({"losses": losses}, {"losses": x["w"]}, inputs)


def offset_expect(x, got):
    inputs = {k: x[k].clone().requires_grad_(True) for k in ("policy_chosen_logps", "policy_rejected_logps")}
    h = (inputs["policy_chosen_logps"] - x["ref_chosen_logps"]) - (inputs["policy_rejected_logps"] - x["ref_rejected_logps"])
    losses = losses_of_h(h, x["beta"], "sigmoid", offset=x["offset"])
    return {"losses": losses.detach()} | gradients({"losses": losses}, {"losses": x["w"]}, inputs)


CHECKS = [
    *[Check(f"loss_type={loss_type!r}{f', ε = {SMOOTHING[loss_type]}' if loss_type in SMOOTHING else ''}, β = 0.5: "
            "losses, implicit rewards, and the gradient w.r.t. all four log-probs",
            lambda loss_type=loss_type: four_logps(seed=1, beta=0.5, loss_type=loss_type,
                                                   label_smoothing=SMOOTHING.get(loss_type, 0.0)),
            dpo_with_gradients, analytic,
            hint={"sigmoid": "−log σ(z) is −F.logsigmoid(z), with z = β·h",
                  "cdpo": "cDPO averages the loss over labels flipped with probability ε",
                  "robust": "robust DPO: [−(1−ε) log σ(z) + ε log σ(−z)] / (1 − 2ε)",
                  "ipo": "IPO regresses h (not βh) onto 1/(2β): a square, no sigmoid",
                  "hinge": "hinge: max(0, 1 − z) (torch.relu)"}[loss_type])
      for loss_type in ("sigmoid", "cdpo", "robust", "ipo", "hinge")],
    Check("sigmoid is Bradley–Terry on the implicit rewards; the rewards are detached (logging only)",
          lambda: four_logps(seed=2, beta=0.1),
          lambda f, x: (lambda out: out | {"mean loss": out["losses"].mean(),
                                           "chosen_rewards detached": not out["chosen_rewards"].requires_grad,
                                           "rejected_rewards detached": not out["rejected_rewards"].requires_grad})(
              dpo(f, x, logps=[x[k].requires_grad_(True) for k in LOGPS])),
          lambda x, got: {"mean loss": -F.logsigmoid(0.1 * ((x["policy_chosen_logps"] - x["ref_chosen_logps"])
                                                            - (x["policy_rejected_logps"] - x["ref_rejected_logps"]))).mean(),
                          "chosen_rewards detached": True, "rejected_rewards detached": True},
          hint="the implicit rewards are for logging: β·(log π − log π_ref).detach()"),
    *[Check(f"loss_type={loss_type!r}: rows permuted, the losses permuted the same way",
            lambda loss_type=loss_type: four_logps(batch=8, seed=3, beta=0.2, loss_type=loss_type, order=permutation(8, 0)),
            lambda f, x: {"in order": dpo(f, x)["losses"],
                          "permuted": dpo(f, x, logps=[x[k][x["order"]] for k in LOGPS])["losses"]},
            lambda x, got: {"permuted": got["in order"][x["order"]]})
      for loss_type in ("sigmoid", "ipo")],
    *[Check(f"IPO's optimum for one pair, β = {beta}: h* = 1/(2β), where the loss is 0", lambda beta=beta: {"beta": beta},
            ipo_optimum, lambda x, got: {"h*": torch.tensor([1 / (2 * x["beta"])], dtype=torch.float64),
                                         "loss at h*": torch.tensor(0.0, dtype=torch.float64)})
      for beta in (0.1, 0.5, 2.0)],
    *[Check(f"sigmoid's optimum on labels that say a ≻ b with probability {p}: σ(βh*) = {p} (the BT fit)",
            lambda p=p: {"p": p, "beta": 0.5}, optimum, lambda x, got: {"σ(βh*)": torch.tensor([x["p"]], dtype=torch.float64)})
      for p in (0.6, 0.9)],
    *[Check(f"cDPO's optimum with ε = 0.1 on labels at rate {p}: σ(βh*) = p(1 − ε) + (1 − p)ε",
            lambda p=p: {"p": p, "beta": 0.5, "loss_type": "cdpo", "label_smoothing": 0.1}, optimum,
            lambda x, got: {"σ(βh*)": torch.tensor([x["p"] * 0.9 + (1 - x["p"]) * 0.1], dtype=torch.float64)})
      for p in (0.6, 1.0)],
    Check("cDPO is DPO averaged over flipped labels: (1 − ε)·L(a ≻ b) + ε·L(b ≻ a), ε = 0.3",
          lambda: four_logps(seed=4, beta=0.2),
          lambda f, x: {"cdpo": dpo(f, x, loss_type="cdpo", label_smoothing=0.3)["losses"]},
          lambda x, got: {"cdpo": 0.7 * losses_of_h(_h(x), 0.2, "sigmoid") + 0.3 * losses_of_h(-_h(x), 0.2, "sigmoid")}),
    Check("robust DPO is unbiased under label noise: (1 − ε)·L_robust(a ≻ b) + ε·L_robust(b ≻ a) = L_DPO(a ≻ b)",
          lambda: four_logps(seed=5, beta=0.2),
          lambda f, x: {"kept": dpo(f, x, loss_type="robust", label_smoothing=0.3)["losses"],
                        "flipped": dpo(f, x, logps=flipped(x), loss_type="robust", label_smoothing=0.3)["losses"]},
          lambda x, got: {  # the identity solved for the flipped term
              "kept": losses_of_h(_h(x), 0.2, "robust", 0.3),
              "flipped": (losses_of_h(_h(x), 0.2, "sigmoid") - 0.7 * losses_of_h(_h(x), 0.2, "robust", 0.3)) / 0.3}),
    Check("label_smoothing = 0 makes cdpo and robust plain DPO", lambda: four_logps(seed=6, beta=0.3),
          lambda f, x: {t: dpo(f, x, loss_type=t, label_smoothing=0.0)["losses"] for t in ("cdpo", "robust")},
          lambda x, got: {t: losses_of_h(_h(x), 0.3, "sigmoid") for t in ("cdpo", "robust")}),
    Check("hinge by hand: β = 0.5, h = (0, 1, 2, 4) gives (1, 0.5, 0, 0)",
          lambda: {"h": torch.tensor([0.0, 1.0, 2.0, 4.0])},
          lambda f, x: {"losses": f.dpo_loss(x["h"], *[torch.zeros(4)] * 3, beta=0.5, loss_type="hinge")[0]},
          lambda x, got: {"losses": torch.tensor([1.0, 0.5, 0.0, 0.0])}),
    Check("β = 0: no preference learnt yet, every loss is log 2 and the gradient is 0",
          lambda: four_logps(seed=7, beta=0.0), dpo_with_gradients,
          lambda x, got: {"losses": torch.full((6,), math.log(2), dtype=torch.float64),
                          **{f"∂L/∂{k}": torch.zeros(6, dtype=torch.float64) for k in LOGPS}}),
    Check("huge |βh| and a rejected response impossible under π (log π = −inf): finite, exact losses",
          lambda: {}, extremes, lambda x, got: {"losses": torch.tensor([0.0, 0.1 * (1e6 - 1), 0.0]),
                                                "gradients are finite": True},
          hint="−log σ(z) for z = −1e5 is 1e5, not inf: F.logsigmoid keeps it"),
    Check("cdpo, robust and hinge with β = 0 and huge |h|: finite losses and gradients", lambda: {}, variants_extremes,
          lambda x, got: {f"{t}, β = {b}: finite": True for t in ("cdpo", "robust", "hinge") for b in (0.0, 0.1)}),
    Check("logit_offset (R-DPO's length margin, DPOP's penalty) is subtracted from βh: losses and gradients",
          lambda: four_logps(seed=8, beta=0.1, offset=random(6, seed=30, scale=0.5)), offset_case, offset_expect,
          hint="z = β·h − logit_offset, inside the sigmoid"),
]


def _h(x):
    return (x["policy_chosen_logps"] - x["ref_chosen_logps"]) - (x["policy_rejected_logps"] - x["ref_rejected_logps"])
