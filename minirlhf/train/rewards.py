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

Every reward's output is checked before it reaches a loss (``check_rewards``): one finite number per
response, or a ``RewardError`` that names the reward and shows the offending prompts, responses and
values. A NaN reward is a bug in the reward, never a learning rate too high.
"""
import numbers
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


class RewardError(MinirlhfError):
    """A reward function returned something other than one finite number per response."""


def check_rewards(name, values, rollout):
    """``values`` (a list of numbers or a ``[B]`` tensor from reward ``name``) as a float32 ``[B]``
    tensor on the rollout's device; raises ``RewardError`` unless it holds one finite number per
    response, naming the reward, and each offending row's prompt, response and value (truncated)."""
    rows, device = len(rollout["input_ids"]), rollout["input_ids"].device
    if not torch.is_tensor(values):
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, numbers.Real) for v in values):
            raise RewardError(f"reward {name!r} must return a list of numbers, one per response; got "
                              f"{str(values)[:80]} ({type(values).__name__})")
        values = torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)
    if values.shape != (rows,):
        raise RewardError(f"reward {name!r} must return one number per response ({rows}), got shape {list(values.shape)}")
    values = values.float()
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        prompts, responses = rollout.get("prompts"), rollout.get("responses")
        shown = "; ".join(f"row {i}: prompt {_short(prompts, i)}, response {_short(responses, i)} -> {values[i].item()}"
                          for i in bad[:3])
        raise RewardError(
            f"reward {name!r} returned {len(bad)} value(s) that are not finite numbers (of {rows} responses): {shown}"
            f"{' ...' if len(bad) > 3 else ''}. A reward must be a finite number for every response: fix the "
            "reward function (or the reward model); a smaller --lr cannot help. Nothing was trained on these values.")
    return values


def _short(texts, i, width=60):
    if texts is None:
        return "(not given)"
    text = str(texts[i])
    return repr(text if len(text) <= width else text[:width] + "…")


class RuleReward:
    """A registered rule as a rollout reward: ``reward(rollout) -> Tensor [B]`` (float32, checked)."""

    def __init__(self, name):
        if name not in REWARD_FUNCTIONS:
            raise MinirlhfError(f"unknown reward {name!r}; known rules: {', '.join(sorted(REWARD_FUNCTIONS))}")
        self.name, self.fn = name, REWARD_FUNCTIONS[name]

    def __call__(self, rollout):
        values = self.fn(rollout["prompts"], rollout["responses"], rollout.get("answers"))
        return check_rewards(self.name, values, rollout)


class RewardModelReward:
    """A trained reward model as a rollout reward: its score at each sequence's last real token.

    The reward model reads the rollout's token ids directly, so it must share the policy's
    tokenizer (true for every RM trained from the same base model, as in the pipeline); a
    vocabulary smaller than the ids it is given is reported as an error. It is frozen and in eval
    mode; scores come back as float32 ``[B]``, checked to be finite (``check_rewards``), and weights
    that are not finite are refused when it is loaded.
    """

    def __init__(self, model_or_path, device=None, dtype=None):
        if isinstance(model_or_path, RewardModel):
            self.model, self.name = model_or_path, "reward model"
        else:
            self.model, self.name = load_reward_model(str(model_or_path), dtype=dtype), str(model_or_path)
        if device is not None:
            self.model.to(device)
        self.model.eval().requires_grad_(False)
        for parameter_name, parameter in self.model.named_parameters():
            if not torch.isfinite(parameter).all():
                raise RewardError(f"reward model {self.name}: its weights are not finite (NaN/inf in {parameter_name}); "
                                  "it cannot score anything: retrain it, or resume its training from an earlier checkpoint")

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
        return check_rewards(self.name, end_scores.float(), rollout)


def load_reward(spec, device=None, dtype=None):
    """``--reward`` value -> reward callable: a registered rule name, else a reward-model path."""
    if spec in REWARD_FUNCTIONS:
        return RuleReward(spec)
    return RewardModelReward(spec, device=device, dtype=dtype)
