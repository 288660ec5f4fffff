"""Models: the policy and its frozen reference, the reward model, the value model, response log-probs.

LoRA (``minirlhf.models.lora``): low-rank adapters written by hand; π_ref = the adapters switched off."""
from minirlhf.models.forward import fused_response_logprobs, position_ids_from_attention_mask, response_logprobs
from minirlhf.models.policy import load_policy, load_tokenizer, make_reference
from minirlhf.models.reward_model import RewardModel, end_token_index
from minirlhf.models.scalar_head import ScalarHeadModel
from minirlhf.models.value_model import ValueModel
