"""Direct preference optimisation and its family: DPO, cDPO, robust DPO, IPO, hinge (SLiC), SimPO,
ORPO and KTO — one loop, the loss chosen with ``--loss``.

    DPO:  L = −log σ( β[log π_θ(y_w|x) − log π_ref(y_w|x)] − β[log π_θ(y_l|x) − log π_ref(y_l|x)] )

The formulas live in ``minirlhf/core/dpo_losses.py``; this file feeds them:

- **Reference log-probs once.** π_ref never changes, so log π_ref(y|x) of every training (and test)
  response is computed in one pass before training and cached per example (and saved in
  ``<out>/reference_logps.pt`` for ``--resume``); the reference model is then freed, so training
  holds one model. SimPO and ORPO are reference-free and skip this.
- **One forward per pair batch.** Chosen and rejected rows are concatenated into one ``[2B, L]``
  batch (``collate_preference``); logits are computed only from the first response token on
  (``response_logprobs``).
- **Summed vs averaged log-probs.** DPO/cDPO/robust/hinge/KTO use summed log π(y|x); IPO, SimPO
  and ORPO use the length average (1/|y|) log π(y|x), as their papers define them.
- **ORPO** adds the SFT term: loss = NLL(y_w) + λ·L_OR, the NLL being the chosen response's mean
  token negative log-likelihood.
- **KTO** trains on unpaired thumbs-up/down examples (the toy KTO file, or a preference file split
  into chosen 👍 / rejected 👎). Its reference point z0 estimates KL(π_θ‖π_ref) on *mismatched*
  pairs: each example's prompt with another example's response (a fixed partner, so the reference
  side is cached too). z0 is computed over the whole optimizer batch before the micro-batches, so
  gradient accumulation stays exact.

Logged per step: loss, accuracy (implicit reward of y_w above y_l), chosen/rejected rewards, their
margin, and both summed log-probs ``logps_chosen``/``logps_rejected`` — watch both fall while the
margin grows: DPO only needs the *difference* to increase.

    python -m minirlhf dpo                                       # toy world, sigmoid DPO, β = 0.1
    python -m minirlhf dpo --loss simpo --beta 2.0 --simpo-gamma 0.5
    python -m minirlhf dpo --loss kto                            # toy world's unpaired KTO file
"""
import dataclasses
import sys
import typing
from pathlib import Path

import torch

from minirlhf.core.dpo_losses import dpo_loss, dpop_penalty, kto_loss, orpo_loss, rdpo_length_margin, simpo_loss
from minirlhf.core.logprobs import sequence_logprobs
from minirlhf.data.collate import collate_kto, collate_preference, collate_sft
from minirlhf.data.datasets import load_kto_data, load_preference_data
from minirlhf.errors import MinirlhfError
from minirlhf.models.forward import response_logprobs
from minirlhf.models.policy import load_policy, load_tokenizer
from minirlhf.train import common

