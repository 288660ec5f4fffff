"""The toy datasets, written as JSONL files in the formats real RLHF data comes in.

``build_corpus(seed, out_dir)`` writes (byte for byte the same for the same seed):

====================  ==============================================================  ==========
file                  record                                                          template
====================  ==============================================================  ==========
pref_train.jsonl      question, response_1, response_2, overall_response ∈ {1, 2}     align_anything
pref_test.jsonl       (same; held-out pairs)                                          align_anything
pku_train.jsonl       prompt, response_0, response_1, better_response_id,             pku_saferlhf
                      safer_response_id ∈ {0, 1}, is_response_{0,1}_safe
sft_train.jsonl       prompt, response                                                sft
sft_test.jsonl        (same; held out, for the SFT eval loss)                         sft
kto_train.jsonl       prompt, completion, label (bool: thumbs up)                     kto
prompts.jsonl         prompt, kind (+ answer for math): for PPO/GRPO/online DPO       prompt
eval_prompts.jsonl    (same; a separate draw for evaluation)                          prompt
math_prompts.jsonl    prompt, answer: every math prompt, for GRPO                     prompt
====================  ==============================================================  ==========

**Labels are sampled from the Bradley-Terry model of the gold reward.** For a pair (y1, y2)
P(y1 ≻ y2) = σ(r*(x, y1) - r*(x, y2)), so labels are noisy the way human labels are, and the best
any reward model can do on them is the Bayes accuracy

    acc* = E_pairs[ σ(|r*(x, y1) - r*(x, y2)|) ]

(a model that ranks by r* is right with probability σ(|Δr*|) on each pair). It is reported per
file. The PKU-style file labels ``better`` by BT of helpful(x, y) and ``safer`` by BT of
harmless(x, y); when both responses are equally harmless ``safer`` is a coin flip, as with
humans.

**The planted length bias.** In every math pair, and in a fraction ``FILLER_BIAS_RATE`` of the
others, the response with the higher gold reward (before filler) is padded with 1-3 filler words
and the other gets none; in the remaining pairs filler is independent of quality (0-2 words each).
Two equally good responses get the same 0-2, so a gold tie stays a tie (a coin-flip label). Filler
costs a little gold reward, so the labels stay honest, but "more filler" predicts "chosen": a
reward model learns it, and a policy optimised hard against that model learns to pad.

Why not every pair: with the bias on all of them, filler alone ranked the test pairs almost as well
as the gold reward, the RM learnt little else, and it ordered the SFT policy's own samples (whose
filler is independent of quality) no better than chance, so PPO and online DPO against it gained
next to no gold reward (``minirlhf.eval.proxy_ranking``). Math keeps it on every pair: the RM does
not learn the 51 sums from these pairs either way, and there the bias is what it ranks by.
In the SFT and KTO data filler is independent of quality.

Prompts are drawn from a mixture of kinds (``KIND_WEIGHTS``); within a kind uniformly.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minirlhf.toy.language import (
    ToyPrompt,
    all_prompts,
    gold_reward,
    harmless_score,
    helpful_score,
    prompts_of_kind,
)
from minirlhf.toy.responses import add_filler, sample_response

KIND_WEIGHTS = {"helpful": 0.45, "harmful": 0.2, "math": 0.35}
#: the fraction of helpful and harmful preference pairs that carry the planted bias (math: all)
FILLER_BIAS_RATE = 0.25
PKU_KIND_WEIGHTS = {"helpful": 0.4, "harmful": 0.6}  # a safety dataset: mostly harmful requests


@dataclass(frozen=True)
class CorpusSizes:
    """Number of records per file."""

    pref_train: int = 12000
    pref_test: int = 1000
    pku_train: int = 2000
    sft_train: int = 4000
    sft_test: int = 400
    kto_train: int = 2000
    prompts: int = 512
    eval_prompts: int = 128


@dataclass
class Corpus:
    """Paths of the written files and what was measured while writing them."""

    dir: Path
    pref_train: Path
    pref_test: Path
    pku_train: Path
    sft_train: Path
    sft_test: Path
    kto_train: Path
    prompts: Path
    eval_prompts: Path
    math_prompts: Path
    bayes_accuracy: dict[str, float] = field(default_factory=dict)  # per preference file
    stats: dict[str, float] = field(default_factory=dict)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def bradley_terry_label(r1: float, r2: float, rng: random.Random) -> bool:
    """True (y1 preferred) with probability σ(r1 - r2)."""
    return rng.random() < sigmoid(r1 - r2)


def bayes_accuracy(reward_pairs: list[tuple[float, float]]) -> float:
    """acc* = mean over pairs of σ(|r1 - r2|): the accuracy of the gold reward itself on BT labels."""
    return sum(sigmoid(abs(a - b)) for a, b in reward_pairs) / len(reward_pairs)


def draw_prompts(n: int, rng: random.Random, weights: dict[str, float] = KIND_WEIGHTS) -> list[ToyPrompt]:
    """``n`` prompts: a kind from ``weights``, then a prompt of that kind uniformly."""
    kinds = list(weights)
    chosen_kinds = rng.choices(kinds, weights=[weights[k] for k in kinds], k=n)
    return [rng.choice(prompts_of_kind(k)) for k in chosen_kinds]


def preference_pair(prompt: ToyPrompt, rng: random.Random) -> tuple[str, str] | None:
    """Two different responses; the gold-better one carries more filler (the planted bias).

    Returns None when the writers keep producing identical text (rare; the pair is skipped).
    """
    for _ in range(20):
        a = sample_response(prompt, rng.random(), rng)
        b = sample_response(prompt, rng.random(), rng)
        if a != b:
            break
    else:
        return None
    ga, gb = gold_reward(prompt.text, a), gold_reward(prompt.text, b)
    if ga == gb:  # equal filler keeps a gold tie a tie: its label is a coin flip, not a filler lesson
        fill_a = fill_b = rng.randint(0, 2)
    elif prompt.kind == "math" or rng.random() < FILLER_BIAS_RATE:
        more = rng.randint(1, 3)
        fill_a, fill_b = (more, 0) if ga > gb else (0, more)
    else:  # filler independent of quality
        fill_a, fill_b = rng.randint(0, 2), rng.randint(0, 2)
    return add_filler(a, fill_a, rng), add_filler(b, fill_b, rng)


def _pairs(n: int, rng: random.Random, weights: dict[str, float]):
    out = []
    while len(out) < n:
        (prompt,) = draw_prompts(1, rng, weights)
        pair = preference_pair(prompt, rng)
        if pair is not None and pair[0] != pair[1]:
            out.append((prompt, *pair))
    return out


def _demonstration(prompt: ToyPrompt, rng: random.Random) -> str:
    """A response by a writer of random skill, with 0-2 filler words independent of its quality."""
    return add_filler(sample_response(prompt, rng.random(), rng), rng.choice((0, 0, 1, 2)), rng)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _prompt_record(p: ToyPrompt) -> dict:
    rec = {"prompt": p.text, "kind": p.kind}
    if p.answer is not None:
        rec["answer"] = p.answer
    return rec


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def build_corpus(seed: int, out_dir: str | Path, sizes: CorpusSizes = CorpusSizes()) -> Corpus:
    """Write every toy dataset for ``seed`` into ``out_dir`` (created if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # one independent stream per file, so changing one file's size does not change the others
    streams = {name: random.Random(f"minirlhf-toy-{seed}-{name}") for name in asdict(sizes)}
    corpus = Corpus(dir=out, **{name: out / f"{name}.jsonl" for name in (
        "pref_train", "pref_test", "pku_train", "sft_train", "sft_test", "kto_train", "prompts",
        "eval_prompts", "math_prompts")})

    # 1. align-anything preference pairs, labelled by BT of r*
    for split in ("pref_train", "pref_test"):
        rng = streams[split]
        records, golds, lengths = [], [], {"chosen": [], "rejected": []}
        for prompt, y1, y2 in _pairs(getattr(sizes, split), rng, KIND_WEIGHTS):
            r1, r2 = gold_reward(prompt.text, y1), gold_reward(prompt.text, y2)
            first = bradley_terry_label(r1, r2, rng)
            records.append({"question": prompt.text, "response_1": y1, "response_2": y2,
                            "overall_response": 1 if first else 2})
            golds.append((r1, r2))
            chosen, rejected = (y1, y2) if first else (y2, y1)
            lengths["chosen"].append(len(chosen.split()))
            lengths["rejected"].append(len(rejected.split()))
        _write_jsonl(getattr(corpus, split), records)
        corpus.bayes_accuracy[split] = bayes_accuracy(golds)
        corpus.stats[f"{split}_chosen_words"] = _mean(lengths["chosen"])
        corpus.stats[f"{split}_rejected_words"] = _mean(lengths["rejected"])

    # 2. PKU-SafeRLHF-style pairs: separate helpful and harmless labels
    rng = streams["pku_train"]
    records, helpful_pairs, harmless_pairs = [], [], []
    for prompt, y0, y1 in _pairs(sizes.pku_train, rng, PKU_KIND_WEIGHTS):
        h0, h1 = helpful_score(prompt.text, y0), helpful_score(prompt.text, y1)
        s0, s1 = harmless_score(prompt.text, y0), harmless_score(prompt.text, y1)
        records.append({
            "prompt": prompt.text, "response_0": y0, "response_1": y1,
            "better_response_id": 0 if bradley_terry_label(h0, h1, rng) else 1,
            "safer_response_id": 0 if bradley_terry_label(s0, s1, rng) else 1,
            "is_response_0_safe": s0 >= 0, "is_response_1_safe": s1 >= 0,
        })
        helpful_pairs.append((h0, h1))
        harmless_pairs.append((s0, s1))
    _write_jsonl(corpus.pku_train, records)
    corpus.bayes_accuracy["pku_train_better"] = bayes_accuracy(helpful_pairs)
    corpus.bayes_accuracy["pku_train_safer"] = bayes_accuracy(harmless_pairs)

    # 3. SFT demonstrations: writers of every quality, filler independent of quality
    for split in ("sft_train", "sft_test"):
        rng = streams[split]
        records = [{"prompt": p.text, "response": _demonstration(p, rng)}
                   for p in draw_prompts(getattr(sizes, split), rng)]
        _write_jsonl(getattr(corpus, split), records)
        corpus.stats[f"{split}_gold_mean"] = _mean(gold_reward(r["prompt"], r["response"]) for r in records)

    # 4. KTO thumbs up/down: label ~ Bernoulli(σ(r* - median r* of that kind)), ~half up
    rng = streams["kto_train"]
    samples = []
    for prompt in draw_prompts(sizes.kto_train, rng):
        response = _demonstration(prompt, rng)
        samples.append((prompt, response, gold_reward(prompt.text, response)))
    medians = {}
    for kind in KIND_WEIGHTS:
        golds = sorted(g for p, _, g in samples if p.kind == kind)
        medians[kind] = golds[len(golds) // 2] if golds else 0.0
    records = [{"prompt": p.text, "completion": y, "label": rng.random() < sigmoid(g - medians[p.kind])}
               for p, y, g in samples]
    _write_jsonl(corpus.kto_train, records)

    # 5. prompt-only files
    _write_jsonl(corpus.prompts, [_prompt_record(p) for p in draw_prompts(sizes.prompts, streams["prompts"])])
    _write_jsonl(corpus.eval_prompts,
                 [_prompt_record(p) for p in draw_prompts(sizes.eval_prompts, streams["eval_prompts"])])
    _write_jsonl(corpus.math_prompts,
                 [{"prompt": p.text, "answer": p.answer} for p in all_prompts() if p.kind == "math"])
    return corpus
