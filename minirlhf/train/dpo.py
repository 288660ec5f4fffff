"""Direct preference optimisation and its pairwise family: DPO, cDPO, robust DPO, IPO, hinge (SLiC),
SimPO and ORPO — one loop, the loss chosen with ``--loss`` (``--loss kto`` runs ``kto.py``).

    DPO:  L = −log σ( β[log π_θ(y_w|x) − log π_ref(y_w|x)] − β[log π_θ(y_l|x) − log π_ref(y_l|x)] )

The formulas live in ``minirlhf/core/dpo_losses.py``; ``pairwise_preference_loss`` below feeds
them, and ``preference.py`` holds what DPO shares with KTO: π_ref's log-probs computed once before
training and cached, one forward per ``[2B, L]`` chosen+rejected batch, the implicit-reward metrics.

- **Summed vs averaged log-probs.** DPO/cDPO/robust/hinge use summed log π(y|x); IPO, SimPO and
  ORPO use the length average (1/|y|) log π(y|x), as their papers define them.
- **ORPO** adds the SFT term: loss = NLL(y_w) + λ·L_OR, the NLL being the chosen response's mean
  token negative log-likelihood. SimPO and ORPO are reference-free.

The loop is SFT's (``sft.py``): evaluate and checkpoint, stop, forward/backward, log. Logged per
step: loss, accuracy (implicit reward of y_w above y_l, ties ½), chosen/rejected rewards, their
margin, and both summed log-probs ``logps_chosen``/``logps_rejected`` — watch both fall while the
margin grows: DPO only needs the *difference* to increase.

    python -m minirlhf dpo                                       # toy world, sigmoid DPO
    python -m minirlhf dpo --loss simpo --beta 2.0 --simpo-gamma 0.5
    python -m minirlhf dpo --loss kto                            # toy world's unpaired KTO file
"""
import dataclasses
import sys
import typing

import torch

from minirlhf.core.dpo_losses import dpo_loss, dpop_penalty, orpo_loss, rdpo_length_margin, simpo_loss
from minirlhf.data.datasets import load_preference_data
from minirlhf.data.order import BatchSchedule, hold_out
from minirlhf.errors import MinirlhfError
from minirlhf.models.policy import load_tokenizer
from minirlhf.train.args import PolicyTrainArgs, apply_toy_preset, data_limits, parse_args
from minirlhf.train.batches import micro_batches
from minirlhf.train.checkpoints import (
    checkpoint_due, final_path, last_step, load_training_state, prepare_run, save_checkpoint,
)
from minirlhf.train.kto import train_kto
from minirlhf.train.distributed import data_parallel_weights, rank_share
from minirlhf.train.metrics import TrainingLog, eval_due
from minirlhf.train.optim import DivergenceGuard, backward_weighted, make_optimizer, make_scheduler, optimizer_step
from minirlhf.train.parallel import data_parallel, gradient_sync
from minirlhf.train.preference import (
    TOY_PRESET, cached_reference_logps, implicit_reward_metrics, pair_batch, pair_rows, sequence_logps,
)
from minirlhf.train.levers import load_trained_policy, policy_logprobs
from minirlhf.train.precision import Precision
from minirlhf.train.runtime import select_device
from minirlhf.train.toy_world import load_toy_world

