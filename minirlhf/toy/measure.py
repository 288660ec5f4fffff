"""The toy world's truth applied to responses: the gold reward r*(x, y), its parts, math accuracy.

Every place that reports the gold reward uses these: the online trainers log ``gold_summary`` of
each rollout next to the proxy reward they optimise, ``generate`` and ``score`` add
``gold_scores`` to each record, the pipeline evaluates every policy with them, and
``measure_policy`` is how the toy world reports what its SFT policy is worth (compare with
``max_gold``: what alignment has to gain). None of it is ever trained on.
"""
from __future__ import annotations

import torch

from minirlhf.data.chat import encode_prompt
from minirlhf.data.prompts import prompt_batch
from minirlhf.models.sampling import generate_rollouts
from minirlhf.toy.corpus import sigmoid
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


def is_toy_prompt(prompt) -> bool:
    """Whether ``prompt`` is a prompt of the toy language (only those have a gold reward)."""
    if not isinstance(prompt, str):
        return False
    try:
        parse_prompt(prompt)
    except ValueError:
        return False
    return True


def gold_scores(prompt: str, response: str) -> dict[str, float]:
    """``{"gold": r*(x, y), "gold_helpful": helpful(x, y), "gold_harmless": harmless(x, y)}``."""
    return {"gold": gold_reward(prompt, response), "gold_helpful": helpful_score(prompt, response),
            "gold_harmless": harmless_score(prompt, response)}


def gold_summary(prompts: list[str], responses: list[str]) -> dict[str, float]:
    """Means over the ``(prompts[i], responses[i])`` pairs of ``gold``, ``gold_helpful`` and
    ``gold_harmless``, and ``math_accuracy`` over the math prompts among them (absent when none)."""
    if len(prompts) != len(responses) or not prompts or not all(isinstance(r, str) for r in responses):
        raise ValueError(f"gold_summary: expected one response string per prompt, got {len(prompts)} prompts and "
                         f"{len(responses)} responses (flatten per-prompt lists of samples first)")
    pairs = list(zip(prompts, responses))
    n = len(pairs)
    summary = {
        "gold": sum(gold_reward(p, r) for p, r in pairs) / n,
        "gold_helpful": sum(helpful_score(p, r) for p, r in pairs) / n,
        "gold_harmless": sum(harmless_score(p, r) for p, r in pairs) / n,
    }
    math_pairs = [(p, r) for p, r in pairs if parse_prompt(p).kind == "math"]
    if math_pairs:
        summary["math_accuracy"] = sum(math_correct(p, r) for p, r in math_pairs) / len(math_pairs)
    return summary


def bayes_gap(prompt: str, response_1: str, response_2: str, score_1: float, score_2: float) -> float:
    """How much accuracy a ranker that scored the pair ``(score_1, score_2)`` gives up against the
    Bayes-optimal one, in expectation over the pair's Bradley–Terry label::

        Δ = r*(x, y1) − r*(x, y2),   s = sign(score_1 − score_2)
        gap = σ(|Δ|) − σ(s·Δ)        (σ(0) = ½ when the ranker ties)

    The label is y1 ≻ y2 with probability σ(Δ), so σ(s·Δ) is the chance that the ranker's order
    is the label and σ(|Δ|) the best chance any ranker has. Its mean over a test set is the gap to
    the Bayes ceiling without the noise of which labels happened to be drawn (that noise alone
    moves a 1,000-pair test accuracy by ±1.4 points).
    """
    delta = gold_reward(prompt, response_1) - gold_reward(prompt, response_2)
    sign = (score_1 > score_2) - (score_1 < score_2)
    return sigmoid(abs(delta)) - sigmoid(sign * delta)


def filler_count(response: str) -> int:
    """Filler words in a response: what the planted length bias pays for and r* charges for."""
    return sum(w in FILLERS for w in words_of(response))


@torch.no_grad()
def sample_policy(model, tokenizer, prompts: list[str], num_samples: int = 1, max_new_tokens: int = 32,
                  temperature: float = 1.0, batch_size: int = 64, seed: int = 0) -> list[list[str]]:
    """``num_samples`` responses per prompt (greedy when ``temperature == 0``), decoded as text,
    sampled with the trainers' own sampler (``generate_rollouts``) after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    examples = [{"prompt": p, "input_ids": encode_prompt(tokenizer, p)} for p in prompts]
    out: list[list[str]] = []
    for start in range(0, len(examples), batch_size):
        batch = prompt_batch(examples[start : start + batch_size], tokenizer.pad_token_id, device)
        rollout = generate_rollouts(model, tokenizer, batch, max_new_tokens, n_per_prompt=num_samples,
                                    temperature=temperature)
        responses = [r.strip() for r in rollout["responses"]]
        out += [responses[i : i + num_samples] for i in range(0, len(responses), num_samples)]
    return out


def measure_policy(model, tokenizer, prompts: list[str], num_samples: int = 4, temperature: float = 1.0,
                   seed: int = 0) -> dict[str, float]:
    """``gold_summary`` of ``num_samples`` sampled responses per prompt, plus filler and word counts
    per response and ``max_gold``, the best mean gold reward achievable on these prompts."""
    responses = sample_policy(model, tokenizer, prompts, num_samples=num_samples, temperature=temperature, seed=seed)
    flat_prompts = [p for p, ys in zip(prompts, responses) for _ in ys]
    flat = [y for ys in responses for y in ys]
    return {
        **gold_summary(flat_prompts, flat),
        "filler_per_response": sum(map(filler_count, flat)) / len(flat),
        "words_per_response": sum(len(words_of(y)) for y in flat) / len(flat),
        "max_gold": sum(map(max_gold_reward, flat_prompts)) / len(flat),
    }
