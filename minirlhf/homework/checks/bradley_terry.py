"""Checks of the ``bradley_terry`` exercise: ``bradley_terry_loss`` and ``kwise_bradley_terry_loss``
(core/reward_losses.py)."""
import itertools
import math

import torch
import torch.nn.functional as F

from minirlhf.homework.check import Check, gradients, leaves, minimise, permutation, random

NAN, INF = float("nan"), float("inf")


def bt(f, x, **override):
    args = {"margin": x.get("margin"), "center_coef": x.get("center_coef", 0.0)} | override
    loss, accuracy = f.bradley_terry_loss(x["chosen"], x["rejected"], **args)
    return {"loss": loss, "accuracy": accuracy}


def bt_gradient(f, x):
    inputs = leaves(x, ["chosen", "rejected"])
    out = bt(f, x)
    return out | gradients({"loss": out["loss"]}, {"loss": 1.0}, inputs)


def bt_analytic(x, got):
    """L = mean −log σ(Δ − m) + c·mean (r_c + r_r)²:  ∂L/∂r_c = [−σ(−(Δ − m)) + 2c(r_c + r_r)] / B."""
    chosen, rejected, c = x["chosen"], x["rejected"], x.get("center_coef", 0.0)
    margin = x.get("margin") if x.get("margin") is not None else 0.0
    push = torch.sigmoid(-(chosen - rejected - margin))
    center = 2 * c * (chosen + rejected)
    loss = -F.logsigmoid(chosen - rejected - margin).mean() + c * ((chosen + rejected) ** 2).mean()
    return {"loss": loss, "∂L/∂chosen": (-push + center) / len(chosen), "∂L/∂rejected": (push + center) / len(chosen)}


def optimum(f, x):
    r = torch.tensor([3.0, 1.0], dtype=torch.float64, requires_grad=True)

    def loss_fn():  # one pair seen 3 times as a ≻ b and once as b ≻ a
        return f.bradley_terry_loss(torch.stack([r[0], r[0], r[0], r[1]]), torch.stack([r[1], r[1], r[1], r[0]]),
                                    center_coef=0.01)[0]

    minimise(loss_fn, r)
    return {"r_a − r_b": (r[0] - r[1]).detach(), "r_a + r_b": (r[0] + r[1]).detach()}


def kwise(f, x, rewards=None, mask=None):
    loss, accuracy = f.kwise_bradley_terry_loss(x["rewards"] if rewards is None else rewards,
                                                x.get("mask") if mask is None else mask)
    return {"loss": loss, "accuracy": accuracy}


def kwise_brute_force(rewards, mask):
    """A loop over prompts and itertools.combinations: the definition, read aloud."""
    prompt_losses = []
    for row, valid in zip(rewards, mask):
        ranked = [r for r, v in zip(row, valid) if v]
        pairs = list(itertools.combinations(ranked, 2))  # (better, worse), column order kept
        if pairs:
            prompt_losses.append(sum(-F.logsigmoid(better - worse) for better, worse in pairs) / len(pairs))
    return torch.stack(prompt_losses).mean()


def kwise_gradient(f, x):
    inputs = leaves(x, ["rewards"])
    out = kwise(f, x)
    return out | gradients({"loss": out["loss"]}, {"loss": 1.0}, inputs)


def kwise_expect(x, got):
    rewards = x["rewards"].detach().clone().requires_grad_(True)
    mask = x.get("mask") if x.get("mask") is not None else torch.ones_like(rewards)
    loss = kwise_brute_force(rewards, mask)
    return {"loss": loss.detach(), **gradients({"loss": loss}, {"loss": 1.0}, {"rewards": rewards})}


def kwise_garbage(f, x):
    garbage = x["rewards"].clone()
    garbage[x["mask"] == 0] = torch.tensor([NAN, 1e30, -INF], dtype=torch.float64)
    inputs = {"rewards with garbage in the padding": garbage.requires_grad_(True)}
    out = kwise(f, x, rewards=garbage)
    grads = gradients({"loss": out["loss"]}, {"loss": 1.0}, inputs)
    return out | grads | {"clean loss": kwise(f, x)["loss"]}


def two_by_two():
    return {"rewards": random(6, 2, seed=5, scale=2.0)}


MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 1, 0]])

