"""Runtime: the device, the training dtype and autocast, seeding and the RNG states, thread count.

CUDA when available, else the CPU. Weights train in float32; on CUDA the matmuls run in bf16 under
``autocast``. ``seed_everything`` seeds Python, NumPy and torch; a checkpoint stores ``rng_state()``
(each rank's, under torchrun) so that a resumed run draws exactly the random numbers (dropout,
sampling) it would have drawn.
"""
import random
from contextlib import contextmanager

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from minirlhf.train.distributed import local_rank, world_size


def select_device(device=None):
    """``torch.device(device)``, or CUDA when available, else CPU. Under torchrun, CUDA means this
    process's GPU (``cuda:LOCAL_RANK``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and world_size() > 1:
        return torch.device("cuda", local_rank())
    return device


# Trained weights are loaded in float32 whatever the checkpoint stores (Qwen2.5 ships bf16): AdamW
# updates of size lr·1e-3 vanish when rounded to bf16's 8 mantissa bits. The matmuls still run in
# the compute dtype through ``precision.Precision.autocast``.
TRAIN_DTYPE = torch.float32


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """All RNG states, to store in a checkpoint."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what ``rng_state`` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def quiet_transformers():
    """Turn off transformers' own progress bars ("Loading weights"): ours is the one to watch."""
    hf_logging.disable_progress_bar()


@contextmanager
def torch_threads(num_threads):
    """Run the block with ``torch.set_num_threads(num_threads)``; the caller's count is restored.

    A float sum split across more threads adds in another order, so a CPU run is bit-reproducible
    only at a fixed thread count (what the toy world's cached SFT policy is built with).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
