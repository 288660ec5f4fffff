"""Collators: lists of tokenized examples -> padded ``[B, L]`` tensors (see DEVELOPERS.md, "Batches").

``attention_mask`` comes from each sequence's length, never from ``input_ids != pad_id``: with a
pad == eos tokenizer the real EOS that ends a response must stay visible. Either padding side
works for training because the models take ``position_ids`` from the attention mask; generation
needs left padding so every prompt ends in the last column.
"""
import torch


def pad_sequences(seqs, pad_value, side="right", length=None):
    """Stack lists of ints into ``[B, max(length, longest)]`` long, padding on ``side`` ("left"/"right")."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max([len(s) for s in seqs] + [length or 0])
    out = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    for row, seq in zip(out, seqs):
        start = 0 if side == "right" else width - len(seq)
        row[start:start + len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out


def _batch(input_ids, response_masks, pad_id, padding_side):
    return {
        "input_ids": pad_sequences(input_ids, pad_id, padding_side),
        "attention_mask": pad_sequences([[1] * len(s) for s in input_ids], 0, padding_side),
        "response_mask": pad_sequences(response_masks, 0, padding_side),
    }


def collate_sft(examples, pad_id, padding_side="right"):
    """Examples with ``input_ids``/``response_mask`` -> ``{input_ids, attention_mask, response_mask}``, all ``[B, L]``."""
    return _batch([e["input_ids"] for e in examples], [e["response_mask"] for e in examples], pad_id, padding_side)


def collate_kto(examples, pad_id, padding_side="right"):
    """Like ``collate_sft``, plus ``labels`` ``[B]`` bool (True = desirable)."""
    batch = collate_sft(examples, pad_id, padding_side)
    batch["labels"] = torch.tensor([bool(e["label"]) for e in examples])
    return batch


def collate_preference(examples, pad_id, padding_side="right"):
    """Pairs -> one ``[2B, L]`` batch: rows ``0..B-1`` chosen, rows ``B..2B-1`` rejected.

    One forward over the concatenation (instead of two) keeps both halves at one padded length
    and halves the kernel launches. Split results with ``chosen, rejected = x.chunk(2)``.
    """
    input_ids = [e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
    masks = [e["chosen_response_mask"] for e in examples] + [e["rejected_response_mask"] for e in examples]
    return _batch(input_ids, masks, pad_id, padding_side)


def collate_prompts(examples, pad_id):
    """Prompts for generation, left-padded: ``{input_ids, attention_mask}`` ``[B, L]`` plus the raw
    ``prompt`` and ``answer`` lists (for reward functions that check answers)."""
    input_ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": pad_sequences(input_ids, pad_id, "left"),
        "attention_mask": pad_sequences([[1] * len(s) for s in input_ids], 0, "left"),
        "prompt": [e.get("prompt") for e in examples],
        "answer": [e.get("answer") for e in examples],
    }
