"""Sampling: the policy writes responses, one token at a time, with a KV cache.

PPO, GRPO, RLOO and online DPO start each iteration by letting the current policy answer a batch
of prompts (``n_per_prompt`` times each for the group methods); ``generate``, the pipeline's
evaluation and the toy world's ``measure_policy`` sample the same way. The result is one ``[B, L]``
batch, a *rollout*::

    input_ids       [B, L]  prompt (left-padded to P columns) ++ response (right-padded to N)
    attention_mask  [B, L]  1 = real token: the prompt's own tokens and the response up to EOS
    response_mask   [B, L]  1 = generated token up to *and including* the first EOS; 0 for the
                            prompt, left padding, and everything after the EOS

The sampling loop is written by hand (rather than ``model.generate``) so that every step is
visible: one forward pass over the prompts fills the KV cache, then each new token is a forward
pass over a single column that reads the cache. Position ids follow the repository convention
``attention_mask.cumsum(-1) - 1``, so a left-padded prompt samples exactly what it would unpadded.
"""
import functools
import inspect
import math

import torch
from transformers import DynamicCache

from minirlhf.errors import MinirlhfError
from minirlhf.models.forward import position_ids_from_attention_mask

# How many tokens the sampler decodes between two looks at which rows have stopped, per device
# type. A look makes the host wait for the device: free on the CPU, a stall of a GPU's queue.
CHECK_EVERY = {"cpu": 1, "other": 8}


def eos_token_ids(model, tokenizer):
    """The token ids that end a response.

    Chat models often stop on more than one token (Qwen2.5: ``<|im_end|>`` and ``<|endoftext|>``);
    the model's ``generation_config.eos_token_id`` (an int or a list) names them, and the
    tokenizer's ``eos_token_id`` is always included.
    """
    ids = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids.update([config_eos] if isinstance(config_eos, int) else config_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id and the model's generation_config names none")
    return sorted(ids)


def cache_keyword(model):
    """The keyword under which ``model.forward`` takes its KV cache: ``cache`` (transformers ≥ 5.24)
    or ``past_key_values`` (earlier versions, and remote-code models written for them).

    Read from the forward's signature, never guessed: transformers removes a renamed keyword after
    a deprecation period (``past_key_values`` in 5.40), and a removed keyword passed anyway would
    vanish into ``**kwargs`` — every decode step would then see only its newest token.
    """
    return _cache_keyword(type(model))


@functools.cache
def _cache_keyword(model_class):
    parameters = inspect.signature(model_class.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise MinirlhfError(f"{model_class.__name__}.forward takes neither `cache` nor `past_key_values`: the "
                        "KV-cached sampler cannot give it a cache")


def next_token_probs(logits, temperature):
    """``softmax(z / τ)`` over the vocabulary, float32: ``[B, V]`` -> ``[B, V]``.

    The logits are upcast *before* the division, as ``gather_logprobs`` does when it scores the
    samples: bf16 logits divided in bf16 would be rounded once more, and the trainers' ratio would
    compare a distribution that is not the one the tokens were drawn from.
    """
    return torch.softmax(logits.float() / temperature, dim=-1)


@torch.no_grad()
def sample_responses(model, prompt_ids, prompt_mask, max_new_tokens, stop_ids, pad_token_id,
                     temperature=1.0, generator=None):
    """Sample up to ``max_new_tokens`` tokens per prompt with a KV cache.

    At each step ``y_t ~ softmax(logits_t / temperature)`` (``temperature=0`` is greedy argmax).

    Shapes: ``prompt_ids``, ``prompt_mask`` ``[B, P]``, left-padded. Returns
    ``(response_ids [B, N], response_mask [B, N])`` with ``N ≤ max_new_tokens`` (the last row to
    stop does so at column ``N − 1``). ``response_mask`` is 1 up to and including the first stop
    token of each row; later positions hold ``pad_token_id`` and mask 0. A row that never stops
    keeps all ``N`` tokens (its response was cut at the budget).

    Rows that have stopped leave the batch (and the cache) once a quarter of the decoding rows
    have: the rest decode without them. On a GPU the loop looks at which rows stopped only every
    ``CHECK_EVERY`` tokens — each look waits for the GPU — so up to ``CHECK_EVERY − 1`` steps may
    decode rows that already stopped; their tokens are thrown away. Neither changes the tokens:
    with the same ``generator`` state they are those of ``torch.multinomial`` on the whole batch
    at every step (on a GPU the generator may then have advanced a few steps further).
    """
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"sample_responses: temperature must be >= 0 (0 = greedy), got {temperature}")
    batch_size, device = prompt_ids.shape[0], prompt_ids.device
    check_every = CHECK_EVERY.get(device.type, CHECK_EVERY["other"])
    stop = torch.tensor(stop_ids, device=device)
    tokens = prompt_ids.new_full((batch_size, max_new_tokens), pad_token_id)
    alive = torch.zeros(batch_size, max_new_tokens, dtype=torch.long, device=device)
    rows = torch.arange(batch_size, device=device)  # the rows still in the decoding batch
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)  # per decoding row
    attention_mask = prompt_mask.long()
    kv_cache = DynamicCache(config=model.config)
    cache = {cache_keyword(model): kv_cache}  # passed as cache= or past_key_values=

    # 1. Prefill: one pass over the prompts fills the cache and gives the first token's logits
    #    (only the last column's: at Qwen's 151,936-token vocabulary the others would cost GBs).
    logits = model(input_ids=prompt_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1,
                   position_ids=position_ids_from_attention_mask(attention_mask), **cache).logits[:, -1, :]
    for step in range(max_new_tokens):
        # 2. Sample the next token from the last position's distribution: argmax_i p_i / E_i with
        #    E_i ~ Exp(1) picks i with probability p_i (the race torch.multinomial(p, 1) runs). The
        #    noise is drawn for the whole batch, so a row's token does not depend on which other
        #    rows are still decoding, and it is the one torch.multinomial would draw.
        if temperature == 0:
            next_token = logits.argmax(dim=-1)
        else:
            noise = torch.empty(batch_size, logits.shape[-1], device=device).exponential_(generator=generator)
            next_token = (next_token_probs(logits, temperature) / noise[rows]).argmax(dim=-1)
        # 3. Rows that already stopped emit padding; the token that stops a row still counts.
        next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
        tokens[rows, step] = next_token
        alive[rows, step] = (~finished).long()
        finished = finished | torch.isin(next_token, stop)
        if step + 1 == max_new_tokens:
            break
        # 4. Every `check_every` tokens: stop when every row has; drop the stopped rows from the
        #    batch and the cache once they are a quarter of it.
        if (step + 1) % check_every == 0:
            decoding = (~finished).nonzero().squeeze(-1)  # the host waits for the device here
            if len(decoding) == 0:
                break
            if len(decoding) <= 0.75 * len(rows):
                rows, finished, next_token = rows[decoding], finished[decoding], next_token[decoding]
                attention_mask = attention_mask[decoding]
                kv_cache.batch_select_indices(decoding)
        # 5. Decode one column: the new token reads the cache; its position is the number of real
        #    tokens before it.
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=-1)
        logits = model(input_ids=next_token[:, None], attention_mask=attention_mask, use_cache=True,
                       position_ids=attention_mask.sum(-1, keepdim=True) - 1, **cache).logits[:, -1, :]
    width = int(alive.any(dim=0).sum())  # columns up to the last row's stop
    return tokens[:, :width], alive[:, :width]


