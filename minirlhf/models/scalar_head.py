"""A transformer backbone with a scalar head: the shared body of the reward model and the critic.

``score_head`` maps the last hidden state at every position to one number::

    scores[b, l] = w · h_L(x)[b, l]          w = score_head.weight, [1, hidden]

The reward model reads the number at the last real token (``reward_model.py``); the value model
reads it at every token (``value_model.py``).

Checkpoints use Hugging Face's sequence-classification layout (``Qwen2ForSequenceClassification``
with ``num_labels=1``: backbone under ``model.``, head as ``score.weight``), so a plain
``AutoModelForSequenceClassification.from_pretrained(dir)`` loads what we save, and we load
published reward models in that layout. One difference: HF pools at the last token that is not
``pad_token_id``, which is wrong for pad == eos tokenizers; minirlhf pools with the attention mask.
"""
import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification

from minirlhf.models.forward import position_ids_from_attention_mask
from minirlhf.models.policy import disable_dropout, resolve_dtype


class ScalarHeadModel(nn.Module):
    """``backbone`` (the base transformer, no LM head) + ``score_head = nn.Linear(hidden, 1, bias=False)``."""

    def __init__(self, backbone, seed=0):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        hidden_size = self.config.get_text_config().hidden_size
        weight = next(backbone.parameters())
        # float32 even over a bf16 backbone: the reward is this one dot product (see ``token_scores``)
        head_dtype = torch.promote_types(weight.dtype, torch.float32)
        self.score_head = nn.Linear(hidden_size, 1, bias=False, device=weight.device, dtype=head_dtype)
        # A small random head (std 1/sqrt(hidden+1), as in Ziegler et al. 2019's reward head):
        # initial scores are O(1) and different prompts already get different scores.
        generator = torch.Generator().manual_seed(seed)
        init = torch.randn(self.score_head.weight.shape, generator=generator) / math.sqrt(hidden_size + 1)
        with torch.no_grad():
            self.score_head.weight.copy_(init)

    def token_scores(self, input_ids, attention_mask):
        """``scores[b, l] = w · h(x)[b, l]`` at every position: ``[B, L]`` -> ``[B, L]`` float32.

        The head's dot product runs in float32 whatever the backbone's dtype or autocast: in bf16
        (8 mantissa bits) a reward of 5 would be rounded by up to ±0.02, and PPO/GRPO advantages
        are differences of rewards.
        """
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_attention_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state
        with torch.autocast(hidden.device.type, enabled=False):
            return F.linear(hidden.float(), self.score_head.weight.float()).squeeze(-1)

    @classmethod
    def from_causal_lm(cls, name_or_path, dtype=None, device=None, seed=0, trust_remote_code=False, keep_dropout=False):
        """The backbone of a causal-LM checkpoint (its LM head dropped) + a new head seeded by ``seed``;
        dropout off unless ``keep_dropout`` (``models/policy.py``)."""
        backbone = AutoModel.from_pretrained(
            name_or_path, dtype=resolve_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code
        )
        model = cls(backbone if keep_dropout else disable_dropout(backbone), seed=seed)
        return model.to(device) if device is not None else model

    @classmethod
    def from_pretrained(cls, directory, dtype=None, device=None, trust_remote_code=False, keep_dropout=False):
        """Load a checkpoint in HF's sequence-classification layout with one label (ours or a published
        RM); dropout off unless ``keep_dropout``."""
        hf_model = AutoModelForSequenceClassification.from_pretrained(
            directory,
            num_labels=1,
            dtype=resolve_dtype(dtype),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
        model = cls(hf_model.base_model if keep_dropout else disable_dropout(hf_model.base_model))
        with torch.no_grad():
            model.score_head.weight.copy_(hf_model.score.weight)
        return model.to(device) if device is not None else model

    def save_pretrained(self, directory, tokenizer=None, state_dict=None):
        """Write ``config.json`` + ``model.safetensors`` (+ the tokenizer) in HF's layout.

        ``state_dict``: the weights to write, as ``self.state_dict()`` names them (default: the
        module's own; a sharded model passes its gathered whole tensors, as with HF's models).
        Like HF's ``save_pretrained`` it writes into ``directory`` as it goes; for an all-or-nothing
        save wrap it in ``minirlhf.data.atomic.write_dir_atomic`` (the trainers' checkpoints do).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        prefix = self.backbone.base_model_prefix  # "model" for Qwen2/Llama, "transformer" for GPT-2
        weights = self.state_dict() if state_dict is None else state_dict
        state = {f"{prefix}.{name.removeprefix('backbone.')}": t.detach().contiguous()
                 for name, t in weights.items() if name.startswith("backbone.")}
        state["score.weight"] = weights["score_head.weight"].detach().contiguous()
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})

        config = copy.deepcopy(self.config)
        config.architectures = [sequence_classification_architecture(self.config, self.backbone)]
        config.num_labels = 1
        config.to_json_file(str(directory / "config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


def sequence_classification_architecture(config, backbone):
    """``Qwen2ForCausalLM`` or ``Qwen2Model`` -> ``Qwen2ForSequenceClassification``."""
    for name in config.architectures or []:
        if name.endswith("ForCausalLM"):
            return name.removesuffix("ForCausalLM") + "ForSequenceClassification"
        if name.endswith("ForSequenceClassification"):
            return name
    return type(backbone).__name__.removesuffix("Model") + "ForSequenceClassification"
