"""Checks of the ``aggregation`` exercise: ``aggregate_token_losses`` (core/aggregation.py)."""
import torch

from minirlhf.homework.check import Check, gradients, leaves, permutation, random, random_response_mask, to_left_padded

AGGREGATIONS = ("sequence_mean", "token_mean", "fixed_length")
LOSSES = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
LOSS_MASK = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
BY_HAND = {"sequence_mean": (1.0 + 4.0) / 2,  # each sequence weighs 1/2: the short one's token weighs 4x
           "token_mean": (4 * 1.0 + 4.0) / 5,  # each of the 5 tokens weighs 1/5
           "fixed_length": (4 * 1.0 + 4.0) / (2 * 4)}  # constant normaliser B · T
GRAD_MASK = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)


def aggregate(f, x, losses=None, mask=None, **override):
    args = {"aggregation": x["aggregation"], "max_len": x.get("max_len")} | override
    return f.aggregate_token_losses(x["losses"] if losses is None else losses, x["mask"] if mask is None else mask,
                                    args["aggregation"], args["max_len"])


def weights(x, got):
    """L = Σ w_it ℓ_it, so ∂L/∂ℓ_it = w_it: 1/(B' n_i), 1/N or 1/(B · max_len) on valid tokens, 0 elsewhere."""
    mask = x["mask"].double()
    n_i = mask.sum(-1, keepdim=True)
    non_empty = int((n_i > 0).sum())
    return {"∂L/∂losses": {"sequence_mean": mask / n_i.clamp(min=1) / non_empty, "token_mean": mask / mask.sum(),
                           "fixed_length": mask / (len(mask) * (x.get("max_len") or mask.shape[1]))}[x["aggregation"]]}


def invariances(f, x):
    """Padding values, padding side, row order, extra padding, and a split in two recombined."""
    losses, mask = x["losses"], x["mask"]
    halves = [(losses[:2], mask[:2]), (losses[2:], mask[2:])]
    parts = [aggregate(f, x, l, m) for l, m in halves]
    weights = [m.sum() if x["aggregation"] == "token_mean" else torch.tensor(float(m.shape[0])) for _, m in halves]
    order, pad = x["order"], torch.zeros(6, 3, dtype=torch.float64)
    return {
        "batch": aggregate(f, x),
        "NaN in the padding": aggregate(f, x, torch.where(mask, losses, torch.tensor(float("nan"), dtype=torch.float64))),
        "left-padded": aggregate(f, x, to_left_padded(losses, mask), to_left_padded(mask, mask)),
        "rows permuted": aggregate(f, x, losses[order], mask[order]),
        "3 extra padding columns": aggregate(f, x, torch.cat([losses, pad], 1), torch.cat([mask, pad.bool()], 1)),
        "split in two, recombined with the right weights": sum(w * p for w, p in zip(weights, parts)) / sum(weights),
    }


def empty(f, x):
    inputs = leaves(x, ["losses"])
    loss = aggregate(f, x, mask=torch.zeros(3, 4))
    grads = gradients({"loss": loss}, {"loss": 1.0}, inputs)
    with_empty = aggregate(f, x, mask=torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]))
    without = aggregate(f, x, losses=x["losses"][[0, 2]], mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    grad = grads["∂L/∂losses"]
    return {"all-masked batch": loss, "its gradient is 0": grad is None or bool((grad == 0).all()),
            "with an empty row": with_empty, "without it": without}


CHECKS = [
    *[Check(f"{name} by hand: rows of 4 tokens (all 1) and 1 token (4)", lambda name=name: {
        "losses": LOSSES, "mask": LOSS_MASK, "aggregation": name},
        lambda f, x: {"loss": aggregate(f, x)},
        lambda x, got: {"loss": torch.tensor(BY_HAND[x["aggregation"]], dtype=torch.float64)})
      for name in AGGREGATIONS],
    Check("fixed_length with max_len = 16 divides by B · 16",
          lambda: {"losses": LOSSES, "mask": LOSS_MASK, "aggregation": "fixed_length", "max_len": 16},
          lambda f, x: {"loss": aggregate(f, x)}, lambda x, got: {"loss": torch.tensor(8 / 32, dtype=torch.float64)}),
    Check("an unknown aggregation ('sum') is a ValueError listing the three",
          lambda: {"losses": LOSSES, "mask": LOSS_MASK, "aggregation": "sum"}, lambda f, x: {"loss": aggregate(f, x)},
          raises=("ValueError", "sequence_mean.*token_mean.*fixed_length")),
    *[Check(f"{name}: the gradient is each token's weight (an empty row in the batch)", lambda name=name: {
        "losses": random(4, 5, seed=3), "mask": GRAD_MASK, "aggregation": name, "max_len": 7 if name == "fixed_length" else None},
        lambda f, x: gradients({"loss": aggregate(f, x, losses=leaves(x, ["losses"])["losses"])}, {"loss": 1.0},
                               {"losses": x["losses"]}), weights,
        hint={"sequence_mean": "an empty row is skipped: it is not a sequence of mean 0",
              "token_mean": "one mean over all valid tokens of the batch", "fixed_length": "Σ / (B · max_len)"}[name])
      for name in AGGREGATIONS],
    *[Check(f"{name}: padding values and side, row order, extra padding, and a split batch recombined", lambda name=name: {
        "losses": random(6, 8, seed=1), "mask": random_response_mask(6, 8, seed=1), "aggregation": name, "max_len": 8,
        "order": permutation(6, seed=1)},
        invariances, lambda x, got: {k: got["batch"] for k in got if k != "batch"})
      for name in AGGREGATIONS],
    *[Check(f"{name}: an all-masked batch gives 0 (not NaN) with 0 gradient; an empty row does not change the value",
            lambda name=name: {"losses": random(3, 4, seed=2, dtype=torch.float32), "aggregation": name, "max_len": 4},
            empty, lambda x, got: {"all-masked batch": torch.tensor(0.0), "its gradient is 0": True,
                                   "with an empty row": got["without it"] * (2 / 3 if x["aggregation"] == "fixed_length" else 1)},
            hint="clamp every count to at least 1")
      for name in AGGREGATIONS],
]
