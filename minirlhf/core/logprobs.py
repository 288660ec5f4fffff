"""Token log-probabilities and entropies from a language model's logits.

A causal LM's logits at position ``l`` score the token at ``l + 1``, so every RLHF loss starts
the same way::

    logits, labels, mask = shift_for_next_token(logits, input_ids, response_mask)  # [B,T,V],[B,T],[B,T]
    token_logps = gather_logprobs(logits, labels)                                  # [B,T] float32
    seq_logps = sequence_logprobs(token_logps, mask)                               # [B]

Memory is the point of this file. With Qwen's vocabulary (V = 151,936) the logits are the biggest
tensor of a step: B=8, T=1024 in bf16 is 2.5 GB. The obvious ``log_softmax(logits).gather(...)``
writes a second full-vocab tensor (and a float32 one if you upcast first, which you must for bf16
precision), and its backward holds two more. We need one number per position, so
``gather_logprobs`` and ``entropy_from_logits`` walk over the positions in chunks, upcast one
chunk at a time, and write their gradients by hand: peak extra memory is a small fraction of the
logits (see ``benchmarks/bench_logprobs.py``).

Masking is the caller's job: every position gets a value, and ``mask`` decides which count.
Labels must be real token ids (no ``-100`` "ignore index").
"""
import math

import torch

from minirlhf.core.shapes import ShapeError, check_shapes

# The logits go in this many chunks, twice as many for bf16/fp16 logits (their float32 chunk weighs
# twice its share of their bytes). A chunk needs exactly one chunk-sized float32 temporary (``z − m``,
# exponentiated in place), so the peak extra memory is ~1/12 ≈ 0.08 of the logits, under the 0.15
# budget with room for allocator slack; and 12–24 chunks are a few large kernels each, so a GPU is
# not launch-bound (a few hundred kernels per step where many small chunks would need thousands).
_CHUNKS = 12
# ... but a chunk is never smaller than this: small logits (the toy world's) go in one or a few
# chunks, so the Python loop over chunks costs nothing there.
_MIN_CHUNK_BYTES = 4 * 2**20


def shift_for_next_token(logits, input_ids, mask):
    """Align logits with the tokens they predict: the one place the next-token shift happens.

    The logits at position ``l`` are the model's distribution over token ``l + 1``, so::

        logits[:, :-1]   [B, T, V]   scores for positions 1..L-1
        input_ids[:, 1:] [B, T]      the labels: tokens at positions 1..L-1
        mask[:, 1:]      [B, T]      whether each label counts (1 = response token)

    with ``T = L - 1``. Everything token-level downstream (log-probs, KL, rewards, advantages) is
    ``[B, T]`` and aligned with the labels. Works for left and right padding alike.

    Shapes: ``logits`` ``[B, L, V]`` float (one position per input token: not already shifted),
    ``input_ids`` ``[B, L]`` long, ``mask`` ``[B, L]``, with ``L ≥ 2``.

    Hint: three slices; the mask follows the labels, not the logits.
    """
    check_shapes(
        "shift_for_next_token",
        input_ids=(input_ids, "B L", "long"),
        logits=(logits, "B L V", "float"),
        mask=(mask, "B L"),
    )
    if input_ids.shape[1] < 2:
        raise ShapeError(f"shift_for_next_token: input_ids must have L >= 2 positions, got {list(input_ids.shape)}")
    # BEGIN SOLUTION
    return logits[:, :-1], input_ids[:, 1:], mask[:, 1:]
    # END SOLUTION


