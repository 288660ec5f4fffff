"""Find the bug (3 of 3), solved: "real token" was read from the token ids, not from the mask.

The bug::

    is_real = (input_ids != pad_token_id).long()   # wrong
    is_real = attention_mask.long()                # right

When the tokenizer's pad token *is* its EOS token (GPT-2, base Qwen2.5, Llama-3 base and many
others set ``pad_token = eos_token``), every response ends with a real EOS whose id equals
``pad_token_id``. The buggy line calls it padding, so the score is read one token early, at the
last word instead of the EOS: the reward model is trained (and PPO is rewarded) at a position
that never saw the end of the response, and a response that stops and one that does not get
the same score.

Why it is silent: with a tokenizer whose pad differs from EOS (the usual test setup) it is
exactly right, for left and right padding. Only ``attention_mask`` knows which positions are
real; minirlhf builds every mask from lengths for this reason (DEVELOPERS.md: "masks come from
lengths, never from ``input_ids != pad_id``"). The property that catches it: the same batch with
``pad_token_id = eos_token_id`` must give the scores at each row's last attended position.
"""
import torch


def end_scores(token_scores, input_ids, attention_mask, pad_token_id):
    """The reward ``r(x, y)`` of each sequence: the score head's output at its last real token.

    Shapes: ``token_scores`` ``[B, L]`` (one score per position), ``input_ids`` and
    ``attention_mask`` ``[B, L]`` (1 = real token, including the final EOS), padding on either
    side. Returns ``[B]``.
    """
    columns = torch.arange(input_ids.shape[-1], device=input_ids.device)
    is_real = attention_mask.long()
    last = (columns * is_real).amax(dim=-1)
    return token_scores.gather(-1, last.unsqueeze(-1)).squeeze(-1)
