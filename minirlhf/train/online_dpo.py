"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"):
DPO on pairs the *current* policy samples and a judge labels.

Offline DPO learns from a fixed dataset whose responses came from some other policy; as π_θ moves
away from it, the data stops describing what π_θ actually does. Online DPO keeps the data
on-policy. Each iteration:

1. **Sample a pair.** Two responses per prompt from the current policy (rows 2g, 2g+1).
2. **Label it.** A judge scores both — a reward model, or in the toy world the gold reward
   (``--reward gold``: the truth, a noise-free annotator) — and the higher score is ``y_w``.
   Ties carry no preference and are dropped from the loss.
3. **Log-probs** of both responses under π_ref (no gradient) and π_θ (one forward for the pair).
4. **DPO update** on the labelled pairs: ``L = −log σ(β·[(log π_θ(y_w) − log π_ref(y_w)) −
   (log π_θ(y_l) − log π_ref(y_l))])`` (or another pairwise ``--loss``; see ``dpo_loss``).

    python -m minirlhf online-dpo                     # toy world, judged by the gold reward
    python -m minirlhf online-dpo --reward runs/rm/final          # judged by a reward model

From Python: ``train_online_dpo(OnlineDPOArgs(...))`` returns the saved policy directory.
"""
import dataclasses
import sys
import typing

import torch

from minirlhf.core.dpo_losses import dpo_loss
from minirlhf.core.logprobs import sequence_logprobs
from minirlhf.core.masked import masked_sum
from minirlhf.errors import MinirlhfError
from minirlhf.models.forward import response_logprobs
from minirlhf.train import common
from minirlhf.train.rollout import (
    final_path, generate_rollouts, gold_metrics, response_metrics, run_iterations, select_rows, start_online_run,
)


@dataclasses.dataclass
class OnlineDPOArgs(common.TrainArgs):
    """Online DPO: the policy samples pairs, a reward model (or the toy gold reward) labels them."""

    reward: typing.Optional[str] = None
    """The judge: a reward-model directory or a rule name (gold, math). Default: gold on the toy
    world's prompts; required with --data."""
    loss: typing.Literal["sigmoid", "cdpo", "robust", "ipo", "hinge"] = "sigmoid"
    """Pairwise loss of the DPO family (see minirlhf/core/dpo_losses.py)."""
    beta: float = 0.1
    """β: strength of the implicit KL regulariser."""
    label_smoothing: float = 0.0
    """ε, the assumed label-flip rate (cdpo and robust only)."""
    steps: int = 40
    """Iterations (sample pairs + one DPO step)."""
    batch_size: int = 16
    """Prompts per iteration (each gets a pair of responses)."""
    micro_batch_size: int = 0
    """Pairs per forward/backward pass (0 = all at once); gradients are accumulated."""
    lr: float = 5e-5
    """AdamW learning rate (toy world; ~5e-7 for a 0.5B model)."""
    warmup_ratio: float = 0.0
    """Fraction of steps spent warming the learning rate up."""
    lr_schedule: typing.Literal["cosine", "linear", "constant"] = "constant"
    """Learning-rate schedule."""
    max_new_tokens: int = 32
    """Generation budget per response (tokens)."""
    temperature: float = 1.0
    """Sampling temperature of the pairs."""
    system_prompt: typing.Optional[str] = None
    """System prompt put in front of every prompt (default: the template's)."""


def pair_loss(policy, batch, args):
    """DPO loss of one micro-batch of labelled pairs; returns ``(loss, metrics)``.

    ``batch``: the pairs' ``input_ids``/``attention_mask``/``response_mask`` ``[2b, L]`` (rows
    ``0..b-1`` chosen, ``b..2b-1`` rejected: one forward for both halves) and ``ref_logps``
    ``[2b]``, the reference's summed log-probs in the same order.
    """
    logprobs, mask = response_logprobs(policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    sequence = sequence_logprobs(logprobs, mask, average=args.loss == "ipo")
    chosen, rejected = sequence.chunk(2)
    ref_chosen, ref_rejected = batch["ref_logps"].chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=args.beta,
                                                        loss_type=args.loss, label_smoothing=args.label_smoothing)
    return losses.mean(), {
        "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "margin": (chosen_rewards - rejected_rewards).mean(),
        "chosen_reward": chosen_rewards.mean(),
        "rejected_reward": rejected_rewards.mean(),
    }


