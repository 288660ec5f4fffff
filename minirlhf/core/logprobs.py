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

# One float32 chunk may take this fraction of the logits' bytes. A chunk holds at most three
# chunk-sized float32 temporaries (for bf16 logits: the upcast copy, z − max and its exp), so the
# peak extra memory stays below 3/64 ≈ 0.05 of the logits, leaving room for allocator slack
# (glibc keeps a freed chunk or two resident) under the 0.15 budget.
_CHUNK_FRACTION = 1 / 64
# ... but never smaller than this: small logits (the toy world's) go in one or a few chunks, so the
# Python loop over chunks costs nothing there.
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


def _chunk_logprobs(logits_chunk, labels_chunk):
    """The forward formula of ``gather_logprobs`` for one chunk of positions: the log-sum-exp trick.

    With ``m = max_j z_j`` and ``s = log Σ_j exp(z_j − m)``::

        log π(y | z) = z_y − log Σ_j exp(z_j) = (z_y − m) − s

    Subtracting the max first keeps every ``exp`` in (0, 1]: no overflow for huge logits, and
    ``z_y − m`` stays exact where ``z_y − logsumexp(z)`` would round ``logsumexp`` away.

    Args: ``logits_chunk`` ``[..., V]`` (already float32 or float64), ``labels_chunk`` ``[...]``
    long. Returns ``(logprobs, m, s)``, each ``[...]``; backward rebuilds the softmax from ``m, s``.

    Hint: ``amax``, then ``exp`` and ``sum`` of the shifted logits; ``gather`` picks ``z_y``.
    """
    # BEGIN SOLUTION
    max_logit = logits_chunk.amax(dim=-1)
    log_sum = (logits_chunk - max_logit.unsqueeze(-1)).exp_().sum(dim=-1).log_()
    label_logit = logits_chunk.gather(-1, labels_chunk.unsqueeze(-1)).squeeze(-1)
    return (label_logit - max_logit) - log_sum, max_logit, log_sum
    # END SOLUTION


class _GatherLogprobs(torch.autograd.Function):
    """``log softmax(z)_y`` with a chunked forward and a hand-written, chunked backward."""

    @staticmethod
    def forward(ctx, logits, labels, temperature):
        compute_dtype = _compute_dtype(logits)
        logprobs = logits.new_empty(labels.shape, dtype=compute_dtype)
        max_logit, log_sum = torch.empty_like(logprobs), torch.empty_like(logprobs)
        for rows in _row_blocks(logits, compute_dtype):
            # Upcast one chunk at a time (then divide by τ): bf16 logits give float32-accurate log-probs.
            logprobs[rows], max_logit[rows], log_sum[rows] = _chunk_logprobs(
                _upcast_chunk(logits[rows], compute_dtype, temperature), labels[rows]
            )
        ctx.temperature = temperature
        ctx.save_for_backward(logits, labels, max_logit, log_sum)  # references, not copies
        return logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs):
        logits, labels, max_logit, log_sum = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_logprobs = grad_logprobs / ctx.temperature  # the chain rule through z/τ
        for rows in _row_blocks(logits, log_sum.dtype):
            _chunk_logprobs_backward(
                logits[rows], labels[rows], max_logit[rows], log_sum[rows], grad_logprobs[rows], out=grad_logits[rows],
                temperature=ctx.temperature,
            )
        return grad_logits, None, None


def _chunk_logprobs_backward(logits_chunk, labels_chunk, max_logit, log_sum, grad_logprobs, out, temperature=1.0):
    """Write ``g · (onehot(y) − softmax(z))`` into ``out``, the gradient of ``g · log softmax(z)_y``.

    ``d/dz_j [z_y − logsumexp(z)] = 1[j = y] − p_j``, with ``p_j = exp(z_j − m) · exp(−s)``
    rebuilt from the forward's ``m`` and ``s`` (``z`` = the logits divided by ``temperature``;
    the caller has divided ``g`` by it too). A function of its own so that the chunk's temporary
    dies before the next chunk allocates its own.
    """
    grad = _shifted_chunk(logits_chunk, max_logit, out, temperature).exp_()  # exp(z − m)
    g = grad_logprobs.to(grad.dtype).unsqueeze(-1)
    grad.mul_(-g * torch.exp(-log_sum).unsqueeze(-1))  # −g · p
    grad.scatter_add_(-1, labels_chunk.unsqueeze(-1), g)  # + g at the label
    out.copy_(grad)  # a no-op when `grad` already is `out`


