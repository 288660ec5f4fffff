"""A tiny Qwen2 policy for the integration checks (``dpo_step``, ``grpo_step``), built from a config.

The grader builds the weights once (seeded) and hands config and weights to the submission's
process as data; both sides rebuild the same float64 model from them, so a step computed there
and the reference step computed by the grader agree to ~1e-12.
"""
import copy

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

CONFIG = dict(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=1, pad_token_id=0,
              tie_word_embeddings=False)
PAD, EOS = 0, 1


def tiny_weights(seed, scale=1.0):
    """Seeded float64 weights of the tiny model (Qwen2's init scaled by ``scale``)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(Qwen2Config(**CONFIG))
    return {name: (value * (scale if value.dim() > 1 else 1.0)).double() for name, value in model.state_dict().items()}


def tiny_model(weights):
    """The float64 model with ``weights``, in train mode (Qwen2 has no dropout: deterministic)."""
    config = Qwen2Config(**CONFIG)
    model = Qwen2ForCausalLM(config).double()
    model.load_state_dict(weights)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    return model


def frozen(model):
    reference = copy.deepcopy(model).eval()
    return reference.requires_grad_(False)


def parameter_gradients(model):
    """``{name: grad}`` of every parameter (None where no gradient arrived)."""
    return {name: None if p.grad is None else p.grad.detach().clone() for name, p in model.named_parameters()}


def sgd(model, lr):
    """``θ ← θ − lr·∇θ``, then zero the gradients (no torch.optim: its first step costs seconds of imports)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None


def weights_of(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class TinyTokenizer:
    """What ``generate_rollouts`` needs of a tokenizer: pad/eos ids and ``batch_decode`` (ids as text)."""

    pad_token_id, eos_token_id = PAD, EOS

    def batch_decode(self, sequences, skip_special_tokens=False):
        special = {PAD, EOS} if skip_special_tokens else set()
        return [" ".join(str(t) for t in seq if t not in special) for seq in sequences]
