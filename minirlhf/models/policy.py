"""The policy π_θ and the frozen reference π_ref: any Hugging Face causal LM, by hub name or path.

The same calls load ``Qwen/Qwen2.5-0.5B-Instruct`` on a GPU and the toy world's tiny model on a CPU.
Only safetensors weights are loaded (a pickled ``.bin`` can run code on load), and
``trust_remote_code`` stays off unless the caller asks for it.

**Dropout is off** in every model minirlhf loads (``keep_dropout=False``, as TRL's configs do).
RLHF compares the same model's log-probs across passes — π_old with π_θ in the PPO ratio, π_θ with
π_ref in the KL, the policy with DPO's cached reference log-probs — and dropout would make those
differences noise: a GPT-2-style model (dropout 0.1) has a KL to itself of ~0.1 nats per response
at initialisation. Qwen2/Llama ship with dropout 0, so for them nothing changes.
"""
import copy

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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


def checkpoint_dtype(name_or_path, trust_remote_code=False):
    """The dtype a checkpoint's config records (``torch.bfloat16`` for Qwen2.5), or None when it
    records none: the dtype to save a model trained from it in."""
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return resolve_dtype(getattr(config, "dtype", None))


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


DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def disable_dropout(model):
    """Set every dropout probability of ``model`` to 0; returns ``model``.

    Three places hold one: ``nn.Dropout`` modules (GPT-2's ``attn_dropout``, ``resid_dropout``),
    float attributes that attention reads at forward time (Qwen2's ``attention_dropout``), and the
    config (``attn_pdrop``, ``hidden_dropout_prob``, ...; code that reads the config during the
    forward sees 0, and a saved model records what it was trained with). A training forward in
    ``train()`` mode is then deterministic, as in ``eval()`` mode.
    """
    configs = [model.config, model.config.get_text_config()] if hasattr(model, "config") else []
    for holder in [*model.modules(), *configs]:
        if isinstance(holder, DROPOUT_MODULES):
            holder.p = 0.0
        for name, value in list(vars(holder).items()):
            if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
                setattr(holder, name, 0.0)
    return model


def load_policy(name_or_path, dtype=None, device=None, trust_remote_code=False, pad_token_id=None, keep_dropout=False):
    """Load ``AutoModelForCausalLM`` from safetensors and set ``config.pad_token_id``.

    ``pad_token_id`` defaults to the checkpoint's own, else its EOS id (the convention of
    ``load_tokenizer``); generation needs one to pad finished rows. Dropout is switched off
    (``disable_dropout``) unless ``keep_dropout``.
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
    if not keep_dropout:
        disable_dropout(model)
    if device is not None:
        model.to(device)
    return model


def make_reference(model):
    """π_ref: a frozen deep copy of ``model`` in eval mode (no dropout, no gradients)."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference
