"""The model across ranks: DDP (a whole copy on each rank) or FSDP2 (each rank holds a shard), and
whole-tensor state for checkpoints that any number of processes can load.

- **DDP** (``DistributedDataParallel``, the default): every rank keeps all weights, gradients and
  AdamW moments; the backward of a step's last micro-batch averages the gradients over the ranks
  (an all-reduce per bucket of parameters, overlapped with the backward).
- **FSDP2** (``--fsdp``, ``torch.distributed.fsdp.fully_shard``): each decoder layer's weights,
  gradients and AdamW moments are split across the ranks — 16 bytes per float32 parameter become
  16/W. A layer's weights are all-gathered just before it runs; its gradients are reduce-scattered
  (averaged) after its backward, so each rank keeps and updates only its shard.

Both average the ranks' gradients: ``distributed.data_parallel_weights`` multiplies by W to undo
it. Checkpoints hold whole tensors in either layout: FSDP's shards are gathered to rank 0 on save
(``full_state_dict``, ``full_optimizer_state``) and cut again on load (``load_optimizer_state``), so
a run resumes on any number of processes and ``from_pretrained`` loads its models on one.
"""
from contextlib import ExitStack, contextmanager

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from minirlhf.train.distributed import is_main, world_size


def data_parallel(model, fsdp=False, reshard_after_forward=True):
    """The model the training forward passes go through: ``model`` in DDP, or sharded in place by
    FSDP2 with ``fsdp`` (each Hugging Face decoder layer, then the rest); ``model`` itself in one
    process. Build the optimizer afterwards: FSDP replaces the parameters by their shards.

    ``reshard_after_forward=False`` keeps gathered weights until the next backward: the online
    trainers' sampling runs a different number of forward passes on each rank, which then gather
    nothing (and sampling needs the whole weights anyway).
    """
    if world_size() == 1:
        return model
    if not fsdp:
        on_gpu = next(model.parameters()).is_cuda
        return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if on_gpu else None,
                                       broadcast_buffers=False)  # the buffers (rotary tables) never change
    layers = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, reshard_after_forward=reshard_after_forward)
    return fully_shard(model, reshard_after_forward=reshard_after_forward)


@contextmanager
def gradient_sync(models, last):
    """Around one micro-batch's forward and backward: average the gradients over the ranks only when
    ``last``; the other micro-batches accumulate locally (DDP's ``no_sync()``, FSDP's
    ``set_requires_gradient_sync(False)``). ``models``: a model from ``data_parallel`` or a tuple."""
    with ExitStack() as stack:
        for model in models if isinstance(models, tuple) else (models,):
            if isinstance(model, DistributedDataParallel) and not last:
                stack.enter_context(model.no_sync())
            elif isinstance(model, FSDPModule):
                model.set_requires_gradient_sync(last)
        yield


def whole_tensor(tensor):
    """A tensor gathered from its FSDP shards (every rank must call it), else the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _to_main(tensor):
    """``whole_tensor`` on the CPU of rank 0 (None elsewhere): one tensor at a time, so no rank ever
    holds a whole model's state."""
    whole = whole_tensor(tensor.detach())
    return whole.cpu() if is_main() else None


def full_state_dict(module):
    """``module.state_dict()`` with whole tensors. Under FSDP every rank takes part in gathering the
    shards, one tensor at a time, and rank 0 receives them on the CPU (the others an empty dict);
    a weight tied under two names (embeddings and LM head) stays one tensor."""
    if not isinstance(module, FSDPModule):
        return module.state_dict()
    gathered, whole = {}, {}  # gathered: id(parameter) -> whole tensor, so a tied weight is gathered once
    for name, param in module.state_dict(keep_vars=True).items():
        if id(param) not in gathered:
            gathered[id(param)] = _to_main(param)
        whole[name] = gathered[id(param)]
    return whole if is_main() else {}


def full_optimizer_state(optimizer):
    """``optimizer.state_dict()`` with whole tensors (FSDP: gathered to rank 0, as ``full_state_dict``)."""
    state = optimizer.state_dict()
    if not any(isinstance(v, DTensor) for moments in state["state"].values() for v in moments.values()):
        return state
    moments = {i: {k: _to_main(v) for k, v in s.items()} for i, s in state["state"].items()}
    return {"state": moments, "param_groups": state["param_groups"]} if is_main() else {}


def load_optimizer_state(optimizer, state):
    """``optimizer.load_state_dict`` of whole tensors; under FSDP each rank keeps its own shard."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, moments in state["state"].items():
        param = params[index]
        for key, value in moments.items():
            if isinstance(param, DTensor) and value.shape == param.shape:  # the moments, not the step count
                moments[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                                 src_data_rank=None)
    optimizer.load_state_dict(state)


def load_full_state_dict(module, state):
    """``module.load_state_dict`` of whole tensors; under FSDP each rank keeps its own shard."""
    if isinstance(module, FSDPModule):
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(state)