def _chunk_logprobs(logits_chunk, labels_chunk, out=None, temperature=1.0):
    """The forward formula of ``gather_logprobs`` for one chunk of positions: the log-sum-exp trick.

    With ``m = max_j z_j`` and ``s = log Σ_j exp((z_j − m) / τ)`` (τ = ``temperature``, 1 for the
    model's own distribution)::

        log π(y | z) = z_y/τ − log Σ_j exp(z_j/τ) = (z_y − m)/τ − s

    Subtracting the max first keeps every ``exp`` in (0, 1]: no overflow for huge logits, and
    ``z_y − m`` stays exact where ``z_y − logsumexp(z)`` would round ``logsumexp`` away.

    Args: ``logits_chunk`` ``[..., V]`` in any float dtype, ``labels_chunk`` ``[...]`` long, ``out``
    None or a scratch buffer of the chunk's shape in the compute dtype (``_compute_dtype``: float32
    for bf16/fp16/float32 logits), which the caller reuses for every chunk. Returns
    ``(logprobs, m, s)``, each ``[...]`` in the compute dtype; backward rebuilds the softmax from them.

    Hint: ``amax`` in the compute dtype; ``_shifted_chunk`` writes ``(z − m)/τ`` into ``out``
    (``exp_`` and ``sum`` it in place); ``gather`` picks ``z_y``.
    """
    # BEGIN SOLUTION
    max_logit = logits_chunk.amax(dim=-1).to(_compute_dtype(logits_chunk))
    log_sum = _shifted_chunk(logits_chunk, max_logit, out, temperature).exp_().sum(dim=-1).log_()
    label_logit = logits_chunk.gather(-1, labels_chunk.unsqueeze(-1)).squeeze(-1).to(max_logit.dtype)
    return (label_logit - max_logit) / temperature - log_sum, max_logit, log_sum
    # END SOLUTION


class _GatherLogprobs(torch.autograd.Function):
    """``log softmax(z/τ)_y`` with a chunked forward and a hand-written, chunked backward."""

    @staticmethod
    def forward(ctx, logits, labels, temperature):
        compute_dtype = _compute_dtype(logits)
        logprobs = logits.new_empty(labels.shape, dtype=compute_dtype)
        max_logit, log_sum = torch.empty_like(logprobs), torch.empty_like(logprobs)
        scratch = _scratch(logits, compute_dtype)
        for rows in _row_blocks(logits, compute_dtype):
            # One float32 chunk at a time: bf16 logits give float32-accurate log-probs.
            chunk = logits[rows]
            logprobs[rows], max_logit[rows], log_sum[rows] = _chunk_logprobs(
                chunk, labels[rows], _view(scratch, chunk), temperature)
        ctx.temperature = temperature
        ctx.save_for_backward(logits, labels, max_logit, log_sum)  # references, not copies
        return logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs):
        logits, labels, max_logit, log_sum = ctx.saved_tensors
        grad_logits, scratch = _gradient_buffers(logits, log_sum.dtype)
        grad_logprobs = grad_logprobs / ctx.temperature  # the chain rule through z/τ
        for rows in _row_blocks(logits, log_sum.dtype):
            out = grad_logits[rows] if scratch is None else _view(scratch, logits[rows])
            _chunk_logprobs_backward(
                logits[rows], labels[rows], max_logit[rows], log_sum[rows], grad_logprobs[rows], out, ctx.temperature
            )
            if scratch is not None:
                grad_logits[rows] = out  # round to the logits' dtype
        return grad_logits, None, None


def _chunk_logprobs_backward(logits_chunk, labels_chunk, max_logit, log_sum, grad_logprobs, out, temperature=1.0):
    """Write ``g · (onehot(y) − softmax(z/τ))``, the gradient of ``g · log softmax(z/τ)_y`` with
    respect to ``z/τ``, into ``out`` (the caller folds the chain rule's 1/τ into ``g``).

    ``d/dz_j [z_y − logsumexp(z)] = 1[j = y] − p_j``, with ``p_j = exp((z_j − m)/τ) · exp(−s)``
    rebuilt from the forward's ``m`` and ``s``. ``out``: the chunk's shape, in ``max_logit``'s dtype
    (it may be ``logits_chunk`` itself). Returns ``out``.
    """
    grad = _shifted_chunk(logits_chunk, max_logit, out, temperature).exp_()  # exp((z − m)/τ)
    g = grad_logprobs.to(grad.dtype).unsqueeze(-1)
    grad.mul_(-g * torch.exp(-log_sum).unsqueeze(-1))  # −g · p
    return grad.scatter_add_(-1, labels_chunk.unsqueeze(-1), g)  # + g at the label


