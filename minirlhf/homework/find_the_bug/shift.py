"""Find the bug (1 of 3), solved: the response mask was not shifted with the labels.

The bug::

    return (token_logprobs * response_mask[:, :-1]).sum(dim=-1)   # wrong
    return (token_logprobs * response_mask[:, 1:]).sum(dim=-1)    # right

After the next-token shift, column ``t`` of ``token_logprobs`` is the log-probability of the
token at position ``t + 1`` (the label ``input_ids[:, 1:]``). Whether it counts is
``response_mask[:, t + 1]``, i.e. ``response_mask[:, 1:]``: the mask follows the labels, not the
logits. The buggy slice is shifted by one: it counts the log-probability of the *first response
token* at the column of the *last prompt token*'s label and so on, i.e. it scores the last prompt
token and drops the final EOS.

Why it is silent: the shapes agree (``[B, T]`` both ways), the value is a plausible negative
number, and for a response of length n it still sums n terms. DPO trained with it learns to
raise the probability of the prompt's last token and never learns to stop (EOS never counts).
The property that catches it: a brute-force loop over the positions where ``response_mask`` is 1
(``minirlhf/homework/checks/find_the_bug_shift.py``). ``minirlhf.core.logprobs.shift_for_next_token`` does this slicing
in one place so that it cannot drift between callers.
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
    return (token_logprobs * response_mask[:, 1:]).sum(dim=-1)