@torch.no_grad()
def generate_rollouts(model, tokenizer, prompt_batch, max_new_tokens, n_per_prompt=1, temperature=1.0,
                      generator=None):
    """Sample ``n_per_prompt`` responses to each prompt and return them as one training batch.

    ``prompt_batch``: ``input_ids``, ``attention_mask`` ``[B0, P]`` (left-padded, as
    ``collate_prompts`` makes them), and optionally lists ``prompts`` (texts) and ``answers``.
    Each prompt is repeated ``n_per_prompt`` times *consecutively*, so rows
    ``g·G … g·G + G − 1`` answer prompt ``g`` (the layout ``group_advantages`` expects).
    Returns a dict with ``B = B0 · n_per_prompt`` rows:

    - ``input_ids``, ``attention_mask``, ``response_mask``: ``[B, L]``, ``L = P + N`` (module
      docstring);
    - ``responses``: the decoded response texts (special tokens such as EOS dropped);
    - ``ended`` ``[B]`` bool: the response stopped with EOS (False = cut at the budget);
    - ``response_length`` ``[B]``: number of response tokens, EOS included;
    - ``prompts``, ``answers`` (when given) and ``prompt_index`` ``[B]``, repeated per row.

    The model samples in eval mode (no dropout) and is put back in its previous mode.
    """
    was_training = model.training
    model.eval()
    prompt_ids = prompt_batch["input_ids"].repeat_interleave(n_per_prompt, dim=0)
    prompt_mask = prompt_batch["attention_mask"].long().repeat_interleave(n_per_prompt, dim=0)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = eos_token_ids(model, tokenizer)
    response_ids, response_valid = sample_responses(
        model, prompt_ids, prompt_mask, max_new_tokens, stop_ids, pad_token_id, temperature, generator
    )
    model.train(was_training)

    is_stop = torch.isin(response_ids, torch.tensor(stop_ids, device=response_ids.device))
    response_length = response_valid.sum(-1)
    rollout = {
        "input_ids": torch.cat([prompt_ids, response_ids], dim=1),
        "attention_mask": torch.cat([prompt_mask, response_valid], dim=1),
        "response_mask": torch.cat([torch.zeros_like(prompt_mask), response_valid], dim=1),
        "responses": tokenizer.batch_decode(
            [row[:n].tolist() for row, n in zip(response_ids, response_length.tolist())],
            skip_special_tokens=True,
        ),
        "ended": (is_stop & response_valid.bool()).any(dim=-1),
        "response_length": response_length,
        "prompt_index": torch.arange(len(prompt_ids), device=prompt_ids.device) // n_per_prompt,
    }
    for key in ("prompts", "answers"):
        if prompt_batch.get(key) is not None:
            rollout[key] = [value for value in prompt_batch[key] for _ in range(n_per_prompt)]
    return rollout