def gather_logprobs(logits, labels, temperature=1.0):
    """Log-probability of each label: ``log π(y_t) = log softmax(z_t)[y_t] = z_{t,y} − log Σ_j exp(z_{t,j})``.

    Shapes: ``logits`` ``[B, T, V]`` (any float dtype), ``labels`` ``[B, T]`` long, already aligned
    (see ``shift_for_next_token``). Returns ``[B, T]`` float32 (float64 for float64 logits), computed
    in float32 even for bf16/fp16 logits. No mask: every position gets a value, the caller masks.

    ``temperature`` τ > 0 gives the log-probs of the tempered distribution ``softmax(z / τ)`` (the
    one a sampler at temperature τ draws from), divided chunk by chunk *after* the float32 upcast,
    as the sampler divides: ``bf16(z) / τ`` would round the logits once more.

    Memory: no full-vocab float32 ``log_softmax`` is ever built. The forward walks over chunks of
    positions, upcasts one chunk at a time and keeps two numbers per position, ``m = max_j z_j`` and
    ``s = log Σ_j exp(z_j − m)``. The backward is written by hand from the lovely identity

        ∂/∂z_j log softmax(z)_y = 1[j = y] − softmax(z)_j

    (the label's logit is pushed up by ``1 − p_y``, every other logit down by its probability
    ``p_j``; the gradient sums to zero because adding a constant to all logits changes nothing).
    It writes ``g_t · (onehot(y_t) − softmax(z_t))`` chunk by chunk into the one gradient tensor it
    returns, recomputing ``softmax(z_t) = exp(z_t − m_t − s_t)`` from the saved logits. Peak extra
    memory is one float32 chunk, ~0.08× the logits, forward and backward
    (``benchmarks/bench_logprobs.py``).

    Numerics: the max is subtracted before any ``exp``, so huge logits are fine; a ``-inf`` logit is
    a token of probability 0 (gradient 0; as the label it gives ``-inf``). ``+inf`` logits or an
    all ``-inf`` row have no log-probabilities and give NaN.
    """
    check_shapes("gather_logprobs", logits=(logits, "B T V", "float"), labels=(labels, "B T", "long"))
    _check_temperature("gather_logprobs", temperature)
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[-1]):
        raise ValueError(
            f"gather_logprobs: labels must be token ids in [0, {logits.shape[-1]}), got values in "
            f"[{labels.min().item()}, {labels.max().item()}]; mask positions out instead of using an ignore index"
        )
    return _GatherLogprobs.apply(logits, labels, float(temperature))


def _chunk_entropy(logits_chunk, out=None, temperature=1.0):
    """``H = −Σ_j p_j log p_j`` of ``softmax(z/τ)`` for one chunk (any float dtype; in ``_compute_dtype``): ``(H, m, s)``.

    With ``e_j = exp((z_j − m)/τ)`` and ``s = log Σ_j e_j``: ``H = s − Σ_j e_j (z_j − m)/τ / Σ_j e_j``. Since
    ``(z_j − m)/τ = log e_j``, the sum is ``Σ_j entr(e_j)`` with ``entr(x) = −x log x``, computed in place
    on the one buffer that holds ``e``; ``entr(0) = 0``, so a ``-inf`` logit adds 0, not ``0·(−inf)``.
    ``out``: None or a scratch buffer, as for ``_chunk_logprobs``.
    """
    max_logit = logits_chunk.amax(dim=-1).to(_compute_dtype(logits_chunk))
    unnormalised = _shifted_chunk(logits_chunk, max_logit, out, temperature).exp_()  # e = exp((z − m)/τ)
    total = unnormalised.sum(dim=-1)
    surprise = torch.special.entr(unnormalised, out=unnormalised).sum(dim=-1) / total  # −Σ p (z − m)
    log_sum = total.log()
    return log_sum + surprise, max_logit, log_sum


