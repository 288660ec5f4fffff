"""Token log-probs straight from the last hidden states: the LM head fused with the log-softmax.

For the rows that count (response tokens) with hidden states ``h_i`` and labels ``y_i``::

    z_i = (W h_i + b) / τ                  logits, never stored whole
    log π(y_i) = z_{i,y_i} − logsumexp(z_i)
    H_i = −Σ_j p_ij log p_ij                (optional entropy), p_i = softmax(z_i)

The unfused path (``lm_head`` then ``gather_logprobs``) materialises ``[N, V]`` logits: at Qwen's
V = 151,936 that is 0.6 MB per token in float32, and autograd keeps them and builds their
gradient, the largest tensors of a training step. Here the rows go through the head a chunk at a
time, so a chunk's logits exist only inside the loop, in the forward *and* in the backward,
which recomputes them (one extra matmul with the head per step). This is the idea behind Liger's
fused linear cross-entropy and Apple's Cut Cross-Entropy; the log-softmax of each chunk is
``gather_logprobs``'s own (``minirlhf/core/logprobs.py``).

Backward. With ``g_i`` the incoming gradient of ``log π(y_i)`` and ``γ_i`` that of ``H_i``, the
gradient w.r.t. the logits is (the two identities of ``gather_logprobs`` and ``entropy_from_logits``)::

    δ_ij = g_i (1[j = y_i] − p_ij) − γ_i p_ij (log p_ij + H_i)        [N, V], chunk by chunk

and through ``z = (W h + b) / τ`` (chain rule, one matmul each)::

    ∂/∂h = δ W / τ   [N, D]        ∂/∂W = δᵀ h / τ   [V, D]        ∂/∂b = Σ_i δ_i / τ   [V]

The gradients of ``W`` and ``b`` are summed over chunks in float32. Tied embeddings need nothing
special: pass the shared matrix as ``weight`` and autograd adds both uses' gradients.

Precision: under autocast (bf16/fp16 on a GPU) the two matmuls run in the autocast dtype, as the
``nn.Linear`` head would, and each chunk's log-softmax in float32; otherwise in the inputs' dtype.
The temperature divides the logits inside that float32 log-softmax, after the upcast, as in
``gather_logprobs`` and the sampler: the head's bf16 logits are never divided in bf16.
"""
import torch
import torch.nn.functional as F

from minirlhf.core.logprobs import _chunk_entropy, _chunk_entropy_backward, _chunk_logprobs, _chunk_logprobs_backward
from minirlhf.core.shapes import check_shapes

# A chunk's float32 logits take at most this many bytes (~220 rows at V = 151,936): a matmul big
# enough to run at full speed on a GPU, and a fixed ceiling on the head's memory, whatever N is.
_CHUNK_BYTES = 128 * 2**20


