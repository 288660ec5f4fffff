"""The tiny toy policy: a Qwen2-architecture causal LM of about one million parameters.

Same architecture as Qwen2.5 (RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention with
q/k/v biases, tied input/output embeddings), just small: hidden 128, 4 layers, 4 query heads and 2
key/value heads, 128 positions. Built from ``Qwen2Config`` and saved with ``save_pretrained``
(safetensors), so everything that loads it is the code that loads a real Qwen2.5 checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM


def toy_config(tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    """The toy Qwen2 configuration for ``tokenizer``'s vocabulary."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_toy_model(tokenizer: PreTrainedTokenizerBase, seed: int) -> Qwen2ForCausalLM:
    """A randomly initialised toy model; the initialisation is fixed by ``seed``."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(toy_config(tokenizer))
    # like Qwen2.5-Instruct: generation stops at <|im_end|> or <|endoftext|>
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=32,
    )
    return model


def save_toy_model(tokenizer: PreTrainedTokenizerBase, seed: int, out_dir: str | Path) -> Path:
    """Build the untrained toy model and save it with its tokenizer (an HF checkpoint directory)."""
    out = Path(out_dir)
    build_toy_model(tokenizer, seed).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
