"""Data parallelism: N processes (ranks) train one model exactly as one process would.

    torchrun --standalone --nproc_per_node 4 -m minirlhf dpo ...              # one machine, 4 GPUs

Each rank holds the model (``parallel.py``: a DDP copy, or FSDP2 shards) and takes an equal,
contiguous share of every optimizer step's batch (``rank_share``). One process would step along
``∇L = Σ_k (n_k / N) ∇L_k`` over its micro-batches, ``L_k`` averaging over ``n_k`` items (tokens or
examples), ``N = Σ_k n_k``. Over ranks the sum runs over every rank's micro-batches, so ``N`` counts
all of them (one all-reduce) and each rank backpropagates ``W · (n_k / N) · L_k``: DDP *averages*
the ranks' gradients (``data_parallel_weights``). Dividing by a rank's own count ``N_r`` instead
gives another gradient whenever the ranks hold different numbers of tokens.

What the math takes over the whole batch is taken over all ranks: PPO's advantage whitening
(``global_masked_whiten``), KTO's z0, the adaptive controller's KL, the logged metrics
(``mean_over_ranks``). The online trainers sample on each rank its share of the prompts, with the
rank's own random stream (seeded ``seed + rank``): their rollouts differ from one process's.
Without torchrun there is no process group: world size 1, rank 0, every function returns its input.
"""
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from minirlhf.core.masked import masked_sum, masked_whiten
from minirlhf.core.shapes import check_shapes
from minirlhf.errors import MinirlhfError

_alone = False  # set by `single_process`: this rank works by itself for a while


def init_distributed(device=None):
    """Join torchrun's process group (once) when torchrun started this process (``RANK`` is set).

    CUDA tensors travel over NCCL, CPU tensors over gloo (the scalars below live on the CPU); each
    process drives the GPU ``LOCAL_RANK`` of its machine.
    """
    if "RANK" not in os.environ or dist.is_initialized():
        return
    if torch.cuda.is_available() and torch.device(device or "cuda").type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")


def world_size():
    """W, the number of processes training together (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() and not _alone else 1


def rank():
    """This process's rank, 0 … W−1 (0 without torchrun)."""
    return dist.get_rank() if world_size() > 1 else 0


def local_rank():
    """This process's index on its machine: the GPU it drives."""
    return int(os.environ.get("LOCAL_RANK", 0)) if world_size() > 1 else 0


def is_main():
    """Rank 0: the one that logs and writes checkpoints and the final model."""
    return rank() == 0


def barrier():
    """Wait until every rank gets here."""
    if world_size() > 1:
        dist.barrier()


@contextmanager
def single_process():
    """Run the enclosed code as a lone process (no collectives), e.g. one rank building a cache."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


@contextmanager
def local_main_first():
    """The enclosed code runs on each machine's local rank 0 (alone) first, then on the other ranks
    (for a cache one rank builds and the others read, e.g. the toy world)."""
    if local_rank() == 0:
        with single_process():
            yield
        barrier()
    else:
        barrier()
        with single_process():
            yield


def all_reduce_sum(value):
    """``Σ_r value_r`` over the ranks: a number (returned as a float) or a tensor."""
    if world_size() == 1:
        return value
    total = value.detach().clone() if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(total)
    return total if torch.is_tensor(value) else float(total)


def gather_objects(value):
    """``[value_0, …, value_{W−1}]``: every rank's picklable ``value``, on every rank."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast(value):
    """Rank 0's picklable ``value``, on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(items):
    """The lists ``items`` of every rank, concatenated in rank order (e.g. the sampled texts)."""
    return [item for part in gather_objects(list(items)) for item in part]


def mean_over_ranks(metrics):
    """The mean over the ranks of a number, or of each value of a dict of numbers (same keys on every
    rank). Exact for the global mean when every rank holds an equal share of the batch."""
    if world_size() == 1:
        return metrics
    if not isinstance(metrics, dict):
        return all_reduce_sum(float(metrics)) / world_size()
    per_rank = gather_objects({k: float(v) for k, v in metrics.items()})
    if any(m.keys() != per_rank[0].keys() for m in per_rank):
        raise RuntimeError(f"ranks logged different metrics: {[sorted(m) for m in per_rank]}")
    return {k: sum(m[k] for m in per_rank) / len(per_rank) for k in per_rank[0]}


def rank_range(n):
    """This rank's contiguous part of ``range(n)``: ``range(r·n//W, (r+1)·n//W)``."""
    return range(rank() * n // world_size(), (rank() + 1) * n // world_size())


def per_rank(count, option="--batch-size"):
    """``count / W``: the per-rank size of a global ``count`` (an error names ``option`` unless W divides it)."""
    if count % world_size():
        raise MinirlhfError(f"{option} {count} cannot be split evenly across {world_size()} processes: "
                            f"make it a multiple of {world_size()}")
    return count // world_size()


def rank_share(items, option="--batch-size"):
    """This rank's equal, contiguous share of a global batch (``items``: example indices, prompts)."""
    per_rank(len(items), option)  # raises unless W divides the batch
    part = rank_range(len(items))
    return items[part.start : part.stop]


def data_parallel_weights(counts):
    """Gradient-accumulation weights of this rank's micro-batches: ``w_k = W · n_k / N``.

    ``counts[k] = n_k`` counts what micro-batch k's loss averages over (tokens or examples);
    ``N = Σ n`` over *every rank's* micro-batches (one all-reduce). DDP and FSDP average the ranks'
    gradients, dividing by W, so ``Σ_ranks Σ_k (n_k / N) ∇L_k`` — the whole batch's gradient —
    is what the ranks step with. One process: ``n_k / Σ_k n_k`` (``batches.accumulation_weights``).
    """
    total = all_reduce_sum(float(sum(counts)))
    return [world_size() * n / max(total, 1.0) for n in counts]


def pad_micro_batches(micro, placeholder):
    """``micro`` plus copies of ``placeholder`` (a micro-batch whose count, hence weight, is 0) up to
    the most micro-batches any rank has: every rank then runs as many forward/backward passes, so a
    rank without data still joins the gradient all-reduce, and FSDP's all-gathers pair up."""
    return micro + [placeholder] * (max(gather_objects(len(micro))) - len(micro))


def global_masked_whiten(x, mask, eps=1e-8):
    """``masked_whiten`` with the mean and (unbiased) variance over the valid elements of *all ranks*:
    ``μ = Σ_r Σ m·x / n``, ``σ² = Σ_r Σ m·(x − μ)² / (n − 1)``, ``n = Σ_r Σ m``.

    Shapes: ``x``, ``mask`` of one shape (e.g. ``[B, T]``); returns ``x``'s shape, 0 where ``mask`` is 0.
    Equals ``masked_whiten`` of all ranks' rows concatenated (one process: exactly ``masked_whiten``).
    """
    check_shapes("global_masked_whiten", x=(x, "..."), mask=(mask, "..."), eps=(eps, "scalar"))
    if world_size() == 1:
        return masked_whiten(x, mask, eps=eps)
    n = float(all_reduce_sum(masked_sum(torch.ones_like(x), mask)))
    if n < 2:
        raise ValueError(f"global_masked_whiten: {n:.0f} valid element(s) over all ranks; a variance needs 2")
    mean = all_reduce_sum(masked_sum(x, mask)) / n
    var = all_reduce_sum(masked_sum((x - mean) ** 2, mask)) / (n - 1)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + eps), torch.zeros_like(x))
