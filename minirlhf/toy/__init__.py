"""The embedded toy world: a synthetic assistant language with a known gold reward.

    from minirlhf.toy import load_world
    world = load_world()                       # cached under ~/.cache/minirlhf (or $MINIRLHF_CACHE)
    world.gold_reward("what is 3 plus 4 ?", "the answer is 7 .")   # 3.0

Files: ``language`` (words, prompts, gold reward), ``responses`` (writers of mixed quality),
``corpus`` (datasets, Bradley-Terry labels, Bayes accuracy, the planted length bias),
``tokenizer`` (byte-level BPE + Qwen chat template), ``model`` (tiny Qwen2), ``measure``
(the gold reward of responses and of a policy), ``world`` (``load_world``: build, cache),
``bandit`` (the exact bandit). The toy world's SFT policy is trained by the train layer:
``minirlhf.train.toy_world.load_toy_world()`` (or ``python -m minirlhf toy-world``).
"""
from minirlhf.toy.bandit import BanditWorld, make_bandit
from minirlhf.toy.corpus import CorpusSizes, bayes_accuracy, build_corpus
from minirlhf.toy.language import (
    all_prompts,
    best_response,
    gold_reward,
    harmless_score,
    helpful_score,
    math_correct,
    max_gold_reward,
    parse_prompt,
)
from minirlhf.toy.tokenizer import build_toy_tokenizer
from minirlhf.toy.world import ToyWorld, load_world

__all__ = [
    "BanditWorld", "CorpusSizes", "ToyWorld", "all_prompts", "bayes_accuracy", "best_response",
    "build_corpus", "build_toy_tokenizer", "gold_reward", "harmless_score", "helpful_score",
    "load_world", "make_bandit", "math_correct", "max_gold_reward", "parse_prompt",
]
