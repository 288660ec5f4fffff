"""Sampling toy responses of mixed quality: the "writers" behind every toy dataset.

``sample_response(prompt, quality, rng)`` imitates a writer of skill ``quality`` in [0, 1]: a good
writer stays on topic, refuses harmful requests and gets sums right; a poor one drifts off topic,
complies, babbles or miscounts. Datasets draw ``quality`` uniformly, so they mix good and bad
answers on purpose: a policy that imitates them (SFT) is mediocre and alignment has room to help.

Filler words are added separately (``add_filler``), so the data generator decides how filler
correlates with quality: independent of it in the SFT data, correlated with the better response in
the preference data (the planted length bias).

Everything is driven by a ``random.Random`` so a seed fixes every byte.
"""
from __future__ import annotations

import random

from minirlhf.toy.language import (
    CONTENT_HARM,
    CONTENT_TOPIC,
    FILLERS,
    HARMS,
    NONSENSE,
    TOPICS,
    ToyPrompt,
)

REFUSALS = ("sorry , i can not help with that .", "sorry , that is not safe . please stay safe .")
DONT_KNOW = "i do not know ."
VERBS = ("have", "like", "need")
_ALL_CONTENT = tuple(sorted(CONTENT_TOPIC)) + tuple(sorted(CONTENT_HARM))


def _listing(words: list[str]) -> str:
    """'a' / 'a and b' / 'a , b and c'."""
    if len(words) == 1:
        return words[0]
    return " , ".join(words[:-1]) + " and " + words[-1]


def _helpful(p: ToyPrompt, q: float, rng: random.Random) -> str:
    if rng.random() < 0.25 * (1 - q):  # an unhelpful non-answer
        return rng.choice((DONT_KNOW, REFUSALS[0]))
    own = TOPICS[p.subject]
    words = []
    for _ in range(rng.randint(1, 4)):
        u = rng.random()
        if u < 0.4 + 0.55 * q:
            words.append(rng.choice(own))  # with replacement: repeats happen
        elif u < 0.93:
            words.append(rng.choice(_ALL_CONTENT))  # off topic (rarely on topic by chance)
        else:
            words.append(rng.choice(NONSENSE))
    text = f"{p.subject} {rng.choice(VERBS)} {_listing(words)} ."
    return text if rng.random() > 0.1 * (1 - q) else text[:-2]  # sometimes unfinished


def _harmful(p: ToyPrompt, q: float, rng: random.Random) -> str:
    if rng.random() < 0.15 + 0.7 * q:
        return rng.choice(REFUSALS)
    harm_words = HARMS[p.subject][1]
    a, b = rng.sample(harm_words, 2)
    if rng.random() < 0.5:
        return f"first get {a} , then use {b} ."
    return f"you need {_listing(rng.sample(harm_words, rng.randint(1, 3)))} ."


def _math(p: ToyPrompt, q: float, rng: random.Random) -> str:
    if rng.random() < 0.1 * (1 - q):
        return DONT_KNOW
    answer = p.answer
    if rng.random() >= 0.3 + 0.6 * q:  # a near miss, never negative
        answer = max(0, answer + rng.choice((-3, -2, -1, 1, 2, 3)))
        answer = answer if answer != p.answer else p.answer + 1
    # half the writers restate the sum first ("3 plus 4 is 7 ."): the operands are then right
    # before the answer, which makes arithmetic learnable for a tiny model (a chain of thought)
    restated = " ".join(p.text.split()[2:5]) + " is {n} ."
    form = rng.choice((restated, restated, "the answer is {n} .", "i think it is {n} ."))
    return form.format(n=answer)


def sample_response(prompt: ToyPrompt, quality: float, rng: random.Random) -> str:
    """One response to ``prompt`` by a writer of skill ``quality`` in [0, 1] (no filler)."""
    sampler = {"helpful": _helpful, "harmful": _harmful, "math": _math}[prompt.kind]
    return sampler(prompt, quality, rng)


def add_filler(response: str, n: int, rng: random.Random) -> str:
    """Insert ``n`` filler words at random places before the final word."""
    words = response.split()
    for _ in range(n):
        words.insert(rng.randint(0, max(len(words) - 1, 0)), rng.choice(FILLERS))
    return " ".join(words)
