"""Batches of one optimizer step: micro-batches and their gradient-accumulation weights.

A batch of ``B`` examples is split into micro-batches; micro-batch ``k`` contributes
``w_k ∇L_k`` with ``w_k = n_k / Σ_j n_j``, where ``n_k`` counts what ``L_k`` averages over
(examples for per-example means, tokens for token means). Then ``Σ_k w_k ∇L_k = ∇L_big``
exactly (up to float rounding), whatever the split: the step does not depend on
``--micro-batch-size``, only the memory does. Under torchrun the sum runs over every rank's
micro-batches (``distributed.data_parallel_weights``).
"""
import torch

from minirlhf.data.collate import collate_sft, to_device


def micro_batches(indices, micro_batch_size):
    """Split one batch's example indices into consecutive micro-batches (0 = no split)."""
    size = micro_batch_size if micro_batch_size > 0 else len(indices)
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def accumulation_weights(counts):
    """``w_k = n_k / Σ_j n_j`` for micro-batches whose losses average over ``counts[k]`` items."""
    total = sum(counts)
    return [n / max(total, 1.0) for n in counts]


def response_tokens(batch):
    """The number of response labels of a batch (what a token-mean loss averages over), a float."""
    return float(batch["response_mask"][:, 1:].sum())


def ptx_batch(examples, pad_id, n, device):
    """``n`` random SFT examples for PPO's ptx term, as ``ptx_``-prefixed tensors."""
    rows = torch.randint(len(examples), (n,)).tolist()
    batch = to_device(collate_sft([examples[i] for i in rows], pad_id), device)
    return {f"ptx_{k}": batch[k] for k in ("input_ids", "attention_mask", "response_mask")}


def select_rows(batch, rows):
    """The rows ``rows`` (a list or long tensor) of every ``[B, ...]`` tensor in ``batch``."""
    rows = torch.as_tensor(rows)
    return {k: v[rows.to(v.device)] for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 0}
