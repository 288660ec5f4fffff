"""Checks of ``find_the_bug_end_token``: ``end_scores`` (find_the_bug/end_token.py)."""
import torch

from minirlhf.homework.check import Check

EOS = 2
IDS = torch.tensor([[5, 6, 7, EOS, EOS, EOS], [EOS, EOS, 5, 6, 7, EOS], [5, 6, 7, 8, 9, EOS]])
ATTENTION = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])


def case(pad, rows):
    return lambda: {"input_ids": torch.where(ATTENTION.bool(), IDS, torch.full_like(IDS, pad))[rows],
                    "attention_mask": ATTENTION[rows], "pad_token_id": pad,
                    "token_scores": torch.arange(18, dtype=torch.float32).view(3, 6)[rows]}


def run(f, x):
    return {"end scores": f.end_scores(x["token_scores"], x["input_ids"], x["attention_mask"], x["pad_token_id"])}


def at_last_real_token(x, got):
    last = torch.stack([row.nonzero().max() for row in x["attention_mask"]])
    return {"end scores": x["token_scores"][torch.arange(len(last)), last]}


CHECKS = [
    Check("a tokenizer with its own pad token (pad 0, eos 2): right-, left- and unpadded rows", case(0, [0, 1, 2]),
          run, at_last_real_token),
    Check("pad == eos: a right-padded row that ends in a real EOS", case(EOS, [0]), run, at_last_real_token,
          hint="the real EOS has the pad's id: only the attention mask tells them apart"),
    Check("pad == eos: right-, left- and unpadded rows", case(EOS, [0, 1, 2]), run, at_last_real_token),
]
