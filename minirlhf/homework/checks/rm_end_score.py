"""Checks of the ``rm_end_score`` exercise: ``end_token_index`` (models/reward_model.py)."""
import torch

from minirlhf.homework.check import Check

RIGHT = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
LEFT = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])


def end(f, x):
    index = f.end_token_index(x["attention_mask"])
    return {"end index": index, "dtype": str(index.dtype) if torch.is_tensor(index) else None}


def case(name, mask, expected, hint=""):
    return Check(name, lambda: {"attention_mask": mask}, end,
                 lambda x, got: {"end index": torch.tensor(expected), "dtype": "torch.int64"}, hint=hint)


CHECKS = [
    case("right-padded rows (one full, one of length 1): the last real token, as long", RIGHT, [2, 4, 0]),
    case("left-padded rows: always the last column", LEFT, [4, 4, 4],
         hint="left padding puts the real tokens at the end of the row"),
    case("a bool attention mask", RIGHT.bool(), [2, 4, 0]),
    case("a float attention mask, left-padded", LEFT.float(), [4, 4, 4]),
    case("pad == eos: the row ends in a real EOS; only the mask tells it from padding",
         torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]]), [3, 5]),
]
