"""The value model (critic) V_ψ(s_t) for PPO: the reward model's architecture, read at every token.

    V_ψ(x ⊕ y_<t) = w · h_L(x ⊕ y)[t]

The state after reading position ``l`` is the prefix up to ``l``, so ``values[:, :-1]`` are the
values of the states in which the labels ``input_ids[:, 1:]`` are chosen — aligned with the
``[B, T]`` log-probs and rewards. It is usually initialised from the reward model
(``ValueModel.from_pretrained(rm_dir)``) or from the SFT policy (``from_causal_lm``).
"""
from minirlhf.models.scalar_head import ScalarHeadModel


class ValueModel(ScalarHeadModel):
    """Backbone + ``score_head``; ``forward`` returns the per-token values ``[B, L]`` float32."""

    def forward(self, input_ids, attention_mask):
        """``values[b, l] = V(prefix of row b up to column l)``: ``[B, L]`` float32 (padding columns are junk; mask them)."""
        return self.token_scores(input_ids, attention_mask)