CHECKS = [
    Check("pairwise by hand: r_c = (2, 0, 1), r_r = (0, 0, 3); a tie counts half in the accuracy",
          lambda: {"chosen": torch.tensor([2.0, 0.0, 1.0]), "rejected": torch.tensor([0.0, 0.0, 3.0])}, bt,
          lambda x, got: {"loss": torch.tensor((math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3),
                          "accuracy": torch.tensor(0.5)}),
    Check("pairwise with margin and centering: loss and analytic gradient ∂L/∂r = [∓σ(−(Δ − m)) + 2c(r_c + r_r)] / B",
          lambda: {"chosen": random(5, seed=3, scale=2.0), "rejected": random(5, seed=4, scale=2.0),
                   "margin": torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
                   "center_coef": 0.05}, bt_gradient, bt_analytic),
    Check("pairwise, no margin, no centering: loss and analytic gradient",
          lambda: {"chosen": random(6, seed=1, scale=2.0), "rejected": random(6, seed=2, scale=2.0)},
          bt_gradient, bt_analytic, hint="F.logsigmoid(x) is −softplus(−x): stable where log(sigmoid(x)) is not"),
    Check("pairwise, a float margin of 0.5", lambda: {"chosen": random(4, seed=7), "rejected": random(4, seed=8),
                                                      "margin": 0.5}, bt_gradient, bt_analytic),
    Check("exact optimum: a ≻ b three times out of four gives r_a − r_b = log 3; centering puts r_a + r_b at 0",
          lambda: {}, optimum, lambda x, got: {"r_a − r_b": torch.tensor(math.log(3), dtype=torch.float64),
                                               "r_a + r_b": torch.tensor(0.0, dtype=torch.float64)}),
    Check("a score head's [B, 1] rewards give what [B] gives",
          lambda: {"chosen": random(4, seed=9, dtype=torch.float32), "rejected": random(4, seed=10, dtype=torch.float32)},
          lambda f, x: {"[B]": bt(f, x), "[B, 1]": bt(f, {"chosen": x["chosen"][:, None], "rejected": x["rejected"][:, None]})},
          lambda x, got: {"[B, 1]": got["[B]"]}),
    Check("rows permuted: the same loss and accuracy",
          lambda: {"chosen": random(7, seed=11), "rejected": random(7, seed=12),
                   "margin": torch.rand(7, dtype=torch.float64, generator=torch.Generator().manual_seed(2)),
                   "center_coef": 0.1, "order": permutation(7, seed=0)},
          lambda f, x: {"in order": bt(f, x), "permuted": bt(f, {k: x[k][x["order"]] if torch.is_tensor(x[k]) and k != "order"
                                                                 else x[k] for k in x})},
          lambda x, got: {"permuted": got["in order"]}),
    Check("extreme rewards (±1e4): finite loss and gradients",
          lambda: {"chosen": torch.tensor([1e4, -1e4, 0.0]), "rejected": torch.tensor([-1e4, 1e4, 0.0])},
          bt_gradient, lambda x, got: {"loss": torch.tensor((0 + 2e4 + math.log(2)) / 3),
                                       "∂L/∂chosen": torch.tensor([0.0, -1.0, -0.5]) / 3,
                                       "∂L/∂rejected": torch.tensor([0.0, 1.0, 0.5]) / 3}),
    Check("K-wise with K = 2 is the pairwise loss", two_by_two, kwise,
          lambda x, got: dict(zip(("loss", "accuracy"), _reference_bt(x["rewards"][:, 0], x["rewards"][:, 1])))),
    Check("K-wise with a mask: the brute-force mean over prompts of each prompt's C(K,2) pair mean, and its gradient",
          lambda: {"rewards": random(4, 5, seed=6, scale=2.0), "mask": MASK}, kwise_gradient, kwise_expect,
          hint="normalise each prompt by its own pair count, then average over prompts"),
    Check("K-wise without a mask (P = 3, K = 4): loss and gradient", lambda: {"rewards": random(3, 4, seed=8, scale=2.0)},
          kwise_gradient, kwise_expect),
    Check("K-wise accuracy counts pairs, ties half",
          lambda: {"rewards": torch.tensor([[3.0, 2.0, 1.0], [1.0, 1.0, 2.0]])}, kwise,
          lambda x, got: {"accuracy": torch.tensor(3.5 / 6)}),
    Check("K-wise ignores NaN, 1e30 and -inf in the padding: the clean loss, finite gradient, 0 in the padding",
          lambda: {"rewards": random(2, 4, seed=9, scale=2.0), "mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])},
          kwise_garbage,
          lambda x, got: {"loss": got["clean loss"], "∂L/∂rewards with garbage in the padding":
                          kwise_expect(x, got)["∂L/∂rewards"]}),
    Check("K-wise: prompts permuted, the same loss",
          lambda: {"rewards": random(5, 3, seed=10, scale=2.0)},
          lambda f, x: {"in order": kwise(f, x), "permuted": kwise(f, x, rewards=x["rewards"][[3, 0, 4, 1, 2]])},
          lambda x, got: {"permuted": got["in order"]}),
]


def _reference_bt(chosen, rejected):
    from minirlhf.core.reward_losses import bradley_terry_loss

    return bradley_terry_loss(chosen, rejected)
