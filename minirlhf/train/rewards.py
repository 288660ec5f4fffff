"""Reward functions for the online trainers: rule-based rewards by name, or a learned reward model.

Every reward is a callable ``reward(rollout) -> Tensor [B]`` over a rollout batch (see
``minirlhf.models.sampling``), which carries both what a rule needs (``prompts``, ``responses``, and
``answers`` when the prompt file has them) and what a reward model needs (``input_ids``,
``attention_mask``). ``load_reward(spec)`` turns a command-line ``--reward`` value into one:

- a registered name (``math``, ``gold``, ...): a rule-based reward, computed from the texts;
- anything else: the path (or hub name) of a reward model saved by ``python -m minirlhf rm``.

Adding a rule takes a few lines::

    @register_reward("short")
    def short_reward(prompts, responses, answers):
        return [-len(r.split()) / 10 for r in responses]
"""
import re

import torch

from minirlhf.errors import MinirlhfError
from minirlhf.models.reward_model import RewardModel, load_reward_model
from minirlhf.toy.language import gold_reward, math_correct

#: name -> fn(prompts, responses, answers) -> list of floats, one per response
REWARD_FUNCTIONS = {}


def register_reward(name):
    """Decorator: make a rule-based reward available as ``--reward NAME``."""

    def register(fn):
        REWARD_FUNCTIONS[name] = fn
        return fn

    return register


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text):
    """The last number written in ``text`` as a float, or None (``"the answer is 7 ."`` -> 7.0)."""
    numbers = _NUMBER.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


@register_reward("math")
def math_reward(prompts, responses, answers):
    """1 if the response's last number equals the answer, else 0 (a verifiable, rule-based reward).

    The answer comes from the prompt file's ``answer`` field; without one (``answers`` is None or
    the entry is None) the prompt must be a toy-world arithmetic prompt, whose answer the toy
    world knows (``minirlhf.toy.language.math_correct``).
    """
    rewards = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        answer = None if answers is None else answers[i]
        if answer is None:
            rewards.append(float(math_correct(prompt, response)))
        else:
            predicted = last_number(response)
            rewards.append(float(predicted is not None and abs(predicted - float(answer)) < 1e-6))
    return rewards


@register_reward("gold")
def toy_gold_reward(prompts, responses, answers):
    """The toy world's gold reward r*(x, y) (helpful + harmless); toy prompts only."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses)]


class RuleReward:
    """A registered rule as a rollout reward: ``reward(rollout) -> Tensor [B]`` (float32)."""

    def __init__(self, name):
        if name not in REWARD_FUNCTIONS:
            raise MinirlhfError(f"unknown reward {name!r}; known rules: {', '.join(sorted(REWARD_FUNCTIONS))}")
        self.name, self.fn = name, REWARD_FUNCTIONS[name]

    def __call__(self, rollout):
        values = self.fn(rollout["prompts"], rollout["responses"], rollout.get("answers"))
        return torch.tensor(values, dtype=torch.float32, device=rollout["input_ids"].device)


class RewardModelReward:
    """A trained reward model as a rollout reward: its score at each sequence's last real token.

    The reward model reads the rollout's token ids directly, so it must share the policy's
    tokenizer (true for every RM trained from the same base model, as in the pipeline); a
    vocabulary smaller than the ids it is given is reported as an error. It is frozen and in eval
    mode; scores come back as float32 ``[B]``.
    """

    def __init__(self, model_or_path, device=None, dtype=None):
        if isinstance(model_or_path, RewardModel):
            self.model, self.name = model_or_path, "reward model"
        else:
            self.model, self.name = load_reward_model(str(model_or_path), dtype=dtype), str(model_or_path)
        if device is not None:
            self.model.to(device)
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, rollout):
        input_ids = rollout["input_ids"]
        vocab_size = self.model.config.vocab_size
        if int(input_ids.max()) >= vocab_size:
            raise MinirlhfError(
                f"reward model {self.name}: token id {int(input_ids.max())} is outside its vocabulary "
                f"({vocab_size}); the reward model must use the policy's tokenizer"
            )
        _, end_scores = self.model(input_ids=input_ids, attention_mask=rollout["attention_mask"])
        return end_scores.float()


def load_reward(spec, device=None, dtype=None):
    """``--reward`` value -> reward callable: a registered rule name, else a reward-model path."""
    if spec in REWARD_FUNCTIONS:
        return RuleReward(spec)
    return RewardModelReward(spec, device=device, dtype=dtype)
