"""Checks of the ``masked`` exercise: ``masked_mean`` and ``masked_whiten`` (core/masked.py)."""
import torch

from minirlhf.homework.check import Check, gradients, leaves, random

NAN, INF = float("nan"), float("inf")


def garbage_inputs():
    """Masked-out entries hold 99, NaN and -inf: none of them may reach the result."""
    return {
        "x": torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, NAN, -INF, 5.0]], dtype=torch.float64),
        "mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 1]]),
    }


def with_empty_row():
    mask = torch.ones(3, 5, dtype=torch.float64)
    mask[1] = 0
    return {"x": random(3, 5, seed=1), "mask": mask, "w": random(3, seed=2)}


def mean_and_gradient(f, x):
    inputs = leaves(x, ["x"])
    means = f.masked_mean(x["x"], x["mask"], dim=-1)
    return {"row means": means, **gradients({"row means": means}, {"row means": x["w"]}, inputs)}


def brute_force_whiten(x, mask, shift_mean=True, eps=1e-8):
    """Whitening written on the selected elements only (autograd gives its gradient)."""
    selected = x[mask.bool()]
    mean, var = selected.mean(), selected.var()
    white = (selected - mean) / (var + eps).sqrt() + (0 if shift_mean else mean)
    return torch.zeros_like(x).masked_scatter(mask.bool(), white)


def whiten_inputs(seed, shift_mean=True):
    x = 3 + 5 * random(6, 9, seed=seed)
    mask = torch.rand(6, 9, generator=torch.Generator().manual_seed(seed + 100)) < 0.7
    return {"x": x, "mask": mask, "shift_mean": shift_mean, "w": random(6, 9, seed=seed + 200)}


def whiten(f, x):
    inputs = leaves(x, ["x"])
    white = f.masked_whiten(x["x"], x["mask"], shift_mean=x["shift_mean"])
    return {"whitened": white, **gradients({"whitened": white}, {"whitened": x["w"]}, inputs)}


def expect_whiten(x, got):
    inputs = {"x": x["x"].detach().clone().requires_grad_(True)}
    white = brute_force_whiten(inputs["x"], x["mask"], x["shift_mean"])
    return {"whitened": white.detach(), **gradients({"whitened": white}, {"whitened": x["w"]}, inputs)}


def padded_whiten_inputs():
    x = random(2, 5, seed=7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    garbage = torch.where(mask.bool(), x, torch.tensor(NAN, dtype=torch.float64))
    wider = torch.cat([garbage, torch.full((2, 3), 1e6, dtype=torch.float64)], dim=1)
    return {"x": x, "mask": mask, "garbage": garbage, "wider": wider,
            "wider_mask": torch.cat([mask, torch.zeros(2, 3, dtype=mask.dtype)], dim=1)}


CHECKS = [
    Check("mean of all valid elements (masked entries hold 99, NaN and -inf)", garbage_inputs,
          run=lambda f, x: {"mean": f.masked_mean(x["x"], x["mask"])},
          expect=lambda x, got: {"mean": torch.tensor(15 / 5, dtype=torch.float64)},
          hint="select with torch.where, never multiply by the mask: 0 · NaN is NaN"),
    Check("per-row means, dim=-1 (masked entries hold 99, NaN and -inf)", garbage_inputs,
          run=lambda f, x: {"row means": f.masked_mean(x["x"], x["mask"], dim=-1)},
          expect=lambda x, got: {"row means": torch.tensor([2.0, 4.5], dtype=torch.float64)}),
    Check("per-column means, dim=0, with a bool mask", garbage_inputs,
          run=lambda f, x: {"column means": f.masked_mean(x["x"], x["mask"].bool(), dim=0)},
          expect=lambda x, got: {"column means": torch.tensor([2.5, 2.0, 3.0, 5.0], dtype=torch.float64)}),
    Check("row 1 is all masked: its mean is 0 and it gets no gradient", with_empty_row, run=mean_and_gradient,
          expect=lambda x, got: {
              "row means": torch.where(x["mask"].bool(), x["x"], 0.0).sum(-1) / x["mask"].sum(-1).clamp(min=1),
              "∂L/∂x": x["w"][:, None] * x["mask"] / x["mask"].sum(-1, keepdim=True).clamp(min=1)},
          hint="an all-masked row has no valid element: clamp its count to at least 1"),
    Check("everything masked: the mean is 0, not NaN",
          lambda: {"x": random(3, 5, seed=3), "mask": torch.zeros(3, 5)},
          run=lambda f, x: {"mean": f.masked_mean(x["x"], x["mask"])},
          expect=lambda x, got: {"mean": torch.tensor(0.0, dtype=torch.float64)},
          hint="an all-masked tensor has no valid element: clamp its count to at least 1"),
    Check("gradient of per-row means with a random mask: ∂mean_i/∂x_ij = mask_ij / n_i",
          lambda: {"x": random(3, 5, seed=4), "mask": torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]]),
                   "w": random(3, seed=5)},
          run=mean_and_gradient,
          expect=lambda x, got: {"∂L/∂x": x["w"][:, None] * x["mask"] / x["mask"].sum(-1, keepdim=True)}),
    Check("whitened values: (x − mean) / sqrt(var + 1e-8) on the valid elements, 0 elsewhere; and its gradient",
          lambda: whiten_inputs(10), run=whiten, expect=expect_whiten),
    Check("shift_mean=False: rescaled around the mean, the mean kept; and its gradient",
          lambda: whiten_inputs(20, shift_mean=False), run=whiten, expect=expect_whiten),
    Check("a second random batch and mask, with gradient",
          lambda: whiten_inputs(30), run=whiten, expect=expect_whiten),
    Check("NaN in the masked positions changes nothing", padded_whiten_inputs,
          run=lambda f, x: {"clean": f.masked_whiten(x["x"], x["mask"]),
                            "with NaN in the padding": f.masked_whiten(x["garbage"], x["mask"])},
          expect=lambda x, got: {"with NaN in the padding": got["clean"]}),
    Check("three extra padding columns holding 1e6 change nothing", padded_whiten_inputs,
          run=lambda f, x: {"narrow": f.masked_whiten(x["x"], x["mask"]),
                            "wider": f.masked_whiten(x["wider"], x["wider_mask"])},
          expect=lambda x, got: {"wider": torch.cat([got["narrow"], torch.zeros(2, 3, dtype=torch.float64)], 1)}),
    Check("no valid element: raises ValueError",
          lambda: {"x": random(2, 4, seed=8), "mask": torch.zeros(2, 4)},
          run=lambda f, x: {"whitened": f.masked_whiten(x["x"], x["mask"])},
          raises=("ValueError", ""), hint="masked_var already refuses too few elements: reuse it"),
    Check("one valid element (no variance): raises ValueError",
          lambda: {"x": random(2, 4, seed=9), "mask": torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]])},
          run=lambda f, x: {"whitened": f.masked_whiten(x["x"], x["mask"])},
          raises=("ValueError", "")),
]
