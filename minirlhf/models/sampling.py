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
import torch

from minirlhf.models.forward import position_ids_from_attention_mask


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


@torch.no_grad()
def sample_responses(model, prompt_ids, prompt_mask, max_new_tokens, stop_ids, pad_token_id,
                     temperature=1.0, generator=None):
    """Sample up to ``max_new_tokens`` tokens per prompt with a KV cache.

    At each step ``y_t ~ softmax(logits_t / temperature)`` (``temperature=0`` is greedy argmax).

    Shapes: ``prompt_ids``, ``prompt_mask`` ``[B, P]``, left-padded. Returns
    ``(response_ids [B, N], response_mask [B, N])`` with ``N ≤ max_new_tokens`` (the loop stops
    once every row has produced a stop token). ``response_mask`` is 1 up to and including the
    first stop token of each row; later positions hold ``pad_token_id`` and mask 0. A row that
    never stops keeps all ``N`` tokens (its response was cut at the budget).
    """
    batch_size = prompt_ids.shape[0]
    attention_mask = prompt_mask.long()
    stop = torch.tensor(stop_ids, device=prompt_ids.device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=prompt_ids.device)
    tokens, alive = [], []

    # 1. Prefill: one pass over the prompts fills the cache and gives the first token's logits
    #    (only the last column's: at Qwen's 151,936-token vocabulary the others would cost GBs).
    outputs = model(input_ids=prompt_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_attention_mask(attention_mask), use_cache=True,
                    logits_to_keep=1)
    for _ in range(max_new_tokens):
        # 2. Sample the next token from the last position's distribution.
        logits = outputs.logits[:, -1, :].float()
        if temperature == 0:
            next_token = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        # 3. Rows that already stopped emit padding; the token that stops a row still counts.
        next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
        tokens.append(next_token)
        alive.append(~finished)
        finished = finished | torch.isin(next_token, stop)
        if bool(finished.all()):
            break
        # 4. Decode one column: the new token reads the cache; its position is the number of
        #    real tokens before it. Finished rows keep decoding padding that is thrown away.
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=-1)
        outputs = model(input_ids=next_token[:, None], attention_mask=attention_mask,
                        position_ids=attention_mask.sum(-1, keepdim=True) - 1,
                        past_key_values=outputs.past_key_values, use_cache=True)
    return torch.stack(tokens, dim=1), torch.stack(alive, dim=1).long()


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
