"""Precision: the dtype the matmuls run in, and loss scaling when it is float16.

Trained weights stay float32 (``runtime.TRAIN_DTYPE``); ``--precision`` chooses the dtype of the
forward's matmuls under ``torch.autocast``:

- ``auto`` (default): bf16 on a GPU that has it (Ampere and later), fp16 on one that has not (a
  T4, a V100), fp32 on the CPU;
- ``bf16``: bfloat16 has float32's exponent range, so gradients never overflow: nothing to scale;
- ``fp16``: float16 has 5 exponent bits. A gradient below ~6e-8 rounds to 0, so the loss is
  multiplied by a large factor S before the backward and the gradients divided by S before the
  step (``torch.amp.GradScaler``). When a gradient overflows (inf/NaN) the step is *skipped* and S
  halved; after 2000 good steps S doubles. Skipped steps are counted (``skipped_steps`` in
  ``train.csv``): a few at the start while S settles are normal, many mean the run is unstable;
- ``fp32``: no autocast.

The reference and reward models only run forward passes: they are loaded in the compute dtype
(``Precision.dtype``), half the memory of float32 on a GPU.
"""
from contextlib import nullcontext

import torch

from minirlhf.errors import MinirlhfError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def choose_precision(choice, device):
    """``"bf16"``, ``"fp16"`` or ``"fp32"`` for ``--precision choice`` on ``device`` (``auto``: bf16 on
    a CUDA GPU that supports it, else fp16 on CUDA, fp32 on the CPU)."""
    device = torch.device(device)
    if choice != "auto":
        if choice not in DTYPES:
            raise MinirlhfError(f"--precision {choice}: expected one of auto, {', '.join(DTYPES)}")
        return choice
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class LossScaler:
    """``torch.amp.GradScaler`` plus a count of the steps it skipped (gradients with inf/NaN).

    Per optimizer step: ``scale(loss).backward()`` per micro-batch, ``unscale_(optimizer)`` before
    clipping, then ``step(optimizer)``, which steps unless a gradient overflowed and returns
    whether it skipped. ``state_dict``/``load_state_dict`` include the count, for checkpoints.
    """

    def __init__(self, device):
        self.grad_scaler = torch.amp.GradScaler(torch.device(device).type)
        self.skipped = 0

    def scale(self, loss):
        return self.grad_scaler.scale(loss)

    def unscale_(self, optimizer):
        self.grad_scaler.unscale_(optimizer)

    def step(self, optimizer):
        """Step ``optimizer`` unless its unscaled gradients hold inf/NaN; update the scale; return
        True when the step was skipped."""
        before = self.grad_scaler.get_scale()
        self.grad_scaler.step(optimizer)
        self.grad_scaler.update()
        skipped = self.grad_scaler.get_scale() < before  # the scale backs off only after an overflow
        self.skipped += int(skipped)
        return skipped

    def metrics(self):
        """``{"loss_scale": S, "skipped_steps": steps skipped so far}`` for the logs."""
        return {"loss_scale": self.grad_scaler.get_scale(), "skipped_steps": self.skipped}

    def state_dict(self):
        return {"grad_scaler": self.grad_scaler.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state):
        self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.skipped = state["skipped"]


class Precision:
    """What ``--precision`` means on ``device``: ``autocast()`` around every forward, ``scaler`` (a
    ``LossScaler`` for fp16, else None) for the backward and the step, and ``dtype``, the compute
    dtype, in which the models that are never trained (reference, reward model) are loaded."""

    def __init__(self, choice, device):
        self.device = torch.device(device)
        self.name = choose_precision(choice, self.device)
        self.dtype = DTYPES[self.name]
        self.scaler = LossScaler(self.device) if self.name == "fp16" else None

    def autocast(self):
        """``torch.autocast`` in the compute dtype (weights stay float32); a no-op for fp32."""
        if self.name == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)
