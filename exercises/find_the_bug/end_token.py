"""Find the bug (3 of 3): reading the reward model's score at the end of each sequence.

This function runs, returns the right shape, and passes a test with a tokenizer whose pad token
differs from its EOS token, for left and right padding alike. It is still wrong. Find the line
that is wrong and fix it (keep the signature).

Hint: many tokenizers (GPT-2, base Qwen2.5, Llama-3 base) set ``pad_token = eos_token``.
"""
import torch


def end_scores(token_scores, input_ids, attention_mask, pad_token_id):
    """The reward ``r(x, y)`` of each sequence: the score head's output at its last real token.

    Shapes: ``token_scores`` ``[B, L]`` (one score per position), ``input_ids`` and
    ``attention_mask`` ``[B, L]`` (1 = real token, including the final EOS), padding on either
    side. Returns ``[B]``.
    """
    columns = torch.arange(input_ids.shape[-1], device=input_ids.device)
    is_real = (input_ids != pad_token_id).long()
    last = (columns * is_real).amax(dim=-1)
    return token_scores.gather(-1, last.unsqueeze(-1)).squeeze(-1)