LOSSES = ("sigmoid", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")


# Hyperparameters for the toy world's ~1M-parameter SFT policy (fields left at their defaults).
# Measured on toy world v2, seed 0 (sigmoid DPO, 1 epoch): the gold reward of 4 samples per eval
# prompt goes from −0.85 (SFT) to +0.40 (win rate 83%); test implicit-reward accuracy 74% (Bayes
# 75%). With β = 0.1 and lr = 2e-4 instead, both log-probs fall fast, responses double in length
# (the planted length bias) and the gold reward drops to −1.56: a small β invites over-optimisation.
TOY_PRESET = dict(lr=1e-4, beta=0.5, batch_size=32, epochs=1.0, max_len=64, max_prompt_len=32, eval_every=25)


@dataclasses.dataclass
class DPOArgs(common.TrainArgs):
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


# ---------------------------------------------------------------------------------------------
# Log-probs
# ---------------------------------------------------------------------------------------------


def sequence_logps(model, batch):
    """``(log π(y|x) [N], |y| [N])``: summed response log-probs and response lengths of a batch
    (one forward, logits from the first response token on)."""
    token_logps, mask = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    return sequence_logprobs(token_logps, mask), mask.sum(-1).float()


@torch.no_grad()
def reference_logps(model, rows, pad_id, batch_size, device):
    """Summed log π_ref(y|x) of ``rows`` (dicts with ``input_ids``/``response_mask`` lists), ``[N]``
    float32 on the CPU: computed once, before training."""
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        batch = common.to_device(collate_sft(rows[start : start + batch_size], pad_id), device)
        with common.autocast(device):
            out.append(sequence_logps(model, batch)[0].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def pair_rows(examples):
    """Preference examples -> rows ``[chosen_0..chosen_{N-1}, rejected_0..rejected_{N-1}]``."""
    return [{"input_ids": e["chosen_input_ids"], "response_mask": e["chosen_response_mask"]} for e in examples] + [
        {"input_ids": e["rejected_input_ids"], "response_mask": e["rejected_response_mask"]} for e in examples
    ]


def mismatched_rows(examples, seed, max_len):
    """KTO's KL pairs: example i's prompt followed by the response of a fixed partner π(i) ≠ i
    (consecutive in a seeded permutation), cut to ``max_len`` tokens."""
    order = common.epoch_permutation(len(examples), seed, epoch=-2)
    rows = [None] * len(examples)
    for k, i in enumerate(order):
        mine, partner = examples[i], examples[order[(k + 1) % len(order)]]
        prompt = mine["input_ids"][: mine["response_mask"].index(1)]
        response = [t for t, m in zip(partner["input_ids"], partner["response_mask"]) if m]
        ids = (prompt + response)[:max_len]
        rows[i] = {"input_ids": ids, "response_mask": ([0] * len(prompt) + [1] * len(response))[:max_len]}
    return rows


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def _pair_accuracy(chosen_rewards, rejected_rewards):
    return ((chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()).mean()


def pair_loss(args, model, batch, loss_type=None):
    """The pairwise losses of the family on a ``[2B, L]`` chosen+rejected batch; ``(loss, metrics)``.

    ``batch`` also holds the cached ``ref_chosen_logps``/``ref_rejected_logps`` ``[B]`` (summed)
    unless the loss is reference-free. ``loss_type`` defaults to ``args.loss``.
    """
    loss_type = loss_type or args.loss
    # 1. One forward over chosen and rejected together; split the halves.
    logps, lengths = sequence_logps(model, batch)
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
    metrics.update(
        accuracy=_pair_accuracy(chosen_rewards, rejected_rewards),
        chosen_reward=chosen_rewards.mean(),
        rejected_reward=rejected_rewards.mean(),
        margin=(chosen_rewards - rejected_rewards).mean(),
        logps_chosen=chosen_logps.detach().mean(),
        logps_rejected=rejected_logps.detach().mean(),
    )
    return losses.mean(), metrics


def kto_batch_loss(args, model, batch):
    """KTO on an unpaired batch (``labels`` True = desirable, cached ``ref_logps``, and the
    step's ``kl_reference`` z0); ``(loss, metrics)``."""
    logps, _ = sequence_logps(model, batch)
    desirable = batch["labels"]
    losses, rewards = kto_loss(logps, batch["ref_logps"], desirable, batch["kl_reference"], args.beta,
                               args.kto_desirable_weight, args.kto_undesirable_weight)
    # accuracy: the reward is on the side of β·z0 that the label asks for (a tie counts ½)
    threshold = args.beta * batch["kl_reference"].clamp(min=0)
    agree = torch.where(desirable, rewards > threshold, rewards < threshold).float() + 0.5 * (rewards == threshold).float()
    return losses.mean(), {
        "accuracy": agree.mean(),
        "kl": batch["kl_reference"],  # the raw estimate; kto_loss clamps it at 0 for z0
        "reward_desirable": rewards[desirable].mean() if desirable.any() else rewards.new_zeros(()),
        "reward_undesirable": rewards[~desirable].mean() if (~desirable).any() else rewards.new_zeros(()),
        "logps": logps.detach().mean(),
    }


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _check_args(args):
    if args.loss == "ipo" and (args.rdpo_alpha or args.dpop_lambda):
        raise MinirlhfError("--rdpo-alpha/--dpop-lambda modify the DPO logit; IPO has none (use --loss sigmoid)")
    if (args.rdpo_alpha or args.dpop_lambda) and args.loss in ("simpo", "orpo", "kto"):
        raise MinirlhfError(f"--rdpo-alpha/--dpop-lambda apply to sigmoid/cdpo/robust/hinge, not --loss {args.loss}")
    if args.label_smoothing and args.loss not in ("cdpo", "robust"):
        raise MinirlhfError(f"--label-smoothing applies to --loss cdpo or robust, not {args.loss}")


def train_dpo(args: DPOArgs):
    """Train the policy with the loss ``args.loss``; returns the saved model directory (``<out>/final``)."""
    _check_args(args)
    # 1. Defaults (toy world: SFT policy, pref_train/pref_test or the KTO file), run dir, seed.
    if args.model is None or args.data is None:
        world = common.toy_world()
        if args.model is None:
            args.model = str(world.sft_model)
            common.apply_toy_preset(args, TOY_PRESET)
        if args.data is None:
            key = "kto_train" if args.loss == "kto" else "pref_train"
            args.data, args.template = str(getattr(world, key)), world.templates[key]
            args.eval_data = args.eval_data or str(world.pref_test)
    args.template = args.template or "align_anything"
    resume_from = common.prepare_run(args, f"dpo-{args.loss}")
    device = common.select_device(args.device)

    # 2. Tokenizer, policy (from the checkpoint when resuming), data and test split.
    tokenizer = load_tokenizer(args.model)
    pad_id = tokenizer.pad_token_id
    policy = load_policy(str(resume_from or args.model), dtype=common.TRAIN_DTYPE, device=device)
    limits = common.data_limits(args)
    load_data = load_kto_data if args.loss == "kto" else load_preference_data
    train_examples, report = load_data(args.data, args.template, tokenizer, system_prompt=args.system_prompt, **limits)
    print(report, file=sys.stderr)
    if args.eval_data:
        eval_examples = load_preference_data(args.eval_data, args.eval_template or "align_anything", tokenizer,
                                             system_prompt=args.system_prompt, **limits)[0]
    elif args.loss != "kto":
        order = common.epoch_permutation(len(train_examples), args.seed, epoch=-1)
        n_eval = int(round(args.eval_fraction * len(train_examples)))
        eval_examples = [train_examples[i] for i in order[:n_eval]]
        train_examples = [train_examples[i] for i in order[n_eval:]]
    else:
        eval_examples = []
    kl_rows = mismatched_rows(train_examples, args.seed, args.max_len) if args.loss == "kto" else None

    # 3. Reference log-probs, computed once (or read back when resuming) and cached per example.
    ref = {}
    if args.loss not in REFERENCE_FREE:
        cache = Path(args.out) / "reference_logps.pt"
        if resume_from and cache.exists():
            ref = torch.load(cache)
        else:
            reference = load_policy(args.ref_model or args.model, dtype=common.TRAIN_DTYPE, device=device)
            rows = {"eval": pair_rows(eval_examples)}
            if args.loss == "kto":
                rows.update(train=train_examples, train_kl=kl_rows)
            else:
                rows["train"] = pair_rows(train_examples)
            ref = {name: reference_logps(reference, r, pad_id, args.batch_size, device) for name, r in rows.items()}
            del reference
            common.torch_save_atomic(ref, cache)
    # Pair caches are [2N] = chosen then rejected; view them as [N, 2].
    pair_ref = {k: v.view(2, -1).T for k, v in ref.items() if k == "eval" or (k == "train" and args.loss != "kto")}

    # 4. Optimizer, schedule, deterministic batch order; resume state.
    schedule = common.BatchSchedule(len(train_examples), args.batch_size, args.epochs, args.seed)
    optimizer = common.make_optimizer(policy.parameters(), args.lr, args.weight_decay)
    scheduler = common.make_scheduler(optimizer, schedule.total_steps, args.warmup_ratio, args.lr_schedule)
    start_step = common.load_training_state(resume_from, optimizer, scheduler)["step"] if resume_from else 0

    # 5. Micro-batches (weights = share of the batch's examples), with their cached reference.
    def pair_batch(examples, ids, split):
        batch = collate_preference([examples[i] for i in ids], pad_id)
        if split in pair_ref:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = pair_ref[split][ids].T
        return common.to_device(batch, device)

    def kto_reference_point(indices):
        """z0 = mean over the batch of log π(y_π(i)|x_i) − log π_ref(y_π(i)|x_i), no gradient."""
        total = 0.0
        with torch.no_grad(), common.autocast(device):
            for ids in common.micro_batches(indices, args.micro_batch_size):
                batch = common.to_device(collate_sft([kl_rows[i] for i in ids], pad_id), device)
                total += float((sequence_logps(policy, batch)[0].float().cpu() - ref["train_kl"][ids]).sum())
        return total / len(indices)

    def make_micro_batches(indices):
        if args.loss == "kto":
            z0 = kto_reference_point(indices)
            micro = []
            for ids in common.micro_batches(indices, args.micro_batch_size):
                batch = collate_kto([train_examples[i] for i in ids], pad_id)
                batch.update(ref_logps=ref["train"][ids], kl_reference=torch.tensor(z0))
                micro.append((ids, common.to_device(batch, device)))
        else:
            micro = [(ids, pair_batch(train_examples, ids, "train"))
                     for ids in common.micro_batches(indices, args.micro_batch_size)]
        return micro, [len(ids) / len(indices) for ids, _ in micro]

    def loss_fn(batch):
        return kto_batch_loss(args, policy, batch) if args.loss == "kto" else pair_loss(args, policy, batch)

    def evaluate():
        """Implicit-reward metrics on the preference test split (KTO: as sigmoid DPO's rewards)."""
        totals = {}
        for start in range(0, len(eval_examples), args.batch_size):
            ids = list(range(start, min(start + args.batch_size, len(eval_examples))))
            loss_type = "sigmoid" if args.loss == "kto" else args.loss
            loss, metrics = pair_loss(args, policy, pair_batch(eval_examples, ids, "eval"), loss_type)
            if args.loss != "kto":
                metrics["loss"] = loss
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + float(value) * len(ids) / len(eval_examples)
        return totals

    # 6. Train; save the policy and tokenizer.
    common.run_steps(
        args, model=policy, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler, schedule=schedule,
        start_step=start_step, device=device, make_micro_batches=make_micro_batches, loss_fn=loss_fn,
        evaluate=evaluate if eval_examples else None, desc=f"dpo ({args.loss})",
    )
    return common.finish_run(args, policy, tokenizer, schedule)


def main(argv=None):
    args = common.parse_args(DPOArgs, argv, prog="python -m minirlhf dpo")
    print(f"saved {train_dpo(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