LOSSES = ("sigmoid", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")


@dataclasses.dataclass
class DPOArgs(PolicyTrainArgs):
    """The DPO family: sigmoid (DPO), cdpo, robust, ipo, hinge, simpo, orpo, kto."""

    loss: typing.Literal["sigmoid", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo", "kto"] = "sigmoid"
    """Which loss (see minirlhf/core/dpo_losses.py)."""
    beta: float = 0.1
    """β: strength of the implicit KL regulariser (IPO: τ; SimPO: reward scale, ~2.0)."""
    label_smoothing: float = 0.0
    """ε, the assumed label-flip rate (cdpo and robust only)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin γ (in reward units)."""
    orpo_lambda: float = 0.1
    """ORPO's weight λ of the odds-ratio term next to the SFT NLL."""
    rdpo_alpha: float = 0.0
    """R-DPO: length penalty α·(|y_w| − |y_l|) subtracted from the DPO logit (0 = off)."""
    dpop_lambda: float = 0.0
    """DPO-Positive: λ·max(0, log π_ref(y_w) − log π(y_w)) inside the DPO logit (0 = off)."""
    kto_desirable_weight: float = 1.0
    """KTO's λ_D (weight of thumbs-up examples)."""
    kto_undesirable_weight: float = 1.0
    """KTO's λ_U (weight of thumbs-down examples)."""
    ref_model: typing.Optional[str] = None
    """Reference policy π_ref (default: --model, the starting policy)."""
    template: typing.Optional[str] = None
    """Dataset template of --data (default: align_anything; the toy KTO file uses 'kto')."""
    eval_data: typing.Optional[str] = None
    """Preference test split for the implicit-reward accuracy (default: the toy world's pref_test;
    with --data: --eval-fraction of it, pair losses only)."""
    eval_template: typing.Optional[str] = None
    """Dataset template of --eval-data (default: align_anything)."""
    eval_fraction: float = 0.05
    """Without --eval-data, hold out this fraction of a preference --data as the test split."""
    lr: float = 1e-6
    """Peak learning rate of AdamW (DPO wants a small one)."""
    system_prompt: typing.Optional[str] = None
    """System prompt put in front of every conversation."""


def pairwise_preference_loss(args, model, batch, loss_type=None):
    """The pairwise losses of the family on a ``[2B, L]`` chosen+rejected batch; ``(loss, metrics)``.

    ``batch`` also holds the cached ``ref_chosen_logps``/``ref_rejected_logps`` ``[B]`` (summed)
    unless the loss is reference-free. ``loss_type`` defaults to ``args.loss``.
    """
    loss_type = loss_type or args.loss
    # 1. One forward over chosen and rejected together; split the halves.
    logps, lengths = sequence_logps(model, batch, policy_logprobs(args))
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_len, rejected_len = lengths.clamp(min=1).chunk(2)
    chosen_avg, rejected_avg = chosen_logps / chosen_len, rejected_logps / rejected_len
    metrics = {}
    # 2. The loss: summed log-probs for DPO-style losses, length-averaged for IPO, SimPO and ORPO.
    if loss_type == "simpo":
        losses, chosen_rewards, rejected_rewards = simpo_loss(chosen_avg, rejected_avg, args.beta, args.simpo_gamma)
    elif loss_type == "orpo":
        odds_losses, log_odds_ratio = orpo_loss(chosen_avg, rejected_avg, args.orpo_lambda)
        nll = -chosen_avg  # the SFT term on the chosen response (mean token NLL per sequence)
        losses = nll + odds_losses
        chosen_rewards, rejected_rewards = args.beta * chosen_avg.detach(), args.beta * rejected_avg.detach()
        metrics.update(nll=nll.detach().mean(), log_odds_ratio=log_odds_ratio.mean())
    else:
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if loss_type == "ipo":
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen_avg, rejected_avg, ref_chosen / chosen_len, ref_rejected / rejected_len, args.beta, "ipo")
        else:
            offset = 0.0
            if args.rdpo_alpha:
                offset = offset + rdpo_length_margin(chosen_len, rejected_len, args.rdpo_alpha)
            if args.dpop_lambda:
                offset = offset + args.beta * dpop_penalty(chosen_logps, ref_chosen, args.dpop_lambda)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen_logps, rejected_logps, ref_chosen, ref_rejected, args.beta, loss_type,
                args.label_smoothing if loss_type in ("cdpo", "robust") else 0.0,
                offset if torch.is_tensor(offset) else None)
    # 3. What to watch: implicit-reward accuracy and margin, and both log-probs.
    metrics.update(implicit_reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps))
    return losses.mean(), metrics


@torch.no_grad()
def evaluate_dpo(args, model, examples, ref, pad_id, precision):
    """The loss and implicit-reward metrics on the preference test split (weighted by pairs),
    ``--micro-batch-size`` pairs per forward (else ``--batch-size``)."""
    model.eval()
    totals, size = {}, args.micro_batch_size or args.batch_size
    for start in range(0, len(examples), size):
        ids = list(range(start, min(start + size, len(examples))))
        with precision.autocast():
            loss, metrics = pairwise_preference_loss(args, model, pair_batch(examples, ids, pad_id, precision.device, ref))
        for name, value in {**metrics, "loss": loss}.items():
            totals[name] = totals.get(name, 0.0) + value * len(ids) / len(examples)
    return totals


def check_args(args):
    """Clear errors for options that do not apply to ``args.loss``."""
    if args.loss == "ipo" and (args.rdpo_alpha or args.dpop_lambda):
        raise MinirlhfError("--rdpo-alpha/--dpop-lambda modify the DPO logit; IPO has none (use --loss sigmoid)")
    if (args.rdpo_alpha or args.dpop_lambda) and args.loss in ("simpo", "orpo", "kto"):
        raise MinirlhfError(f"--rdpo-alpha/--dpop-lambda apply to sigmoid/cdpo/robust/hinge, not --loss {args.loss}")
    if args.label_smoothing and args.loss not in ("cdpo", "robust"):
        raise MinirlhfError(f"--label-smoothing applies to --loss cdpo or robust, not {args.loss}")


