"""Find the bug (1 of 3): the log-probability of a response.

This function runs, returns the right shape and gives plausible numbers. It is wrong. Find the
one line that is wrong and fix it (keep the signature). `python -m minirlhf grade <folder>` tells
you when it is right; the test's message says which property fails.

Hint: write out, for one short row, which logit scores which token and which mask entry says
whether that token counts.
"""
import torch


def response_logprobs(logits, input_ids, response_mask):
    """``log π(y | x) = Σ_l response_mask[l] · log softmax(logits[l − 1])[input_ids[l]]`` per row.

    Shapes: ``logits`` ``[B, L, V]`` (the model's output for ``input_ids``), ``input_ids`` and
    ``response_mask`` ``[B, L]`` (1 on the response tokens, including the final EOS). Returns
    ``[B]`` float32.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    # logits at position l - 1 predict the token at position l
    token_logprobs = logprobs[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logprobs * response_mask[:, :-1]).sum(dim=-1)