class _Entropy(torch.autograd.Function):
    """Entropy of softmax(z/τ) per position, chunked forward and hand-written chunked backward."""

    @staticmethod
    def forward(ctx, logits, temperature):
        compute_dtype = _compute_dtype(logits)
        entropy = logits.new_empty(logits.shape[:-1], dtype=compute_dtype)
        max_logit, log_sum = torch.empty_like(entropy), torch.empty_like(entropy)
        scratch = _scratch(logits, compute_dtype)
        for rows in _row_blocks(logits, compute_dtype):
            chunk = logits[rows]
            entropy[rows], max_logit[rows], log_sum[rows] = _chunk_entropy(chunk, _view(scratch, chunk), temperature)
        ctx.temperature = temperature
        ctx.save_for_backward(logits, max_logit, log_sum, entropy)
        return entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_entropy):
        logits, max_logit, log_sum, entropy = ctx.saved_tensors
        grad_logits, scratch = _gradient_buffers(logits, log_sum.dtype)
        grad_entropy = grad_entropy / ctx.temperature  # the chain rule through z/τ
        for rows in _row_blocks(logits, log_sum.dtype):
            out = grad_logits[rows] if scratch is None else _view(scratch, logits[rows])
            _chunk_entropy_backward(
                logits[rows], max_logit[rows], log_sum[rows], entropy[rows], grad_entropy[rows], out, ctx.temperature
            )
            if scratch is not None:
                grad_logits[rows] = out  # round to the logits' dtype
        return grad_logits, None


def _chunk_entropy_backward(logits_chunk, max_logit, log_sum, entropy, grad_entropy, out, temperature=1.0):
    """Write ``−g · p_j (log p_j + H)``, the gradient of ``g · H`` with respect to ``z/τ``, into ``out``
    (as above; the caller folds the chain rule's 1/τ into ``g``); return it.

    Raising a logit whose surprise ``−log p_j`` is below the average surprise ``H`` concentrates
    the distribution and lowers the entropy. One buffer suffices: with ``u_j = log p_j + H =
    (z_j − m) − s + H`` we have ``p_j = exp(u_j − H)``, so ``−p_j u_j = exp(−H) · entr(exp(u_j))``
    (``entr(x) = −x log x``; ``exp(u) ≤ exp(H) ≤ V`` cannot overflow, and ``p = 0`` gives 0).
    """
    grad = _shifted_chunk(logits_chunk, max_logit, out, temperature)  # (z − m)/τ
    grad.add_((entropy - log_sum).unsqueeze(-1)).exp_()  # exp(u)
    scale = grad_entropy.to(grad.dtype) * torch.exp(-entropy)
    return torch.special.entr(grad, out=grad).mul_(scale.unsqueeze(-1))


def entropy_from_logits(logits, temperature=1.0):
    """Entropy of the next-token distribution: ``H(z) = −Σ_j p_j log p_j = logsumexp(z) − Σ_j p_j z_j``.

    Shapes: ``logits`` ``[B, T, V]`` (any float dtype) → ``[B, T]`` float32 (float64 for float64
    logits). No mask; the caller masks (e.g. ``masked_mean(entropy, mask)``). ``temperature`` τ
    gives the entropy of ``softmax(z / τ)``, divided after the float32 upcast (``gather_logprobs``).

    Differentiable, with the hand-written gradient ``∂H/∂z_j = −p_j (log p_j + H)``. Memory is lean
    the same way as ``gather_logprobs``: chunked over positions, one upcast chunk at a time, and
    the backward writes into the one gradient tensor it returns (peak extra: one float32 chunk, ~0.08×
    the logits).
    Tokens with ``-inf`` logits have p = 0 and contribute ``0 · log 0 = 0``.
    """
    check_shapes("entropy_from_logits", logits=(logits, "B T V", "float"))
    _check_temperature("entropy_from_logits", temperature)
    return _Entropy.apply(logits, float(temperature))


