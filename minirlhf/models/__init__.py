"""Models: the policy and its frozen reference, the reward model, the value model, response
log-probs (fused or not), and the KV-cached sampler.

LoRA (``minirlhf.models.lora``): low-rank adapters written by hand; π_ref = the adapters switched off."""
from minirlhf.models.forward import (
    fused_response_logprobs, position_ids_from_attention_mask, response_logprobs, rollout_logprobs,
)
from minirlhf.models.policy import load_policy, load_tokenizer, make_reference
from minirlhf.models.reward_model import RewardModel, end_token_index, load_reward_model
from minirlhf.models.sampling import eos_token_ids, generate_rollouts, sample_responses
from minirlhf.models.scalar_head import ScalarHeadModel
from minirlhf.models.value_model import ValueModel
