"""Checks of the ``grpo_step`` exercise: ``grpo_step`` (homework/steps.py), on a tiny float64 Qwen2
model whose reward is the share of "small" tokens (ids 2-8) in a response, against the reference
step: the same seeded sampler gives the same groups, so everything after it must agree."""
import torch

from minirlhf.homework.check import Check
from minirlhf.homework.checks.tiny_model import (PAD, TinyTokenizer, frozen, parameter_gradients, sgd, tiny_model,
                                                 tiny_weights, weights_of)

GROUP_SIZE, MAX_NEW_TOKENS, LR = 4, 6, 2.0
REWARDED = torch.arange(2, 9)  # the tokens the reward counts
PROMPTS = [[2, 3, 4], [7, 8]]


def share_of_small_tokens(rollout):
    """The reward: the fraction of a response's tokens (EOS included) with an id in 2-8."""
    mask = rollout["response_mask"].bool()
    hits = torch.isin(rollout["input_ids"], REWARDED) & mask
    return hits.sum(-1).double() / mask.sum(-1).clamp(min=1)


def inputs():
    width = max(len(p) for p in PROMPTS)
    return {"weights": tiny_weights(seed=2, scale=5.0), "seed": 0,
            "prompt_ids": torch.tensor([[PAD] * (width - len(p)) + p for p in PROMPTS]),
            "prompt_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])}


def step(f, x, policy, reference, generator, seen):
    def reward_fn(rollout):
        seen.append({k: rollout[k].clone() for k in ("input_ids", "response_mask")})
        return share_of_small_tokens(rollout)

    prompt_batch = {"input_ids": x["prompt_ids"], "attention_mask": x["prompt_mask"]}
    return f.grpo_step(policy, reference, TinyTokenizer(), prompt_batch, reward_fn, GROUP_SIZE, MAX_NEW_TOKENS,
                       beta=0.04, clip_eps=0.2, generator=generator)


def one_step(f, x):
    policy = tiny_model(x["weights"])
    seen = []
    loss, metrics = step(f, x, policy, frozen(policy), torch.Generator().manual_seed(x["seed"]), seen)
    sampled = seen[0] if len(seen) == 1 else {"input_ids": None, "response_mask": None}
    return {"reward_fn called once": len(seen) == 1, "sampled input_ids": sampled["input_ids"],
            "sampled response_mask": sampled["response_mask"], "loss": loss,
            **{f"metrics[{k!r}]": v for k, v in metrics.items()}, "parameter gradients": parameter_gradients(policy)}


def four_steps(f, x):
    """Four SGD steps (lr 2): each samples a fresh group from the updated policy."""
    policy = tiny_model(x["weights"])
    reference, generator = frozen(policy), torch.Generator().manual_seed(x["seed"])
    rewards = []
    for _ in range(4):
        _, metrics = step(f, x, policy, reference, generator, [])
        rewards.append(metrics["rewards"].mean())
        sgd(policy, LR)
    return {"mean reward per step": torch.stack(rewards).double(), "weights after the four steps": weights_of(policy),
            "probability of a small token after the prompts": probability_of_small(policy, x)}


def probability_of_small(model, x):
    """π(2-8 | prompt) at the first response position, per prompt: what the reward pushes up."""
    from minirlhf.models.forward import position_ids_from_attention_mask

    with torch.no_grad():
        logits = model(input_ids=x["prompt_ids"], attention_mask=x["prompt_mask"],
                       position_ids=position_ids_from_attention_mask(x["prompt_mask"])).logits[:, -1]
    return torch.softmax(logits, -1)[:, REWARDED].sum(-1)


def keys(*names):
    return lambda x, got, names=names: {k: v for k, v in _reference(one_step, x).items() if k in names}


_CACHE = {}


def _reference(run, x):
    """The reference step's outputs on ``x`` (computed once per run function)."""
    from minirlhf.homework import steps

    if run not in _CACHE:
        _CACHE[run] = run(steps, x)
    return _CACHE[run]


def rises(x, got):
    reference = _reference(four_steps, x)
    start = probability_of_small(tiny_model(x["weights"]), x)
    assert (reference["probability of a small token after the prompts"] > start).all(), "the reference step does not learn"
    return reference


CHECKS = [
    Check("one step, 2 prompts × G = 4: the sampled group (generate_rollouts once, with the given generator) and its rewards",
          inputs, one_step, keys("reward_fn called once", "sampled input_ids", "sampled response_mask", "metrics['rewards']",
                                 "metrics['response_length']"),
          hint="sample exactly once: generate_rollouts(policy, tokenizer, prompt_batch, max_new_tokens, "
               "n_per_prompt=group_size, temperature=temperature, generator=generator)"),
    Check("one step: the group-relative advantages", inputs, one_step, keys("metrics['advantages']")),
    Check("one step: the loss, the clip fraction (0: on-policy, ρ = 1) and the mean k3", inputs, one_step,
          keys("loss", "metrics['clip_fraction']", "metrics['kl']"),
          hint="π_old is the policy that sampled: its log-probs are the current ones, detached"),
    Check("one step: the gradient of every parameter after backward", inputs, one_step, keys("parameter gradients")),
    Check("four SGD steps (lr 2): the rewarded tokens get likelier, along the reference's path", inputs, four_steps, rises),
]
