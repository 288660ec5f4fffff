"""Optimisation: AdamW, the learning-rate schedule, the divergence guard, one optimizer step.

Every trainer's step is the same three moves: ``backward_weighted`` per micro-batch (the loss is
checked, scaled by the micro-batch's weight and backpropagated), then ``optimizer_step`` (the
gradient norm is clipped and checked, AdamW and the schedule step). A NaN/inf loss or gradient
norm stops the run *before* the optimizer step touches the weights: ``DivergenceGuard`` saves that
(still finite) state as a checkpoint and raises ``TrainingDiverged`` naming the step and the
example ids of the micro-batch — under torchrun on every rank at once, with the same message.
"""
import math

import torch

from minirlhf.errors import TrainingDiverged
from minirlhf.train.distributed import all_reduce_sum, gather_objects, rank, world_size
from minirlhf.train.parallel import whole_tensor


def make_optimizer(params, lr, weight_decay=0.0):
    """AdamW over the parameters that require grad."""
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay)


def make_scheduler(optimizer, total_steps, warmup_ratio=0.0, schedule="cosine"):
    """Linear warmup over ``round(warmup_ratio * total_steps)`` steps, then cosine/linear decay
    to 0 or constant. Step it once per optimizer step."""
    warmup = round(warmup_ratio * total_steps)

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class DivergenceGuard:
    """Stops a run at the first NaN/inf, after saving the last good state — every rank together.

    ``check`` notes the first non-finite value this rank sees (a micro-batch's loss, the gradient
    norm). ``stop_if_diverged``, which ``optimizer_step`` calls on every rank before the weights
    change, asks all ranks (one all-reduce); if any saw one, ``save_last_good()`` (a function
    that writes a checkpoint of the still finite model/optimizer and returns its path) runs on
    every rank and every rank raises ``TrainingDiverged`` with the same message: the first rank's
    bad loss if there is one (its NaN also reached every rank's gradient norm), else its norm.
    """

    def __init__(self, save_last_good):
        self.save_last_good, self.failure = save_last_good, None

    def check(self, value, what, step, example_ids):
        """Note ``what`` (e.g. "the loss") if the scalar ``value`` is NaN or inf (the first only)."""
        value = float(value.detach()) if torch.is_tensor(value) else float(value)
        if math.isfinite(value) or self.failure is not None:
            return
        where = f" on rank {rank()}" if world_size() > 1 else ""
        self.failure = (what, f"{what} is {value}{where} at optimizer step {step} (0-based); batch example ids "
                              f"{list(example_ids)}")

    def stop_if_diverged(self):
        """Raise ``TrainingDiverged`` on every rank, after saving the last good state, if any rank's
        ``check`` failed."""
        if not all_reduce_sum(float(self.failure is not None)):
            return
        failures = [f for f in gather_objects(self.failure) if f is not None]
        _, message = min(failures, key=lambda failure: failure[0] != "the loss")  # first bad loss, else first
        path = self.save_last_good()
        raise TrainingDiverged(f"{message}. The last good state (before this step) is saved in {path}; "
                               f"inspect those examples, lower --lr, or continue with --resume.")


def backward_weighted(loss, metrics, weight, totals, *, guard, step, example_ids):
    """Backpropagate one micro-batch's share ``weight · loss`` and add ``weight ·`` its metrics
    (``loss`` included) to ``totals``.

    Summed over the micro-batches of a step, the gradient is the one big batch's and ``totals``
    holds the big-batch values of the metrics (for means). A non-finite loss is noted by ``guard``,
    which stops the run in ``optimizer_step``, before the weights change.
    """
    guard.check(loss, "the loss", step, example_ids)
    (loss * weight).backward()
    for name, value in {"loss": loss.detach(), **metrics}.items():
        totals[name] = totals.get(name, 0.0) + weight * float(value)
    return totals


def optimizer_step(model, optimizer, scheduler, max_grad_norm, *, guard, step, example_ids):
    """Clip the gradient norm, check it is finite, step optimizer and schedule, zero the grads.

    The gradient norm is the whole model's (under FSDP, over every rank's shard). Returns
    ``{"grad_norm": ‖g‖ before clipping, "lr": learning rate used}``.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    clip_to = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = float(whole_tensor(torch.nn.utils.clip_grad_norm_(params, clip_to)))
    guard.check(grad_norm, "the gradient norm", step, example_ids)
    guard.stop_if_diverged()
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": grad_norm, "lr": lr}
