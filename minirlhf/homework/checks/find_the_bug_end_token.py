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


def both_tokenizers(rows):
    """The same rows with a tokenizer whose pad is 0 and with one whose pad is its EOS (2)."""
    return lambda: {"own pad": case(0, rows)(), "pad == eos": case(EOS, rows)()}


def run_both(f, x):
    return {f"{name}: end scores": run(f, batch)["end scores"] for name, batch in x.items()}


def expect_both(x, got):
    return {f"{name}: end scores": at_last_real_token(batch, got)["end scores"] for name, batch in x.items()}


CHECKS = [
    Check("a right-padded row that ends in a real EOS, with pad 0 and with pad == eos", both_tokenizers([0]),
          run_both, expect_both, hint="the real EOS has the pad's id: only the attention mask tells them apart"),
    Check("right-, left- and unpadded rows, with pad 0 and with pad == eos", both_tokenizers([0, 1, 2]),
          run_both, expect_both),
    Check("pad == eos, the rows in another order", case(EOS, [2, 0, 1]), run, at_last_real_token),
]