def gather_logprobs(logits, labels, temperature=1.0):
    """Log-probability of each label: ``log π(y_t) = log softmax(z_t)[y_t] = z_{t,y} − log Σ_j exp(z_{t,j})``.

    Shapes: ``logits`` ``[B, T, V]`` (any float dtype), ``labels`` ``[B, T]`` long, already aligned
    (see ``shift_for_next_token``). Returns ``[B, T]`` float32 (float64 for float64 logits), computed
    in float32 even for bf16/fp16 logits. No mask: every position gets a value, the caller masks.

    ``temperature`` τ > 0 gives the log-probs of the tempered distribution ``softmax(z / τ)`` (the
    one a sampler at temperature τ draws from). The division happens chunk by chunk *after* the
    float32 upcast, as the sampler does it: ``bf16(z) / τ`` would round the logits once more.

    Memory: no full-vocab float32 ``log_softmax`` is ever built. The forward walks over chunks of
    positions, upcasts one chunk at a time and keeps two numbers per position, ``m = max_j z_j`` and
    ``s = log Σ_j exp(z_j − m)``. The backward is written by hand from the lovely identity

        ∂/∂z_j log softmax(z)_y = 1[j = y] − softmax(z)_j

    (the label's logit is pushed up by ``1 − p_y``, every other logit down by its probability
    ``p_j``; the gradient sums to zero because adding a constant to all logits changes nothing).
    It writes ``g_t · (onehot(y_t) − softmax(z_t))`` chunk by chunk into the one gradient tensor it
    returns, recomputing ``softmax(z_t) = exp(z_t − m_t − s_t)`` from the saved logits. Peak extra
    memory is under 0.07× the logits, forward and backward (``benchmarks/bench_logprobs.py``).

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


def _chunk_entropy(logits_chunk):
    """``H = −Σ_j p_j log p_j = s − Σ_j p_j (z_j − m)`` for one float32/float64 chunk; returns ``(H, m, s)``."""
    max_logit = logits_chunk.amax(dim=-1)
    shifted = logits_chunk - max_logit.unsqueeze(-1)
    unnormalised = shifted.exp()  # exp(z − m) = p · exp(s)
    total = unnormalised.sum(dim=-1)
    expected_shifted = unnormalised.mul_(_finite(shifted)).sum(dim=-1) / total  # Σ p (z − m), 0·(−inf) → 0
    log_sum = total.log()
    return log_sum - expected_shifted, max_logit, log_sum


class _Entropy(torch.autograd.Function):
    """Entropy of softmax(z) per position, chunked forward and hand-written chunked backward."""

    @staticmethod
    def forward(ctx, logits, temperature):
        compute_dtype = _compute_dtype(logits)
        entropy = logits.new_empty(logits.shape[:-1], dtype=compute_dtype)
        max_logit, log_sum = torch.empty_like(entropy), torch.empty_like(entropy)
        for rows in _row_blocks(logits, compute_dtype):
            entropy[rows], max_logit[rows], log_sum[rows] = _chunk_entropy(
                _upcast_chunk(logits[rows], compute_dtype, temperature))
        ctx.temperature = temperature
        ctx.save_for_backward(logits, max_logit, log_sum, entropy)
        return entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_entropy):
        logits, max_logit, log_sum, entropy = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_entropy = grad_entropy / ctx.temperature  # the chain rule through z/τ
        for rows in _row_blocks(logits, log_sum.dtype):
            _chunk_entropy_backward(
                logits[rows], max_logit[rows], log_sum[rows], entropy[rows], grad_entropy[rows], out=grad_logits[rows],
                temperature=ctx.temperature,
            )
        return grad_logits, None


def _chunk_entropy_backward(logits_chunk, max_logit, log_sum, entropy, grad_entropy, out, temperature=1.0):
    """Write ``−g · p_j (log p_j + H)`` into ``out``, the gradient of ``g · H(z)``.

    Raising a logit whose surprise ``−log p_j`` is below the average surprise ``H`` concentrates
    the distribution and lowers the entropy. ``log p_j = (z_j − m) − s``, ``p_j = exp(log p_j)``
    (``z`` = the logits divided by ``temperature``).
    """
    grad = _shifted_chunk(logits_chunk, max_logit, out, temperature)  # z − m
    probs = grad.exp().mul_(torch.exp(-log_sum).unsqueeze(-1))
    g = grad_entropy.to(grad.dtype).unsqueeze(-1)
    _finite(grad).add_((entropy - log_sum).unsqueeze(-1))  # log p + H, with log 0 → most negative float
    grad.mul_(probs).mul_(-g)
    out.copy_(grad)  # a no-op when `grad` already is `out`


def entropy_from_logits(logits, temperature=1.0):
    """Entropy of the next-token distribution: ``H(z) = −Σ_j p_j log p_j = logsumexp(z) − Σ_j p_j z_j``.

    Shapes: ``logits`` ``[B, T, V]`` (any float dtype) → ``[B, T]`` float32 (float64 for float64
    logits). No mask; the caller masks (e.g. ``masked_mean(entropy, mask)``). ``temperature`` τ
    gives the entropy of ``softmax(z / τ)``, divided after the float32 upcast (``gather_logprobs``).

    Differentiable, with the hand-written gradient ``∂H/∂z_j = −p_j (log p_j + H)``. Memory is lean
    the same way as ``gather_logprobs``: chunked over positions, one upcast chunk at a time, and
    the backward writes into the one gradient tensor it returns (peak extra measured 0.05-0.14× the
    logits at V = 151,936 on CPU: up to three chunk temporaries plus allocator slack).
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

    A chunk holds at most ``rows`` positions, chosen so that one chunk in ``compute_dtype`` is
    ``_CHUNK_FRACTION`` of the logits' bytes, but at least ``_MIN_CHUNK_BYTES`` (and one position).
    Chunks are whole sequences or pieces of one sequence, so a non-contiguous view such as
    ``logits[:, :-1]`` is never copied.
    """
    batch, length, vocab = logits.shape
    chunk_bytes = max(logits.numel() * logits.element_size() * _CHUNK_FRACTION, _MIN_CHUNK_BYTES)
    rows = max(1, int(chunk_bytes // (vocab * compute_dtype.itemsize)))
    if rows >= length:
        per = rows // max(length, 1)
        for b in range(0, batch, per):
            yield slice(b, b + per), slice(None)
    else:
        for b in range(batch):
            for t in range(0, length, rows):
                yield slice(b, b + 1), slice(t, t + rows)


def _upcast_chunk(logits_chunk, compute_dtype, temperature):
    """``z / τ`` of one chunk in ``compute_dtype``: upcast first, then divide (in place on the copy)."""
    chunk = logits_chunk.to(compute_dtype)
    if temperature == 1.0:
        return chunk
    return chunk.div_(temperature) if chunk.dtype != logits_chunk.dtype else chunk / temperature


def _shifted_chunk(logits_chunk, max_logit, out, temperature=1.0):
    """``z/τ − m`` in ``max_logit``'s dtype, for a backward pass.

    Written straight into ``out`` (a chunk of the gradient buffer) when it has that dtype, so
    float32 logits need no temporary; bf16/fp16 logits need one upcast copy of the chunk.
    """
    if out.dtype == max_logit.dtype:
        if temperature != 1.0:
            return torch.div(logits_chunk, temperature, out=out).sub_(max_logit.unsqueeze(-1))
        return torch.sub(logits_chunk, max_logit.unsqueeze(-1), out=out)
    return _upcast_chunk(logits_chunk, max_logit.dtype, temperature).sub_(max_logit.unsqueeze(-1))


def _check_temperature(function, temperature):
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{function}: temperature must be a finite number > 0, got {temperature!r}")


def _finite(logp):
    """Replace ``log 0 = -inf`` by the most negative float, in place, so that ``p · log p = 0``."""
    return logp.clamp_(min=torch.finfo(logp.dtype).min)
