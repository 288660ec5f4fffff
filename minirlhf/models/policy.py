"""The policy π_θ and the frozen reference π_ref: any Hugging Face causal LM, by hub name or path.

The same calls load ``Qwen/Qwen2.5-0.5B-Instruct`` on a GPU and the toy world's tiny model on a CPU.
Only safetensors weights are loaded (a pickled ``.bin`` can run code on load), and
``trust_remote_code`` stays off unless the caller asks for it.
"""
import copy

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from minirlhf.errors import MinirlhfError


def resolve_dtype(dtype):
    """``None``/"auto" -> None (the checkpoint's dtype); "bfloat16"/"bf16"/torch.bfloat16 -> torch.bfloat16."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype in aliases:
        return aliases[dtype]
    if isinstance(getattr(torch, str(dtype), None), torch.dtype):
        return getattr(torch, dtype)
    raise MinirlhfError(f"dtype {dtype!r}: expected one of auto, float32, bfloat16, float16")


def load_tokenizer(name_or_path, padding_side="left", trust_remote_code=False):
    """Load a tokenizer and make sure it has a pad token.

    ``padding_side="left"`` suits generation (every prompt ends at the last column). A tokenizer
    without a pad token gets ``pad = eos``; that is safe here because minirlhf builds every
    attention/response mask from sequence lengths, never from ``input_ids != pad_id``, so the real
    EOS at the end of a response is still attended to and trained on.
    """
    tokenizer = AutoTokenizer.from_pretrained(
        name_or_path, padding_side=padding_side, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise MinirlhfError(f"tokenizer {name_or_path}: it has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(name_or_path, dtype=None, device=None, trust_remote_code=False, pad_token_id=None):
    """Load ``AutoModelForCausalLM`` from safetensors and set ``config.pad_token_id``.

    ``pad_token_id`` defaults to the checkpoint's own, else its EOS id (the convention of
    ``load_tokenizer``); generation needs one to pad finished rows.
    """
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        dtype=resolve_dtype(dtype),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
    if pad_token_id is None:
        eos = model.config.eos_token_id
        pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    model.config.pad_token_id = pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = pad_token_id
    if device is not None:
        model.to(device)
    return model


def make_reference(model):
    """π_ref: a frozen deep copy of ``model`` in eval mode (no dropout, no gradients)."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference
