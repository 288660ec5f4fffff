"""Builders for offline test stand-ins: a local directory shaped like a real Qwen2 checkpoint.

There is no model hub in the tests, so ``build_qwen2_like_checkpoint`` writes what
``Qwen/Qwen2.5-0.5B-Instruct`` ships, in miniature: a byte-level BPE tokenizer (trained here on a
few sentences) with Qwen's special tokens and chat template, and a 2-layer ``Qwen2ForCausalLM``
saved as safetensors. minirlhf loads it by path exactly as it would load the hub name.
"""
import json
from pathlib import Path

import torch

# Qwen2.5-Instruct's chat template without the tool-calling branches: a default system prompt,
# "<|im_start|>role\ncontent<|im_end|>\n" per message, and "<|im_start|>assistant\n" to generate.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TRAINING_TEXT = [
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "What is the capital of France? The capital of France is Paris.",
    "How do I bake bread? Mix flour, water, salt and yeast, knead, let it rise, and bake.",
    "I cannot help with that request because it could hurt someone.",
    "Human: Tell me a joke. Assistant: Why did the chicken cross the road?",
    "Sure! Here is a short answer: 2 + 2 = 4, and 12 * 3 = 36.",
    "system user assistant helpful harmless honest response prompt question answer",
]


def build_qwen2_tokenizer(vocab_size=400):
    """A ``PreTrainedTokenizerFast`` configured like Qwen2.5-Instruct's (eos <|im_end|>, pad
    <|endoftext|>, no BOS, the chat template above), with a tiny byte-level BPE vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
    )
    bpe.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=2048,
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_qwen2_like_checkpoint(directory, seed=0, hidden_size=32, num_layers=2):
    """Write tokenizer + tiny ``Qwen2ForCausalLM`` (safetensors) to ``directory``; return its Path."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    directory = Path(directory)
    tokenizer = build_qwen2_tokenizer()
    tokenizer.save_pretrained(directory)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,  # as in Qwen2.5-0.5B
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def write_jsonl(path, records):
    """Write ``records`` (dicts) as JSON lines; return the Path."""
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path, records):
    path = Path(path)
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def build_gpt2_checkpoint(directory, dropout=0.1, seed=0, hidden_size=32, num_layers=2):
    """Write the Qwen-like tokenizer + a tiny ``GPT2LMHeadModel`` with dropout ``dropout`` (GPT-2's
    own default is 0.1: embedding, attention and residual dropout) to ``directory``; return its Path.
    A model family whose dropout is on, unlike Qwen2's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = Path(directory)
    tokenizer = build_qwen2_tokenizer()
    tokenizer.save_pretrained(directory)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=hidden_size, n_layer=num_layers, n_head=4,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(directory, safe_serialization=True)
    return directory


def multinomial_sampling_reference(model, input_ids, attention_mask, budget, stop_ids, pad_id, temperature, generator):
    """Tokens ``[B, N]`` sampled the plain way: a full forward (no KV cache) over the whole batch at
    every step and ``torch.multinomial`` on every row's ``softmax(float32 logits / τ)``; stopped rows
    emit ``pad_id``; the loop ends when every row has emitted one of ``stop_ids`` or at ``budget``."""
    from minirlhf.models.forward import position_ids_from_attention_mask

    ids, mask, tokens = input_ids, attention_mask, []
    finished = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    stops = torch.tensor(stop_ids, device=ids.device)
    while len(tokens) < budget and not finished.all():
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask)).logits
        probs = torch.softmax(logits[:, -1].float() / temperature, -1)
        token = torch.where(finished, pad_id, torch.multinomial(probs, 1, generator=generator).squeeze(-1))
        tokens.append(token)
        finished |= torch.isin(token, stops)
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(token)[:, None]], 1)
    return torch.stack(tokens, 1)
