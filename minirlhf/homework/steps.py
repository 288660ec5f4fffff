"""Integration exercises: one DPO training step and one GRPO step, wired from minirlhf's pieces.

Every other exercise is one formula. These two are what a trainer does with the formulas in one
step, written as standalone functions (the trainers in ``minirlhf/train/`` do the same inside
their loops, with micro-batches, autocast and logging around it):

- ``pair_reference_logps`` + ``dpo_step``: batch preference pairs, one forward over chosen and
  rejected together, the reference log-probs computed once and cached, the DPO loss, backward.
- ``grpo_step``: sample a group of responses per prompt, score them, group-relative advantages,
  the clipped surrogate with the k3 KL term, backward.

Both leave ``optimizer.step()`` to the caller. They are graded on a tiny Qwen2 model: the same
loss, metrics and parameter gradients as these reference versions on a fixed batch, and a loss
(DPO) or a reward (GRPO) that improves over a few steps.
"""
import torch

from minirlhf.core.dpo_losses import dpo_loss
from minirlhf.core.grpo import group_advantages, grpo_loss
from minirlhf.core.logprobs import sequence_logprobs
from minirlhf.data.collate import collate_preference
from minirlhf.models.forward import response_logprobs
from minirlhf.models.sampling import generate_rollouts


def pair_reference_logps(reference, examples, pad_id):
    """Summed reference log-probs ``log π_ref(y|x)`` of each pair's chosen and rejected response.

    Computed once before training (π_ref never changes), without gradient, with the same batch
    layout the step uses: ``collate_preference(examples, pad_id)`` gives one ``[2B, L]`` batch,
    chosen rows ``0..B-1`` then rejected rows ``B..2B-1``; ``response_logprobs`` gives ``[2B, T]``
    token log-probs and their mask; ``sequence_logprobs`` sums them per row.

    ``examples``: dicts with ``chosen_input_ids``, ``chosen_response_mask``,
    ``rejected_input_ids``, ``rejected_response_mask`` (lists of ints, as ``load_preference_data``
    makes them). Returns ``(ref_chosen_logps [B], ref_rejected_logps [B])``, no gradient.

    Hint: ``torch.no_grad()``, one forward over the ``[2B, L]`` batch, then ``.chunk(2)``.
    """
    # BEGIN SOLUTION
    batch = collate_preference(examples, pad_id)
    with torch.no_grad():
        token_logps, mask = response_logprobs(reference, batch["input_ids"], batch["attention_mask"],
                                              batch["response_mask"])
        chosen, rejected = sequence_logprobs(token_logps, mask).chunk(2)
    return chosen, rejected
    # END SOLUTION


def dpo_step(policy, examples, ref_chosen_logps, ref_rejected_logps, pad_id, beta=0.1):
    """One DPO step's forward and backward on a batch of preference pairs (sigmoid loss).

    1. **Batch**: ``collate_preference(examples, pad_id)`` -> one ``[2B, L]`` batch (chosen rows
       first, then rejected).
    2. **One forward** over both halves: ``response_logprobs(policy, ...)`` -> ``[2B, T]``;
       ``sequence_logprobs`` -> summed ``log π(y|x)`` ``[2B]``; split with ``.chunk(2)``.
    3. **Loss** with the cached reference log-probs (``pair_reference_logps``):
       ``dpo_loss(chosen, rejected, ref_chosen_logps, ref_rejected_logps, beta)``, mean over pairs.
    4. ``loss.backward()``; the caller steps the optimizer.

    Returns ``(loss, metrics)``: the scalar loss (detached) and a dict of detached 0-d tensors:
    ``accuracy`` (fraction of pairs whose chosen implicit reward is higher, ties ½),
    ``chosen_reward``, ``rejected_reward``, ``margin`` (means of the implicit rewards and of their
    difference), ``logps_chosen``, ``logps_rejected`` (mean summed log-probs).

    Hint: the implicit rewards ``dpo_loss`` returns are already detached.
    """
    # BEGIN SOLUTION
    batch = collate_preference(examples, pad_id)
    token_logps, mask = response_logprobs(policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    chosen_logps, rejected_logps = sequence_logprobs(token_logps, mask).chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                                                        ref_rejected_logps, beta)
    loss = losses.mean()
    loss.backward()
    difference = chosen_rewards - rejected_rewards
    metrics = {
        "accuracy": ((difference > 0).to(difference.dtype) + 0.5 * (difference == 0).to(difference.dtype)).mean(),
        "chosen_reward": chosen_rewards.mean(),
        "rejected_reward": rejected_rewards.mean(),
        "margin": difference.mean(),
        "logps_chosen": chosen_logps.detach().mean(),
        "logps_rejected": rejected_logps.detach().mean(),
    }
    return loss.detach(), metrics
    # END SOLUTION


def grpo_step(policy, reference, tokenizer, prompt_batch, reward_fn, group_size, max_new_tokens,
              beta=0.04, clip_eps=0.2, temperature=1.0, generator=None):
    """One on-policy GRPO step: sample, score, group advantages, clipped loss + β·k3, backward.

    1. **Sample** ``group_size`` responses per prompt, once:
       ``rollout = generate_rollouts(policy, tokenizer, prompt_batch, max_new_tokens,
       n_per_prompt=group_size, temperature=temperature, generator=generator)`` (rows
       ``g·G … g·G+G−1`` answer prompt ``g``).
    2. **Score**: ``rewards = reward_fn(rollout)``, ``[B]``.
    3. **Group advantages**: ``group_advantages(rewards, group_size)`` (GRPO's std scaling).
    4. **Log-probs** of the sampled tokens (``response_logprobs``, at ``temperature``): under the
       policy with gradient; under π_old = the policy that sampled (with one update per rollout,
       the same numbers, detached); under ``reference`` without gradient.
    5. **Loss**: ``grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps,
       beta)`` (sequence mean), then ``loss.backward()``; the caller steps the optimizer.

    Returns ``(loss, metrics)``: the scalar loss (detached) and a dict of detached tensors:
    ``rewards`` ``[B]``, ``advantages`` ``[B]``, ``clip_fraction``, ``kl`` (mean k3 over response
    tokens) and ``response_length`` (mean number of response tokens).

    Hint: ``logprobs.detach()`` is π_old's log-probs here, so the ratio starts at exactly 1.
    """
    # BEGIN SOLUTION
    rollout = generate_rollouts(policy, tokenizer, prompt_batch, max_new_tokens, n_per_prompt=group_size,
                                temperature=temperature, generator=generator)
    rewards = reward_fn(rollout)
    advantages = group_advantages(rewards, group_size)
    batch = (rollout["input_ids"], rollout["attention_mask"], rollout["response_mask"])
    logprobs, mask = response_logprobs(policy, *batch, temperature=temperature)
    with torch.no_grad():
        ref_logprobs, _ = response_logprobs(reference, *batch, temperature=temperature)
    loss, clip_fraction, kl = grpo_loss(logprobs, logprobs.detach(), ref_logprobs, advantages, mask,
                                        clip_eps=clip_eps, beta=beta)
    loss.backward()
    metrics = {
        "rewards": rewards.detach(),
        "advantages": advantages.detach(),
        "clip_fraction": clip_fraction,
        "kl": kl,
        "response_length": rollout["response_length"].float().mean(),
    }
    return loss.detach(), metrics
    # END SOLUTION
