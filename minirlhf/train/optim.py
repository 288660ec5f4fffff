"""Optimisation: AdamW, the learning-rate schedule, the divergence guard, one optimizer step.

Every trainer's step is the same three moves: ``backward_weighted`` per micro-batch (the loss is
checked, scaled by the micro-batch's weight and backpropagated), then ``optimizer_step`` (the
gradient norm is clipped and checked, AdamW and the schedule step). A NaN/inf loss or gradient
norm stops the run *before* the optimizer step touches the weights: ``DivergenceGuard`` saves that
(still finite) state as a checkpoint and raises ``TrainingDiverged`` naming the step and the
example ids of the micro-batch — under torchrun on every rank at once, with the same message.

**One host sync per step.** On a GPU every ``float(tensor)`` waits for the queued kernels. The
losses and metrics of the micro-batches are therefore accumulated as tensors, the guard's checks
are resolved together in ``optimizer_step`` (one ``.tolist()``), and the metrics become numbers only
when they are logged (``metrics.TrainingLog``). Under fp16 a ``precision.LossScaler`` scales the
loss, and a gradient that overflows skips the step (counted) instead of stopping the run.
"""
import math
import warnings

import torch

from minirlhf.errors import TrainingDiverged
from minirlhf.train.distributed import all_reduce_sum, gather_objects, rank, world_size
from torch.distributed.tensor import DTensor

from minirlhf.train.parallel import whole_tensor


def make_optimizer(params, lr, weight_decay=0.0):
    """AdamW over the parameters that require grad; ``fused`` (one kernel for all of them) when they
    are all plain tensors on a GPU."""
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and all(p.is_cuda and not isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


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
        self.save_last_good, self.failure, self.pending = save_last_good, None, []

    def check(self, value, what, step, example_ids):
        """Note ``what`` (e.g. "the loss") if the scalar ``value`` is NaN or inf (the first only).
        A tensor is only read in ``stop_if_diverged``, with the others: no host sync per check."""
        self.pending.append((value.detach() if torch.is_tensor(value) else value, what, step, example_ids))

    def _resolve(self):
        """Read the pending values (one sync) and note the first non-finite one."""
        pending, self.pending = self.pending, []
        values = [torch.as_tensor(v, dtype=torch.float64).reshape(()) for v, *_ in pending]
        device = next((v.device for v in values if v.device.type != "cpu"), torch.device("cpu"))
        values = torch.stack([v.to(device) for v in values]).tolist() if values else []
        for value, (_, what, step, example_ids) in zip(values, pending):
            if not math.isfinite(value) and self.failure is None:
                where = f" on rank {rank()}" if world_size() > 1 else ""
                self.failure = (what, f"{what} is {value}{where} at optimizer step {step} (0-based); batch "
                                      f"example ids {list(example_ids)}")

    def stop_if_diverged(self):
        """Raise ``TrainingDiverged`` on every rank, after saving the last good state, if any rank's
        ``check`` failed."""
        self._resolve()
        if not all_reduce_sum(float(self.failure is not None)):
            return
        failures = [f for f in gather_objects(self.failure) if f is not None]
        _, message = min(failures, key=lambda failure: failure[0] != "the loss")  # first bad loss, else first
        path = self.save_last_good()
        raise TrainingDiverged(f"{message}. The last good state (before this step) is saved in {path}; "
                               f"inspect those examples, lower --lr, or continue with --resume.")


def backward_weighted(loss, metrics, weight, totals, *, guard, step, example_ids, scaler=None):
    """Backpropagate one micro-batch's share ``weight · loss`` and add ``weight ·`` its metrics
    (``loss`` included) to ``totals`` (as tensors: nothing is read back from the device here).

    Summed over the micro-batches of a step, the gradient is the one big batch's and ``totals``
    holds the big-batch values of the metrics (for means). A non-finite loss is noted by ``guard``,
    which stops the run in ``optimizer_step``, before the weights change. ``scaler`` (fp16, a
    ``precision.LossScaler``) multiplies the loss by its scale before the backward.
    """
    guard.check(loss, "the loss", step, example_ids)
    share = loss * weight
    (scaler.scale(share) if scaler is not None else share).backward()
    for name, value in {"loss": loss.detach(), **metrics}.items():
        value = value.detach() if torch.is_tensor(value) else value
        totals[name] = totals.get(name, 0.0) + weight * value
    return totals


def optimizer_step(model, optimizer, scheduler, max_grad_norm, *, guard, step, example_ids, scaler=None):
    """Clip the gradient norm, check it is finite, step optimizer and schedule, zero the grads.

    The gradient norm is the whole model's (under FSDP, over every rank's shard). With ``scaler``
    (fp16) the gradients are unscaled first, and an inf/NaN norm is an overflow, not a divergence:
    the scaler skips the step and halves its scale (the schedule still advances, so a resumed run
    and the logs count steps alike). Returns ``{"grad_norm": ‖g‖ before clipping (a tensor), "lr":
    learning rate used}``, plus ``loss_scale`` and ``skipped_steps`` with a scaler.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    clip_to = max_grad_norm if max_grad_norm > 0 else float("inf")
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = whole_tensor(torch.nn.utils.clip_grad_norm_(params, clip_to)).detach()
    if scaler is None:
        guard.check(grad_norm, "the gradient norm", step, example_ids)
    guard.stop_if_diverged()
    lr = optimizer.param_groups[0]["lr"]
    skipped = scaler.step(optimizer) if scaler is not None else optimizer.step()
    with warnings.catch_warnings():  # torch warns when a schedule steps past an optimizer that skipped
        if skipped:
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": grad_norm, "lr": lr, **(scaler.metrics() if scaler is not None else {})}
