"""The reward model r_φ(x, y): a transformer with a scalar head, read at the last real token.

    r_φ(x, y) = w · h_L(x ⊕ y)[last non-pad position]

The last hidden state of a causal transformer at the final token has attended to the whole prompt
and response, so that one position summarises the pair (InstructGPT; align-anything's
``end_scores``). Train it with ``bradley_terry_loss(end_scores_chosen, end_scores_rejected)``.
"""
import json
from pathlib import Path

import torch

from minirlhf.models.scalar_head import ScalarHeadModel


def end_token_index(attention_mask):
    """Column of the last real token of each row: ``max{l : attention_mask[b, l] = 1}``.

    Shapes: ``attention_mask`` ``[B, L]`` (bool/int/float) -> ``[B]`` long. Works for left padding
    (always ``L − 1``), right padding (``length − 1``) and pad == eos tokenizers, because it reads
    the mask, never ``input_ids != pad_id`` (that would skip a real final EOS). A row with no real
    token gives 0.

    Hint: multiply each column index by the mask and take the max over the row.
    """
    # BEGIN SOLUTION
    columns = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (columns * attention_mask.long()).amax(dim=-1)
    # END SOLUTION


class RewardModel(ScalarHeadModel):
    """Backbone + ``score_head``; ``forward`` returns per-token scores and the end score.

    Build with ``RewardModel.from_causal_lm(path)`` (SFT checkpoint, random head) or
    ``RewardModel.from_pretrained(dir)`` (a saved RM); save with ``save_pretrained(dir)``.
    """

    def forward(self, input_ids, attention_mask):
        """Returns ``(scores [B, L] float32, end_scores [B] float32)``; ``end_scores`` = r_φ(x, y)."""
        scores = self.token_scores(input_ids, attention_mask)
        end = end_token_index(attention_mask)
        end_scores = scores.gather(-1, end.unsqueeze(-1)).squeeze(-1)
        return scores, end_scores


def load_reward_model(path, device=None, seed=0, dtype=None):
    """The reward model at ``path``: a saved RM (``RewardModel.from_pretrained``: ours, or any HF
    sequence classifier with one label), or, for a causal-LM checkpoint, its backbone with a fresh
    head seeded by ``seed`` (the RM *before* training, a baseline)."""
    config_path = Path(path) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if any(a.endswith("ForCausalLM") for a in config.get("architectures") or []):
        return RewardModel.from_causal_lm(path, dtype=dtype, device=device, seed=seed)
    return RewardModel.from_pretrained(path, dtype=dtype, device=device)
