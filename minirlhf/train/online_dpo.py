"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"):
DPO on pairs the *current* policy samples and a judge labels.

Offline DPO learns from a fixed dataset whose responses came from some other policy; as π_θ moves
away from it, the data stops describing what π_θ actually does. Online DPO keeps the data
on-policy. Each iteration of the loop in ``train_online_dpo``:

1. **Checkpoint** every ``--save-every`` iterations and at the end; **stop** after the last.
2. **Sample.** ``--samples-per-prompt`` K responses per prompt from the current policy (rows
   Kg … Kg+K−1), and their log-probs under π_ref (no gradient; π_θ's come with gradient in the
   update).
3. **Label a pair.** A judge scores them — a reward model, or in the toy world the gold reward
   (``--reward gold``: the truth, a noise-free annotator). The highest-scored sample is ``y_w``
   and the lowest ``y_l`` (K = 2: the one pair; K > 2: best-of-K against worst-of-K, as in
   Dong et al. 2024, "RLHF Workflow": a pair whose judged difference is wider than a noisy
   judge's small errors). A prompt whose samples all score the same carries no preference and
   is dropped.
4. **DPO update** on the labelled pairs: ``L = −log σ(β·[(log π_θ(y_w) − log π_ref(y_w)) −
   (log π_θ(y_l) − log π_ref(y_l))])`` (or another pairwise ``--loss``; see ``dpo_loss``).
   With ``--soft-labels`` each pair is labelled y_w ≻ y_l with the judge's own Bradley–Terry
   probability p = σ(r_w − r_l) rather than 1: ``L = −p log σ(βh) − (1 − p) log σ(−βh)``
   (cdpo with ε = 1 − p), minimised at βh = r_w − r_l, the optimum π ∝ π_ref·exp(r/β) that PPO
   with the same β aims at. A hard label asks βh → ∞ for any judged difference, however small;
   a soft one weighs each pair by how sure the judge is.
5. **Log** the judge's scores, the labelled fraction, KL, lengths, and the implicit-reward
   accuracy (ties ½).

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
from minirlhf.core.reward_losses import pair_accuracy
from minirlhf.data.prompts import PromptSet
from minirlhf.errors import MinirlhfError
from minirlhf.models.forward import rollout_logprobs
from minirlhf.models.policy import load_tokenizer
from minirlhf.models.sampling import generate_rollouts
from minirlhf.toy.measure import gold_summary, is_toy_prompt
from minirlhf.train.args import PolicyTrainArgs, parse_args
from minirlhf.train.batches import micro_batches, select_rows
from minirlhf.train.checkpoints import (
    checkpoint_due, final_path, last_step, load_training_state, prepare_run, save_checkpoint,
)
from minirlhf.train.distributed import all_reduce_sum, data_parallel_weights, gathered, pad_micro_batches, rank_share
from minirlhf.train.metrics import TrainingLog, response_metrics
from minirlhf.train.optim import DivergenceGuard, backward_weighted, make_optimizer, make_scheduler, optimizer_step
from minirlhf.train.parallel import data_parallel, gradient_sync
from minirlhf.train.rewards import load_reward
from minirlhf.train.levers import load_trained_policy, policy_logprobs, reference_policy
from minirlhf.train.precision import Precision
from minirlhf.train.runtime import select_device
from minirlhf.train.toy_world import load_toy_world


@dataclasses.dataclass
class OnlineDPOArgs(PolicyTrainArgs):
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
    soft_labels: bool = False
    """Label each pair with the judge's Bradley–Terry probability σ(r_w − r_l) instead of 1 (--loss
    sigmoid only; module docstring)."""
    steps: int = 40
    """Iterations (sample pairs + one DPO step)."""
    batch_size: int = 16
    """Prompts per iteration (each gives one pair)."""
    samples_per_prompt: int = 2
    """K responses sampled per prompt; the pair is the judge's best and worst of them."""
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


def sampled_pair_loss(policy, batch, args):
    """DPO loss of one micro-batch of sampled, judge-labelled pairs; returns ``(loss, metrics)``.

    ``batch``: the pairs' ``input_ids``/``attention_mask``/``response_mask`` ``[2b, L]`` (rows
    ``0..b-1`` chosen, ``b..2b-1`` rejected: one forward for both halves), and ``ref_logps`` and
    ``judge_scores`` ``[2b]``, the reference's summed log-probs and the judge's scores in the same
    order (the scores set each pair's soft label with ``--soft-labels``).
    """
    logprobs, mask = policy_logprobs(args)(policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    sequence = sequence_logprobs(logprobs, mask, average=args.loss == "ipo")
    chosen, rejected = sequence.chunk(2)
    ref_chosen, ref_rejected = batch["ref_logps"].chunk(2)
    loss_type, flip_rates = args.loss, args.label_smoothing
    if args.soft_labels:  # P(y_l ≻ y_w) under the judge's Bradley–Terry model, one per pair
        judged_chosen, judged_rejected = batch["judge_scores"].chunk(2)
        loss_type, flip_rates = "cdpo", torch.sigmoid(judged_rejected - judged_chosen).to(chosen.dtype)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=args.beta,
                                                        loss_type=loss_type, label_smoothing=flip_rates)
    return losses.mean(), {
        "accuracy": pair_accuracy(chosen_rewards, rejected_rewards),
        "margin": (chosen_rewards - rejected_rewards).mean(),
        "chosen_reward": chosen_rewards.mean(),
        "rejected_reward": rejected_rewards.mean(),
    }


def train_online_dpo(args: OnlineDPOArgs):
    """Run online DPO with ``args``; returns the saved policy directory (``<out>/final``)."""
    # 1. Defaults (the toy world's SFT policy, prompts and gold judge), run directory, seed.
    world = load_toy_world() if args.model is None or args.data is None else None
    args.model = args.model or str(world.sft_model)
    if args.data is None:
        args.data, args.template = str(world.prompts), args.template or "prompt"
        args.reward = args.reward or "gold"
    if args.reward is None:
        raise MinirlhfError("online-dpo needs --reward: a reward-model directory or a rule name (gold, math)")
    if args.soft_labels and (args.loss != "sigmoid" or args.label_smoothing):
        raise MinirlhfError(f"--soft-labels sets each pair's label from the judge: it needs --loss sigmoid and no "
                            f"--label-smoothing (got --loss {args.loss}, --label-smoothing {args.label_smoothing})")
    args.template = args.template or "prompt"  # online trainers read prompt-only data
    resume_from = prepare_run(args, "online-dpo")
    device = select_device(args.device)
    precision = Precision(args.precision, device)

    # 2. Tokenizer, policy (from the checkpoint when resuming; LoRA, checkpointing), frozen reference
    #    (with LoRA: the policy's adapters off), judge, prompts.
    tokenizer = load_tokenizer(args.model)
    policy = load_trained_policy(args, resume_from, device, precision.dtype)
    reference = reference_policy(args, policy, device, precision.dtype)
    reward_fn = load_reward(args.reward, device=device, dtype=precision.dtype)
    prompts = PromptSet(args.data, tokenizer, args.template, args.batch_size, args.seed, args.max_prompt_len,
                        args.system_prompt)
    log_gold = all(map(is_toy_prompt, prompts.texts))

    # 3. Data parallelism (DDP, or FSDP2 with --fsdp; `policy` itself in one process): each rank samples
    #    its share of the prompts. Optimizer and schedule (one step per iteration); resume state.
    dp_policy = data_parallel(policy, args.fsdp, reshard_after_forward=False)
    optimizer = make_optimizer(policy.parameters(), args.lr, args.weight_decay)
    scheduler = make_scheduler(optimizer, args.steps, args.warmup_ratio, args.lr_schedule)
    start = load_training_state(resume_from, optimizer, scheduler, precision.scaler)["step"] if resume_from else 0
    last = last_step(args, args.steps)

    def save(done):
        return save_checkpoint(args.out, done, policy, tokenizer, optimizer, scheduler, scaler=precision.scaler)

    # 4. The loop; `iteration` iterations are done at the top of each pass.
    policy.train()
    with TrainingLog(args, start, args.steps, last, desc="online-dpo") as log:
        for iteration in range(start, last + 1):
            # 4.1 Checkpoint; stop.
            if checkpoint_due(args, iteration, start, last):
                save(iteration)
            if iteration == last:
                break
            guard = DivergenceGuard(lambda: save(iteration))
            # 4.2 K samples per prompt; the judge's scores. Reference log-probs for the loss, the
            #     sampling policy's for the logged KL, both at temperature 1: DPO's implicit reward
            #     is defined by π_θ itself, not by the sampling distribution.
            with precision.autocast():
                rollout = generate_rollouts(policy, tokenizer, prompts.batch(iteration, device, rank_share),
                                            args.max_new_tokens, n_per_prompt=args.samples_per_prompt,
                                            temperature=args.temperature)
                scores = reward_fn(rollout)
                old_logprobs, mask = rollout_logprobs(policy, rollout, args.micro_batch_size)
                ref_logprobs, _ = rollout_logprobs(reference, rollout, args.micro_batch_size)
            # 4.3 The best-scored sample of a prompt is chosen, the worst rejected; ties carry no preference.
            grouped = scores.view(-1, args.samples_per_prompt)                # [prompts, K]
            best, worst = grouped.max(-1), grouped.min(-1)
            labelled = (best.values != worst.values).nonzero().flatten()
            chosen_rows = args.samples_per_prompt * labelled + best.indices[labelled]
            rejected_rows = args.samples_per_prompt * labelled + worst.indices[labelled]
            # 4.4 One DPO step over the labelled pairs of all ranks, micro-batched by pairs (a mean over
            #     pairs); none when no rank has one.
            metrics = {}
            num_labelled = all_reduce_sum(len(labelled))
            if num_labelled > 0:
                data = {k: rollout[k] for k in ("input_ids", "attention_mask", "response_mask")}
                data["ref_logps"] = sequence_logprobs(ref_logprobs, mask, average=args.loss == "ipo")
                data["judge_scores"] = scores
                pairs = list(range(len(labelled)))
                micro = [(labelled[part].tolist(), select_rows(data, torch.cat([chosen_rows[part], rejected_rows[part]])))
                         for part in micro_batches(pairs, args.micro_batch_size)]
                # Ranks hold different numbers of pairs: one with fewer micro-batches adds weight-0 ones
                # (pair 0, no example ids), as every rank must run as many forward/backward passes.
                micro = pad_micro_batches(micro, ([], select_rows(data, torch.tensor([0, 1]))))
                weights = data_parallel_weights([len(ids) for ids, _ in micro])
                for k, ((ids, batch), weight) in enumerate(zip(micro, weights)):
                    with gradient_sync(dp_policy, last=k == len(micro) - 1):  # ranks average gradients once
                        with precision.autocast():
                            loss, loss_metrics = sampled_pair_loss(dp_policy, batch, args)
                        backward_weighted(loss, loss_metrics, weight, metrics, guard=guard, step=iteration,
                                          example_ids=ids, scaler=precision.scaler)
                metrics.update(optimizer_step(policy, optimizer, scheduler, args.max_grad_norm, guard=guard,
                                              step=iteration, example_ids=labelled.tolist(), scaler=precision.scaler))
                margins = scores[chosen_rows] - scores[rejected_rows]
                metrics["judge_margin"] = float(all_reduce_sum(margins.sum()) / num_labelled)
            else:
                scheduler.step()  # keep the schedule aligned with the iteration count
            # 4.5 Log.
            metrics.update({
                "reward": float(scores.mean()),
                "labelled_fraction": len(labelled) / len(grouped),
                "kl": float(masked_sum(old_logprobs - ref_logprobs, mask) / len(scores)),
                **response_metrics(rollout),
            })
            if log_gold:
                metrics.update(gold_summary(gathered(rollout["prompts"]), gathered(rollout["responses"])))
            log.train(iteration + 1, metrics)
    return final_path(args, policy, tokenizer, last, args.steps)


def main(argv=None):
    args = parse_args(OnlineDPOArgs, argv, prog="python -m minirlhf online-dpo")
    print(f"saved {train_online_dpo(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
