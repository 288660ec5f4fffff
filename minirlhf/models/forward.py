"""One forward pass of a causal LM over a padded batch -> per-token log-probs of the response.

Every trainer needs ``log π_θ(y_t | x, y_<t)`` for the response tokens only (SFT, DPO, PPO, GRPO
all start here). Two details make it correct and cheap:

* ``position_ids`` come from the attention mask, so a left-padded row computes exactly what the
  same row right-padded computes (the model never sees "position 7" for the first real token).
* The LM head runs only where a response label can be. The logits ``[B, L, V]`` are the largest
  tensor of a step (V = 151,936 for Qwen); a prompt of 200 tokens and a response of 50 need only
  the last ~50 columns, so we ask the model for ``logits_to_keep`` columns and pad the log-probs
  back to ``[B, T]`` so they stay aligned with the labels ``input_ids[:, 1:]``.

``fused_response_logprobs`` goes further: no logits tensor at all. It runs the model's backbone,
keeps the hidden states of the response positions only, and sends them through the LM head and
the log-softmax in chunks (``minirlhf/core/fused_logprobs.py``): the memory of a training step's
head no longer grows with the number of tokens.
"""
import torch
import torch.nn.functional as F

from minirlhf.core.fused_logprobs import fused_head_logprobs
from minirlhf.core.logprobs import entropy_from_logits, gather_logprobs, shift_for_next_token


def position_ids_from_attention_mask(attention_mask):
    """``position_ids[b, l] = (Σ_{k≤l} attention_mask[b, k]) − 1``, clamped at 0 on left padding.

    Shapes: ``[B, L]`` -> ``[B, L]`` long. The first real token of every row gets position 0,
    wherever the row starts.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def first_label_column(response_mask):
    """Smallest ``t`` (in ``[0, T]``, the label axis) where any row has a response label; ``T`` if none.

    Shapes: ``response_mask`` ``[B, L]``; labels are columns ``1..L-1`` of it.
    """
    columns_with_labels = response_mask[:, 1:].bool().any(dim=0)
    if not columns_with_labels.any():
        return columns_with_labels.numel()
    return int(columns_with_labels.nonzero()[0])


def response_logprobs(model, input_ids, attention_mask, response_mask, temperature=1.0, return_entropy=False,
                      entropy_grad=True):
    """Per-token log-probs ``log π(y_t | y_<t)`` of a batch, computed only from the first response label on.

    Args:
        model: a Hugging Face causal LM (accepts ``position_ids`` and ``logits_to_keep``).
        input_ids, attention_mask, response_mask: ``[B, L]`` (see DEVELOPERS.md, "Batches").
        temperature: log-probs of ``softmax(logits / temperature)`` (use the sampling temperature for
            PPO/GRPO so the ratio compares the distribution the tokens were actually drawn from).
            The division happens in float32, after the upcast, exactly as in the sampler.
        return_entropy: also return the per-token entropy ``H(π(· | y_<t))`` (``[B, T]`` float32).
        entropy_grad: False computes the entropy without gradient (to log it, not to train on it):
            its full-vocabulary ``[B, T, V]`` intermediates are then not kept for a backward.

    Returns ``(token_logprobs, mask)`` — or ``(token_logprobs, mask, entropy)`` — all ``[B, T]``
    with ``T = L − 1``, aligned with the labels ``input_ids[:, 1:]``; ``mask = response_mask[:, 1:]``.
    Columns before the first response label (in any row) are 0 and masked out. ``token_logprobs``
    is float32 and differentiable w.r.t. the model's parameters.
    """
    start = first_label_column(response_mask)  # label column t is predicted by logits column t
    length = input_ids.shape[1]
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_attention_mask(attention_mask),
        logits_to_keep=length - start,  # logits for columns start..L-1
        use_cache=False,
    )
    logits, labels, _ = shift_for_next_token(output.logits, input_ids[:, start:], response_mask[:, start:])
    # Left-pad the [B, T - start] results with `start` zero columns to restore the [B, T] alignment.
    token_logprobs = F.pad(gather_logprobs(logits, labels, temperature), (start, 0))
    mask = response_mask[:, 1:]
    if return_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits, temperature)
        return token_logprobs, mask, F.pad(entropy, (start, 0))
    return token_logprobs, mask


def fused_response_logprobs(model, input_ids, attention_mask, response_mask, temperature=1.0, return_entropy=False,
                            entropy_grad=True):
    """``response_logprobs`` without a logits tensor: the LM head fused with the log-softmax.

    Same arguments and returns as ``response_logprobs`` (``(token_logprobs, mask)`` or
    ``(token_logprobs, mask, entropy)``, all ``[B, T]``, float32), and the same values and gradients
    at the response labels (``mask = 1``); every other position holds 0. How:

    1. the backbone (``model.base_model``: the transformer without its head) gives the final hidden
       states ``[B, L, D]``, with mask-derived ``position_ids`` as always;
    2. the ``N`` positions that predict a response label (``hidden[:, :-1][mask]``, ``[N, D]``) and
       their labels (``input_ids[:, 1:][mask]``, ``[N]``) are picked out;
    3. ``fused_head_logprobs`` computes their log-probs chunk by chunk from the head's weight (tied
       or not) and scatters them back to ``[B, T]``.

    The model's output embedding must be a plain ``nn.Linear`` whose logits are used as they are
    (Qwen2, Llama, Mistral, GPT-2, ...); models that post-process logits (soft-capping) are refused.
    """
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(f"fused_response_logprobs: needs a plain nn.Linear LM head with unmodified logits; "
                         f"{type(model).__name__} has {type(head).__name__}")
    output = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_attention_mask(attention_mask),
        use_cache=False,
    )
    mask = response_mask[:, 1:]
    rows = mask.bool()
    hidden = output.last_hidden_state[:, :-1][rows]  # [N, D]: the positions that predict a response label
    out = fused_head_logprobs(hidden, head.weight, input_ids[:, 1:][rows], head.bias, temperature, return_entropy)
    out = out if return_entropy else (out,)
    per_token = [torch.zeros(rows.shape, dtype=x.dtype, device=x.device).masked_scatter(rows, x) for x in out]
    if return_entropy:
        return per_token[0], mask, per_token[1] if entropy_grad else per_token[1].detach()
    return per_token[0], mask


@torch.no_grad()
def rollout_logprobs(model, batch, micro_batch_size=0, temperature=1.0):
    """``response_logprobs`` of a whole batch (e.g. a rollout) without gradient, ``micro_batch_size``
    rows per forward pass (0 = all at once). Returns ``(token_logprobs, mask)``, both ``[B, T]``.

    The online trainers take log π_old and log π_ref of their samples with it; memory stays that
    of one micro-batch whatever the rollout's size.
    """
    rows = len(batch["input_ids"])
    size = micro_batch_size if micro_batch_size > 0 else rows
    chunks = [
        response_logprobs(model, batch["input_ids"][i : i + size], batch["attention_mask"][i : i + size],
                          batch["response_mask"][i : i + size], temperature=temperature)
        for i in range(0, rows, size)
    ]
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