def train_online_dpo(args: OnlineDPOArgs):
    """Run online DPO with ``args``; returns the saved policy directory (``<out>/final``)."""
    # 1. Defaults (the toy world's SFT policy, prompts and gold judge).
    world = common.toy_world() if args.model is None or args.data is None else None
    args.model = args.model or str(world.sft_model)
    if args.data is None:
        args.data, args.template = str(world.prompts), args.template or "prompt"
        args.reward = args.reward or "gold"
    if args.reward is None:
        raise MinirlhfError("online-dpo needs --reward: a reward-model directory or a rule name (gold, math)")

    # 2. Run directory and seed; tokenizer, policy (from the checkpoint when resuming), frozen
    #    reference, judge (the reward), prompts; optimizer (one step per iteration).
    run = start_online_run(args, "online-dpo")
    policy, tokenizer, device = run.policy, run.tokenizer, run.device
    run.make_optimizer(policy)

    def one_iteration(iteration):
        guard = common.DivergenceGuard(lambda: run.save_checkpoint(iteration))
        # 1. Two samples per prompt; 2. the judge's scores pick chosen and rejected.
        with common.autocast(device):
            rollout = generate_rollouts(policy, tokenizer, run.prompts.batch(iteration, device), args.max_new_tokens,
                                        n_per_prompt=2, temperature=args.temperature)
            scores = run.reward_fn(rollout)
            # 3. Reference log-probs for the loss (the policy's come with gradient in it); the
            #    sampling policy's only for the logged KL. Both at temperature 1: DPO's implicit
            #    reward is defined by π_θ itself, not by the sampling distribution.
            old_logprobs, ref_logprobs, mask = run.policy_and_reference_logprobs(rollout)
        first, second = scores.view(-1, 2).unbind(-1)
        labelled = (first != second).nonzero().flatten()  # ties carry no preference
        first_wins = (first > second)[labelled]
        chosen_rows = 2 * labelled + (~first_wins).long()
        rejected_rows = 2 * labelled + first_wins.long()

        # 4. One DPO step over the labelled pairs, micro-batched by pairs (a mean over pairs).
        metrics = {}
        if len(labelled) > 0:
            ref_logps = sequence_logprobs(ref_logprobs, mask, average=args.loss == "ipo")
            data = {k: rollout[k] for k in ("input_ids", "attention_mask", "response_mask")}
            data["ref_logps"] = ref_logps
            pairs = list(range(len(labelled)))
            micro = []
            for part in common.micro_batches(pairs, args.micro_batch_size):
                rows = torch.cat([chosen_rows[part], rejected_rows[part]])
                micro.append((labelled[part].tolist(), select_rows(data, rows)))
            weights = [len(ids) / len(pairs) for ids, _ in micro]
            metrics = common.accumulate_gradients(micro, lambda b: pair_loss(policy, b, args), weights,
                                                  device=device, guard=guard, step=iteration)
            metrics.update(common.optimizer_step(policy, run.optimizer, run.scheduler, args.max_grad_norm,
                                                 guard=guard, step=iteration, example_ids=labelled.tolist()))
            metrics["judge_margin"] = float((scores[chosen_rows] - scores[rejected_rows]).mean())
        else:
            run.scheduler.step()  # keep the schedule aligned with the iteration count
        metrics.update({
            "reward": float(scores.mean()),
            "labelled_fraction": len(labelled) / len(first),
            "kl": float(masked_sum(old_logprobs - ref_logprobs, mask) / len(scores)),
            **response_metrics(rollout),
        })
        if run.prompts.is_toy:
            metrics.update(gold_metrics(rollout))
        return metrics

    policy.train()
    done = run_iterations(args, total=args.steps, start=run.start, one_iteration=one_iteration,
                          save_checkpoint=run.save_checkpoint, desc="online-dpo")
    return final_path(args, args.steps, done, policy, tokenizer)


def main(argv=None):
    args = common.parse_args(OnlineDPOArgs, argv, prog="python -m minirlhf online-dpo")
    print(f"saved {train_online_dpo(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
