"""Score a policy against the toy world's gold reward: sample responses, average r*(x, y).

``measure_policy(model, tokenizer, prompts)`` is how the toy world reports what its SFT policy is
worth (and what alignment has to gain: compare with ``max_gold_reward``). It uses
``model.generate`` on left-padded chat-formatted prompts; the trainers have their own hand-written
sampler (``minirlhf.train.rollout``).
"""
from __future__ import annotations

import torch

from minirlhf.toy.language import (
    FILLERS,
    gold_reward,
    harmless_score,
    helpful_score,
    math_correct,
    max_gold_reward,
    parse_prompt,
    words_of,
)


@torch.no_grad()
def sample_policy(model, tokenizer, prompts: list[str], num_samples: int = 1, max_new_tokens: int = 32,
                  temperature: float = 1.0, batch_size: int = 64, seed: int = 0) -> list[list[str]]:
    """``num_samples`` responses per prompt (greedy when ``temperature == 0``), decoded as text."""
    torch.manual_seed(seed)
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    out: list[list[str]] = [[] for _ in prompts]
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            # plain ancestral sampling (no top-k/top-p truncation), or greedy at temperature 0
            sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=num_samples, **sampling)
            responses = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, response in enumerate(responses):
                out[start + i // num_samples].append(response.strip())
    finally:
        tokenizer.padding_side = side
    return out


def gold_summary(prompts: list[str], responses: list[list[str]]) -> dict[str, float]:
    """Mean gold reward, helpful, harmless, math accuracy, filler and length of the responses,
    and the best achievable mean gold reward on these prompts."""
    rows = [(p, y) for p, ys in zip(prompts, responses) for y in ys]
    n = len(rows)
    math_rows = [(p, y) for p, y in rows if parse_prompt(p).kind == "math"]
    return {
        "gold": sum(gold_reward(p, y) for p, y in rows) / n,
        "helpful": sum(helpful_score(p, y) for p, y in rows) / n,
        "harmless": sum(harmless_score(p, y) for p, y in rows) / n,
        "math_accuracy": sum(math_correct(p, y) for p, y in math_rows) / max(len(math_rows), 1),
        "filler_per_response": sum(sum(w in FILLERS for w in words_of(y)) for _, y in rows) / n,
        "words_per_response": sum(len(words_of(y)) for _, y in rows) / n,
        "max_gold": sum(max_gold_reward(p) for p, _ in rows) / n,
    }


def measure_policy(model, tokenizer, prompts: list[str], num_samples: int = 4, temperature: float = 1.0,
                   seed: int = 0) -> dict[str, float]:
    """``gold_summary`` of ``num_samples`` sampled responses per prompt."""
    responses = sample_policy(model, tokenizer, prompts, num_samples=num_samples, temperature=temperature, seed=seed)
    return gold_summary(prompts, responses)