def train_dpo(args: DPOArgs):
    """Train the policy with the loss ``args.loss``; returns the saved model directory (``<out>/final``)."""
    check_args(args)
    if args.loss == "kto":  # unpaired data and its own loop: kto.py
        return train_kto(args)
    # 1. Defaults (toy world: SFT policy, pref_train/pref_test), run directory, resume point, seed.
    if args.model is None or args.data is None:
        world = load_toy_world()
        if args.model is None:
            args.model = str(world.sft_model)
            apply_toy_preset(args, TOY_PRESET)
        if args.data is None:
            args.data, args.template = str(world.pref_train), world.templates["pref_train"]
            args.eval_data = args.eval_data or str(world.pref_test)
    args.template = args.template or "align_anything"
    resume_from = prepare_run(args, f"dpo-{args.loss}")
    device = select_device(args.device)
    precision = Precision(args.precision, device)

    # 2. Tokenizer, policy (from the checkpoint when resuming; LoRA, checkpointing), data and test split.
    tokenizer = load_tokenizer(args.model)
    pad_id = tokenizer.pad_token_id
    policy = load_trained_policy(args, resume_from, device, precision.dtype)
    load_kwargs = dict(tokenizer=tokenizer, system_prompt=args.system_prompt, **data_limits(args))
    train_examples, report = load_preference_data(args.data, args.template, **load_kwargs)
    print(report, file=sys.stderr)
    if args.eval_data:
        eval_examples = load_preference_data(args.eval_data, args.eval_template or "align_anything", **load_kwargs)[0]
    else:  # a held-out slice of --data, fixed by the seed
        train_examples, eval_examples = hold_out(train_examples, args.eval_fraction, args.seed)

    # 3. Reference log-probs, computed once (or read back when resuming): [2N], chosen then rejected.
    ref = {}
    if args.loss not in REFERENCE_FREE:
        rows = {"eval": pair_rows(eval_examples), "train": pair_rows(train_examples)}
        ref = cached_reference_logps(args, resume_from, rows, pad_id, precision, policy)

    # 4. Data parallelism (DDP, or FSDP2 with --fsdp; `policy` itself in one process), optimizer,
    #    schedule, deterministic batch order; resume state.
    dp_policy = data_parallel(policy, args.fsdp)
    schedule = BatchSchedule(len(train_examples), args.batch_size, args.epochs, args.seed)
    optimizer = make_optimizer(policy.parameters(), args.lr, args.weight_decay)
    scheduler = make_scheduler(optimizer, schedule.total_steps, args.warmup_ratio, args.lr_schedule)
    start = load_training_state(resume_from, optimizer, scheduler, precision.scaler)["step"] if resume_from else 0
    total, last = schedule.total_steps, last_step(args, schedule.total_steps)

    def save(done):
        return save_checkpoint(args.out, done, policy, tokenizer, optimizer, scheduler, scaler=precision.scaler)

    # 5. The loop; `step` optimizer steps are done at the top of each pass.
    with TrainingLog(args, start, total, last, desc=f"dpo ({args.loss})") as log:
        for step in range(start, last + 1):
            # 5.1 Checkpoint (first: an evaluation that runs out of memory loses nothing) and evaluate.
            if checkpoint_due(args, step, start, last):
                save(step)
            if eval_examples and eval_due(args, step, start, total):
                log.eval(step, evaluate_dpo(args, policy, eval_examples, ref.get("eval"), pad_id, precision))
            # 5.2 Stop.
            if step == last:
                break
            # 5.3 Forward/backward: this rank's share of the batch, in micro-batches of pairs weighted
            #     by their share of the batch's pairs (counted over all ranks).
            policy.train()
            indices = schedule.batch(step)
            micro = [(ids, pair_batch(train_examples, ids, pad_id, device, ref.get("train")))
                     for ids in micro_batches(rank_share(indices), args.micro_batch_size)]
            weights = data_parallel_weights([len(ids) for ids, _ in micro])
            guard = DivergenceGuard(lambda: save(step))
            metrics = {}
            for k, ((ids, batch), weight) in enumerate(zip(micro, weights)):
                with gradient_sync(dp_policy, last=k == len(micro) - 1):  # ranks average gradients once per step
                    with precision.autocast():
                        loss, loss_metrics = pairwise_preference_loss(args, dp_policy, batch)
                    backward_weighted(loss, loss_metrics, weight, metrics, guard=guard, step=step, example_ids=ids,
                                      scaler=precision.scaler)
            metrics.update(optimizer_step(policy, optimizer, scheduler, args.max_grad_norm, guard=guard, step=step,
                                          example_ids=indices, scaler=precision.scaler))
            # 5.4 Log.
            metrics["epoch"] = (step + 1) / schedule.steps_per_epoch
            log.train(step + 1, metrics)
    return final_path(args, policy, tokenizer, last, total)


def main(argv=None):
    args = parse_args(DPOArgs, argv, prog="python -m minirlhf dpo")
    print(f"saved {train_dpo(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