class _FusedHeadLogprobs(torch.autograd.Function):
    """``log softmax((W h + b)/τ)_y`` (and its entropy) chunk by chunk, with a hand-written backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, with_entropy):
        ctx.set_materialize_grads(False)  # an output nobody uses gets gradient None: skip its term
        matmul_dtype = _matmul_dtype(hidden, weight)
        compute_dtype = torch.promote_types(matmul_dtype, torch.float32)
        logprobs = hidden.new_empty(labels.shape, dtype=compute_dtype)
        max_logit, log_sum = torch.empty_like(logprobs), torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if with_entropy else None
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes chosen explicitly here
            weight_mm, bias_mm = _cast(weight, matmul_dtype), _cast(bias, matmul_dtype)
            for rows in _row_chunks(labels.shape[0], weight.shape[0]):
                logprobs[rows], max_logit[rows], log_sum[rows], chunk_entropy = _chunk_forward(
                    hidden[rows], weight_mm, bias_mm, labels[rows], temperature, with_entropy)
                if with_entropy:
                    entropy[rows] = chunk_entropy
        ctx.save_for_backward(hidden, weight, bias, labels, max_logit, log_sum, entropy)
        ctx.temperature, ctx.matmul_dtype = temperature, matmul_dtype
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, labels, max_logit, log_sum, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        # δ is linear in (g, γ): fold the 1/τ of z = (W h + b)/τ into them once.
        g = _incoming(grad_logprobs, max_logit) / ctx.temperature
        gamma = None if grad_entropy is None else grad_entropy.to(max_logit.dtype) / ctx.temperature
        accumulate_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate_dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=accumulate_dtype, device=bias.device) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            weight_mm, bias_mm = _cast(weight, ctx.matmul_dtype), _cast(bias, ctx.matmul_dtype)
            for rows in _row_chunks(labels.shape[0], weight.shape[0]):
                entropy_term = None if gamma is None else (entropy[rows], gamma[rows])
                _chunk_backward(hidden[rows], weight_mm, bias_mm, labels[rows], max_logit[rows], log_sum[rows], g[rows],
                                entropy_term, ctx.temperature,
                                grads=(None if grad_hidden is None else grad_hidden[rows], grad_weight, grad_bias))
        return (grad_hidden, _cast(grad_weight, weight.dtype), None if bias is None else _cast(grad_bias, bias.dtype),
                None, None, None)


def _chunk_forward(hidden_chunk, weight, bias, labels, temperature, with_entropy):
    """``(log-probs, m, s, entropy or None)`` of one chunk of rows (a function, so its logits die on return)."""
    logits = _chunk_logits(hidden_chunk, weight, bias)  # [n, V]
    logprobs, max_logit, log_sum = _chunk_logprobs(logits, labels, temperature=temperature)
    return logprobs, max_logit, log_sum, _chunk_entropy(logits, temperature=temperature)[0] if with_entropy else None


def _chunk_backward(hidden_chunk, weight, bias, labels, max_logit, log_sum, g, entropy_term, temperature, grads):
    """Recompute one chunk's logits, form ``δ`` and add its share to ``grads = (∂h rows, ∂W, ∂b)`` (None: not wanted).

    ``∂h = δ W``, ``∂W += δᵀ h``, ``∂b += Σ δ`` (the 1/τ is already in ``g``, ``γ``). A function, so
    the chunk's buffers die before the next chunk allocates its own.
    """
    grad_hidden, grad_weight, grad_bias = grads
    hidden_mm = hidden_chunk.to(weight.dtype)
    logits = _chunk_logits(hidden_mm, weight, bias)  # [n, V], recomputed
    delta = _chunk_logits_grad(logits, labels, max_logit, log_sum, g, entropy_term, temperature)
    delta = delta.to(weight.dtype)  # the matmuls run in the head's dtype, as nn.Linear's backward does
    if grad_hidden is not None:
        grad_hidden.copy_(delta @ weight)  # [n, V] @ [V, D]
    if grad_weight is not None:
        _add_matmul(grad_weight, delta.T, hidden_mm)  # [V, n] @ [n, D]
    if grad_bias is not None:
        grad_bias += delta.sum(dim=0, dtype=grad_bias.dtype)


def _chunk_logits(hidden_chunk, weight, bias):
    """``W h + b`` for one chunk of rows: ``[n, D]`` -> ``[n, V]`` in the matmul dtype (the chunk
    functions of ``core/logprobs.py`` divide by τ in float32)."""
    return F.linear(hidden_chunk.to(weight.dtype), weight, bias)


def _chunk_logits_grad(logits, labels, max_logit, log_sum, g, entropy_term, temperature):
    """``δ = g (onehot(y) − p) − γ p (log p + H)`` for one chunk, in the compute dtype (``p = softmax(z/τ)``).

    ``entropy_term`` is ``(H, γ)`` or None. For float32 logits the log-prob term is written over
    the chunk's own logits (no new buffer); the entropy term takes one more chunk-sized buffer,
    only when its gradient is wanted.
    """
    entropy_grad = None
    if entropy_term is not None:
        entropy_grad = _chunk_entropy_backward(logits, max_logit, log_sum, *entropy_term,
                                               out=torch.empty_like(logits, dtype=max_logit.dtype), temperature=temperature)
    in_place = logits if logits.dtype == max_logit.dtype else None
    delta = _chunk_logprobs_backward(logits, labels, max_logit, log_sum, g, out=in_place, temperature=temperature)
    return delta if entropy_grad is None else delta.add_(entropy_grad)


def fused_head_logprobs(hidden, weight, labels, bias=None, temperature=1.0, return_entropy=False):
    """Log-probs of ``labels`` under the LM head, ``log softmax((W h_i + b)/τ)[y_i]``, without a logits tensor.

    Shapes: ``hidden`` ``[N, D]`` (the final hidden states of the rows that count, after the final
    norm), ``weight`` ``[V, D]`` (the LM head's, tied or not), ``bias`` ``[V]`` or None, ``labels``
    ``[N]`` long in ``[0, V)``. Returns ``logprobs`` ``[N]`` (float32, float64 for float64 inputs),
    or ``(logprobs, entropy)`` with ``return_entropy``. There is no mask: pass only the rows that
    count (``models.forward.fused_response_logprobs`` selects the response tokens).

    Equal to ``gather_logprobs(F.linear(hidden, weight, bias) / temperature, labels)`` and
    differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` with the same gradients, but the
    ``[N, V]`` logits are made ``_CHUNK_BYTES`` at a time and never kept: peak extra memory is two
    chunks (plus, in the backward, the float32 gradient of ``W`` that it returns), not four logits-sized tensors (logits, their float32 log-softmax pieces and gradients).
    The price is one more matmul with the head in the backward (it recomputes each chunk's logits).
    """
    check_shapes(
        "fused_head_logprobs",
        hidden=(hidden, "N D", "float"),
        weight=(weight, "V D", "float"),
        labels=(labels, "N", "long"),
        bias=(bias, (None, "V")),
        temperature=(temperature, "scalar"),
    )
    if labels.numel() and (labels.min() < 0 or labels.max() >= weight.shape[0]):
        raise ValueError(f"fused_head_logprobs: labels must be token ids in [0, {weight.shape[0]}), got values in "
                         f"[{labels.min().item()}, {labels.max().item()}]")
    if not temperature > 0:
        raise ValueError(f"fused_head_logprobs: temperature must be > 0, got {temperature}")
    logprobs, entropy = _FusedHeadLogprobs.apply(hidden, weight, bias, labels, float(temperature), return_entropy)
    return (logprobs, entropy) if return_entropy else logprobs


def _matmul_dtype(hidden, weight):
    """The autocast dtype when autocast is on for this device (as ``nn.Linear`` would run), else the inputs'."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _row_chunks(num_rows, vocab):
    """Slices of ``range(num_rows)`` whose float32 logits take at most ``_CHUNK_BYTES`` (one row at least)."""
    rows = max(1, _CHUNK_BYTES // (vocab * 4))
    return [slice(start, start + rows) for start in range(0, num_rows, rows)]


def _add_matmul(out, a, b):
    """``out += a @ b``, in place when the dtypes allow (float32 on the CPU), else through one temporary."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out += a @ b


def _incoming(grad, like):
    """The incoming gradient in ``like``'s dtype; zeros when the output was not used."""
    return torch.zeros_like(like) if grad is None else grad.to(like.dtype)


def _cast(tensor, dtype):
    return None if tensor is None else tensor.to(dtype)
