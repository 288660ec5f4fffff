"""minirlhf: RLHF written by hand, for learning.

The core math is importable from the top level::

    from minirlhf import gather_logprobs, bradley_terry_loss, dpo_loss, gae_advantages
"""
from minirlhf.core.logprobs import (
    entropy_from_logits,
    gather_logprobs,
    sequence_logprobs,
    shift_for_next_token,
)
from minirlhf.core.fused_logprobs import fused_head_logprobs
from minirlhf.core.masked import masked_mean, masked_sum, masked_var, masked_whiten
from minirlhf.core.aggregation import aggregate_token_losses
from minirlhf.core.reward_losses import (
    bradley_terry_loss,
    kwise_bradley_terry_loss,
    pair_accuracy,
    plackett_luce_loss,
)
from minirlhf.core.dpo_losses import (
    dpo_loss,
    dpop_penalty,
    kto_loss,
    orpo_loss,
    rdpo_length_margin,
    simpo_loss,
)
from minirlhf.core.kl import kl_penalty, kl_shaped_rewards
from minirlhf.core.gae import gae_advantages
from minirlhf.core.ppo_losses import clipped_surrogate, ppo_policy_loss, ppo_value_loss
from minirlhf.core.grpo import group_advantages, grpo_loss, rloo_advantages
from minirlhf.core.best_of_n import best_of_n_kl, best_of_n_value
from minirlhf.core.calibration import expected_calibration_error, reliability_bins

__all__ = [
    "entropy_from_logits",
    "gather_logprobs",
    "fused_head_logprobs",
    "sequence_logprobs",
    "shift_for_next_token",
    "bradley_terry_loss",
    "kwise_bradley_terry_loss",
    "pair_accuracy",
    "plackett_luce_loss",
    "dpo_loss",
    "dpop_penalty",
    "kto_loss",
    "orpo_loss",
    "rdpo_length_margin",
    "simpo_loss",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "aggregate_token_losses",
    "kl_penalty",
    "kl_shaped_rewards",
    "gae_advantages",
    "clipped_surrogate",
    "ppo_policy_loss",
    "ppo_value_loss",
    "group_advantages",
    "grpo_loss",
    "rloo_advantages",
    "best_of_n_kl",
    "best_of_n_value",
    "expected_calibration_error",
    "reliability_bins",
]

__version__ = "0.1.0"
