"""Checks of ``find_the_bug_shift``: ``response_logprobs`` (find_the_bug/shift.py) against a brute-force loop."""
import torch

from minirlhf.homework.check import Check, random

MASKS = {"right-padded response": [0, 0, 1, 1, 1, 0, 0], "left-padded response ending at the last token": [0, 0, 0, 0, 1, 1, 1],
         "a short response right after a one-token prompt": [0, 1, 1, 0, 0, 0, 0]}


def batch(rows, seed=0, vocab=11):
    length = 7
    return {"logits": random(len(rows), length, vocab, seed=seed), "response_mask": torch.tensor(rows),
            "input_ids": torch.randint(vocab, (len(rows), length), generator=torch.Generator().manual_seed(seed))}


def brute_force(x, got):
    """log π(y|x) = Σ over positions l where response_mask is 1 of log_softmax(logits[l − 1])[input_ids[l]]."""
    logits, ids, mask = x["logits"], x["input_ids"], x["response_mask"]
    expected = torch.zeros(len(ids), dtype=torch.float64)
    for b in range(len(ids)):
        for pos in range(1, ids.shape[1]):
            if mask[b, pos]:  # the logits one step earlier predict this token
                expected[b] += torch.log_softmax(logits[b, pos - 1], dim=-1)[ids[b, pos]]
    return {"log π(y|x)": expected}


def run(f, x):
    return {"log π(y|x)": f.response_logprobs(x["logits"], x["input_ids"], x["response_mask"])}


CHECKS = [
    *[Check(f"one row, {name}: the brute-force sum over the response tokens", lambda mask=mask, i=i: batch([mask], seed=i),
            run, brute_force, hint="which mask entry says whether the token scored at column t counts?")
      for i, (name, mask) in enumerate(MASKS.items())],
    Check("the three rows as one batch", lambda: batch(list(MASKS.values()), seed=5), run, brute_force),
]
