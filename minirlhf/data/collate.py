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


def collate_rankings(examples, pad_id):
    """Rankings (``load_ranking_data``) -> ``input_ids``/``attention_mask`` ``[P·K, L]`` (row p·K + k
    is response k of prompt p; missing responses are 1-token padding rows) and ``rank_mask``
    ``[P, K]`` (True where prompt p has a k-th response)."""
    k = max(len(e["input_ids"]) for e in examples)
    rows, lengths, rank_mask = [], [], torch.zeros(len(examples), k, dtype=torch.bool)
    for p, example in enumerate(examples):
        for j in range(k):
            present = j < len(example["input_ids"])
            rows.append(example["input_ids"][j] if present else [pad_id])
            lengths.append(len(rows[-1]))
            rank_mask[p, j] = present
    return {
        "input_ids": pad_sequences(rows, pad_id),
        "attention_mask": pad_sequences([[1] * n for n in lengths], 0),
        "rank_mask": rank_mask,
    }


def to_device(batch, device):
    """Move every tensor of a batch dict to ``device`` (other values are left alone)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