def sequence_logprobs(token_logprobs, mask, average=False):
    """Log-probability of each response: ``log π(y|x) = Σ_t mask_t · log π(y_t | x, y_<t)``.

    ``average=True`` gives the length-normalised ``Σ_t mask_t log π_t / Σ_t mask_t`` that SimPO,
    ORPO and IPO use. Shapes: ``token_logprobs`` ``[B, T]``, ``mask`` ``[B, T]`` (bool or 0/1
    float, 1 = the token counts) → ``[B]``. Masked positions are ignored whatever they hold (even
    NaN or -inf from padding), and an all-masked row gives 0, never NaN.

    Hint: select with ``torch.where`` rather than multiplying (``0 · -inf`` is NaN); divide by the
    token count clamped to at least 1.
    """
    check_shapes("sequence_logprobs", token_logprobs=(token_logprobs, "B T", "float"), mask=(mask, "B T"))
    # BEGIN SOLUTION
    mask = mask.bool()
    total = torch.where(mask, token_logprobs, 0.0).sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total
    # END SOLUTION


def _compute_dtype(logits):
    """float32 for bf16/fp16/float32 logits, float64 for float64 (gradient checks)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _row_blocks(logits, compute_dtype):
    """Index tuples ``(batch slice, position slice)`` covering ``logits[:, :, :]`` in chunks.

    ``_CHUNKS`` chunks (24 for bf16 logits), fewer where a chunk in ``compute_dtype`` would be
    smaller than ``_MIN_CHUNK_BYTES``. A chunk is whole sequences or an equal piece of one
    sequence, so a non-contiguous view such as ``logits[:, :-1]`` is never copied.
    """
    batch, length, vocab = logits.shape
    compute_bytes = logits.numel() * compute_dtype.itemsize
    chunks = min(_CHUNKS * compute_dtype.itemsize // logits.element_size(),
                 math.ceil(compute_bytes / max(_MIN_CHUNK_BYTES, 1)))
    chunks = max(1, chunks)
    if chunks <= max(batch, 1):
        per = max(1, batch // chunks)  # whole sequences, never more than a chunk's share
        for b in range(0, batch, per):
            yield slice(b, b + per), slice(None)
    else:
        rows = math.ceil(length / math.ceil(chunks / batch))  # each sequence in equal pieces
        for b in range(batch):
            for t in range(0, length, rows):
                yield slice(b, b + 1), slice(t, t + rows)


def _scratch(logits, compute_dtype):
    """One buffer, the size of the largest chunk in ``compute_dtype``, that every chunk of a pass works in.

    A single allocation per pass: a new chunk-sized temporary per chunk would let the allocator
    keep a freed one resident beside the next (glibc does, once small tensors split the hole).
    """
    first = next(_row_blocks(logits, compute_dtype), None)
    numel = 0 if first is None else logits[first].numel()
    return torch.empty(numel, dtype=compute_dtype, device=logits.device)


def _view(scratch, chunk):
    """The first ``chunk.numel()`` elements of ``scratch``, shaped like ``chunk``."""
    return scratch[: chunk.numel()].view(chunk.shape)


def _gradient_buffers(logits, compute_dtype):
    """The gradient tensor a backward returns, and a scratch buffer unless the gradient's own chunks can
    serve (float32 logits: each chunk's gradient is computed in place in its slice of the result)."""
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return grad_logits, None if logits.dtype == compute_dtype else _scratch(logits, compute_dtype)


def _shifted_chunk(logits_chunk, max_logit, out=None, temperature=1.0):
    """``(z − m)/τ`` in ``max_logit``'s dtype, written into ``out`` (the chunk's shape, that dtype) or a new tensor.

    bf16/fp16 logits are upcast by the copy into ``out`` itself, then shifted and divided in place:
    no other temporary (on the CPU a mixed-dtype ``z − m`` would make a float32 copy, then the
    result), and the temperature divides float32 numbers, never the rounded half-precision ones.
    """
    if out is None:
        out = torch.empty(logits_chunk.shape, dtype=max_logit.dtype, device=logits_chunk.device)
    if logits_chunk.dtype != out.dtype:
        shifted = out.copy_(logits_chunk).sub_(max_logit.unsqueeze(-1))
    else:
        shifted = torch.sub(logits_chunk, max_logit.unsqueeze(-1), out=out)
    return shifted if temperature == 1.0 else shifted.div_(temperature)


def _check_temperature(function, temperature):
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{function}: temperature must be a finite number > 0, got {temperature!r}")
