"""The toy tokenizer: a byte-level BPE shaped like Qwen2.5-Instruct's, over the toy vocabulary.

Like Qwen's tokenizer it is a ByteLevel BPE (any string encodes: 256 byte tokens underneath), with
the special tokens ``<|endoftext|>`` (pad), ``<|im_start|>`` and ``<|im_end|>`` (eos) and Qwen2.5's
ChatML chat template, so the toy model runs exactly the code path a real Qwen2.5-Instruct runs.
There is no BOS token (so no double-BOS pitfall).

The BPE is trained on the toy vocabulary, each word both at the start of a line (``"cats"``) and
after a space (``" cats"``), with an unlimited vocabulary budget: training merges until every
toy word is a single token in both positions. The result has a few hundred tokens.

Saved next to a Qwen2 model (``base/``, ``sft/``), ``AutoTokenizer`` loads it as ``Qwen2Tokenizer``,
whose pre-tokenizer splits digits one by one, exactly as Qwen's does: there ``" 10"`` is
``Ġ``, ``1``, ``0``. Every trainer and ``load_world().tokenizer`` load it that way.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from minirlhf.toy.language import vocabulary

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "you are a helpful assistant ."

# Qwen2.5-Instruct's template without the tool-calling branches; only the default system prompt
# differs (in toy words, so it costs a few tokens instead of dozens of bytes).
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def train_toy_bpe() -> Tokenizer:
    """Train the byte-level BPE on the toy vocabulary (deterministic; milliseconds)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # no budget: merge until every word is whole
        min_frequency=1,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = sorted(set(vocabulary()) | {"system", "user", "assistant"})
    tok.train_from_iterator([w for word in words for w in (word, " " + word)], trainer=trainer)
    return tok


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer as a transformers tokenizer (eos ``<|im_end|>``, pad ``<|endoftext|>``)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_toy_bpe(),
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=128,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_toy_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Build and ``save_pretrained`` the toy tokenizer (writes chat_template.jinja too)."""
    tokenizer = build_toy_tokenizer()
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
