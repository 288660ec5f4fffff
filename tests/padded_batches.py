"""Small batch builders shared by the core-math tests: random masks and their left-padded twins."""
import torch


def random_response_mask(batch_size, num_tokens, generator, min_len=1):
    """A right-padded ``[B, T]`` bool mask with response lengths in ``[min_len, T]`` (row 0 full)."""
    lengths = torch.randint(min_len, num_tokens + 1, (batch_size,), generator=generator)
    lengths[0] = num_tokens
    return torch.arange(num_tokens)[None, :] < lengths[:, None]


def to_left_padded(x, mask):
    """Move each row's valid tokens of a right-padded ``x`` to the end of the row (same order)."""
    shifts = (~mask.bool()).sum(dim=-1)
    return torch.stack([torch.roll(row, int(shift), dims=-1) for row, shift in zip(x, shifts)])
