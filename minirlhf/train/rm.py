"""Reward model: learn r_φ(x, y) from human preferences with the Bradley–Terry model.

    P(y_w ≻ y_l | x) = σ(r_φ(x, y_w) − r_φ(x, y_l))
    L_BT(φ) = −E[ log σ(r_φ(x, y_w) − r_φ(x, y_l) − m) ] + c · E[(r_φ(x, y_w) + r_φ(x, y_l))²]

``m`` is an optional margin (Llama 2), ``c`` the centering coefficient that keeps rewards near 0
(the BT likelihood only sees differences, so the mean would drift freely). The model is the SFT
backbone with a fresh scalar head read at the last real token (``models/reward_model.py``).

With ``--loss kwise`` each record ranks K responses to one prompt (InstructGPT): all C(K, 2)
pairs enter the loss, weighted as one example (``kwise_bradley_terry_loss``). The ranking file is
JSONL with ``{"prompt": ..., "responses": [best, ..., worst]}`` (K may vary between records).

The loop is SFT's (``sft.py``): evaluate and checkpoint, stop, forward/backward, log. The loss is
a mean over pairs, so micro-batches weigh by their share of the batch's pairs.

    python -m minirlhf rm                                  # toy world: SFT model, pref_train/test
    python -m minirlhf rm --model SFT_DIR --data train.jsonl --template align_anything
"""
import dataclasses
import sys
import typing

import torch

from minirlhf.core.reward_losses import bradley_terry_loss, kwise_bradley_terry_loss
from minirlhf.data.collate import collate_preference, collate_rankings, to_device
from minirlhf.data.datasets import load_preference_data
from minirlhf.data.order import BatchSchedule, hold_out
from minirlhf.data.rankings import load_ranking_data
from minirlhf.errors import MinirlhfError
from minirlhf.models.policy import load_tokenizer
from minirlhf.models.reward_model import RewardModel
from minirlhf.train.args import TrainArgs, apply_toy_preset, data_limits, parse_args
from minirlhf.train.batches import micro_batches
from minirlhf.train.checkpoints import (
    checkpoint_due, final_path, last_step, load_training_state, prepare_run, save_checkpoint,
)
from minirlhf.train.distributed import data_parallel_weights, rank_share
from minirlhf.train.metrics import TrainingLog, eval_due
from minirlhf.train.optim import DivergenceGuard, backward_weighted, make_optimizer, make_scheduler, optimizer_step
from minirlhf.train.parallel import data_parallel, gradient_sync
from minirlhf.train.levers import enable_gradient_checkpointing
from minirlhf.train.precision import Precision
from minirlhf.train.runtime import TRAIN_DTYPE, select_device
from minirlhf.train.toy_world import load_toy_world

# The toy world's ~1M-parameter SFT backbone wants a larger learning rate and shorter sequences
# (applied to the fields not set explicitly when no --model is given).
TOY_PRESET = dict(lr=5e-4, batch_size=32, epochs=1.0, max_len=64, max_prompt_len=32, eval_every=25)


@dataclasses.dataclass
class RMArgs(TrainArgs):
    """Reward-model training (Bradley–Terry on pairs, or K-wise on rankings)."""

    template: str = "align_anything"
    """Dataset template of --data/--eval-data (minirlhf/data/templates.py); ignored for --loss kwise."""
    eval_data: typing.Optional[str] = None
    """Test split for accuracy (default: the toy world's pref_test; with --data: --eval-fraction of it)."""
    eval_fraction: float = 0.05
    """Without --eval-data, hold out this fraction of --data as the test split (chosen by --seed)."""
    loss: typing.Literal["bt", "kwise"] = "bt"
    """'bt': pairwise Bradley–Terry; 'kwise': all pairs of K ranked responses per prompt."""
    margin: float = 0.0
    """Margin m in −log σ(r_w − r_l − m) (bt only)."""
    center_coef: float = 0.0
    """Weight c of the centering term c·(r_w + r_l)² that keeps rewards near 0 (bt only)."""
    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    system_prompt: typing.Optional[str] = None
    """System prompt put in front of every conversation."""


def pairwise_rm_loss(model, batch, margin=0.0, center_coef=0.0):
    """Bradley–Terry loss of a ``[2B, L]`` chosen+rejected batch (one forward); ``(loss, metrics)``."""
    _, end_scores = model(batch["input_ids"], batch["attention_mask"])
    chosen, rejected = end_scores.chunk(2)
    loss, accuracy = bradley_terry_loss(chosen, rejected, margin=margin or None, center_coef=center_coef)
    return loss, {
        "accuracy": accuracy,
        "chosen_reward": chosen.detach().mean(),
        "rejected_reward": rejected.detach().mean(),
        "margin": (chosen - rejected).detach().mean(),
    }


def kwise_rm_loss(model, batch):
    """InstructGPT's K-wise loss of a ranking batch (one forward over all ``P·K`` responses)."""
    _, end_scores = model(batch["input_ids"], batch["attention_mask"])
    rewards = end_scores.view(batch["rank_mask"].shape)
    loss, accuracy = kwise_bradley_terry_loss(rewards, batch["rank_mask"])
    mask = batch["rank_mask"]
    best, worst = rewards[:, 0], rewards.gather(1, (mask.sum(1, keepdim=True) - 1)).squeeze(1)
    return loss, {
        "accuracy": accuracy,
        "chosen_reward": best.detach().mean(),
        "rejected_reward": worst.detach().mean(),
        "margin": (best - worst).detach().mean(),
    }


@torch.no_grad()
def pair_scores(model, examples, pad_id, batch_size, device, precision=None):
    """``(chosen [N], rejected [N])`` end scores r(x, y_w), r(x, y_l) of preference examples (float32,
    CPU); one forward per batch over the concatenated ``[2B, L]`` pairs, under ``precision``'s
    autocast (default: ``--precision auto``'s)."""
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate_preference(examples[start : start + batch_size], pad_id), device)
        with (precision or Precision("auto", device)).autocast():
            _, end_scores = model(batch["input_ids"], batch["attention_mask"])
        c, r = end_scores.float().cpu().chunk(2)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def rm_metrics(chosen, rejected):
    """Accuracy (ties ½), Bradley–Terry loss, reward mean/std over all 2N responses, chosen and
    rejected mean rewards and the mean margin r(y_w) − r(y_l)."""
    loss, accuracy = bradley_terry_loss(chosen, rejected)
    both = torch.cat([chosen, rejected])
    return {
        "accuracy": float(accuracy),
        "loss": float(loss),
        "reward_mean": float(both.mean()),
        "reward_std": float(both.std()) if both.numel() > 1 else 0.0,
        "chosen_reward": float(chosen.mean()),
        "rejected_reward": float(rejected.mean()),
        "margin": float((chosen - rejected).mean()),
    }


@torch.no_grad()
def evaluate_rm(model, examples, args, pad_id, precision):
    """Test-split metrics: ``rm_metrics`` of the pairs, or the K-wise loss's metrics averaged over
    the rankings (weighted by prompts); ``--micro-batch-size`` examples per forward (else ``--batch-size``)."""
    model.eval()
    size = args.micro_batch_size or args.batch_size
    if args.loss != "kwise":
        return rm_metrics(*pair_scores(model, examples, pad_id, size, precision.device, precision))
    totals = {}
    for start in range(0, len(examples), size):
        chunk = examples[start : start + size]
        with precision.autocast():
            loss, metrics = kwise_rm_loss(model, to_device(collate_rankings(chunk, pad_id), precision.device))
        for name, value in {"loss": loss, **metrics}.items():
            totals[name] = totals.get(name, 0.0) + float(value) * len(chunk) / len(examples)
    return totals


def train_rm(args: RMArgs):
    """Train a reward model with ``args``; returns the saved RM directory (``<out>/final``), loadable
    with ``RewardModel.from_pretrained`` or ``AutoModelForSequenceClassification``."""
    # 1. Defaults (toy world: the SFT policy and its preference splits), run directory, seed.
    if args.model is None or args.data is None:
        world = load_toy_world()
        if args.model is None:
            args.model = str(world.sft_model)
            apply_toy_preset(args, TOY_PRESET)
        if args.data is None:
            if args.loss == "kwise":
                raise MinirlhfError("--loss kwise needs --data: a JSONL of {prompt, responses: [best, ..., worst]}")
            args.data, args.eval_data = str(world.pref_train), args.eval_data or str(world.pref_test)
            args.template = world.templates["pref_train"]
    resume_from = prepare_run(args, "rm")
    device = select_device(args.device)
    precision = Precision(args.precision, device)

    # 2. Tokenizer, reward model (SFT backbone + new head, or the checkpoint), data and test split.
    tokenizer = load_tokenizer(args.model)
    pad_id = tokenizer.pad_token_id
    if resume_from:
        model = RewardModel.from_pretrained(resume_from, dtype=TRAIN_DTYPE, device=device, keep_dropout=args.keep_dropout)
    else:
        model = RewardModel.from_causal_lm(args.model, dtype=TRAIN_DTYPE, device=device, seed=args.seed, keep_dropout=args.keep_dropout)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    limits, kwise = data_limits(args), args.loss == "kwise"
    if kwise:
        load = lambda path: load_ranking_data(path, tokenizer, system_prompt=args.system_prompt, **limits)  # noqa: E731
    else:
        load = lambda path: load_preference_data(path, args.template, tokenizer, system_prompt=args.system_prompt, **limits)  # noqa: E731
    collate = collate_rankings if kwise else collate_preference
    train_examples, report = load(args.data)
    print(report, file=sys.stderr)
    if args.eval_data:
        eval_examples = load(args.eval_data)[0]
    else:  # a held-out slice of --data, fixed by the seed
        train_examples, eval_examples = hold_out(train_examples, args.eval_fraction, args.seed)

    # 3. Data parallelism (DDP, or FSDP2 with --fsdp; `model` itself in one process), optimizer,
    #    schedule, deterministic batch order; resume state.
    dp_model = data_parallel(model, args.fsdp)
    schedule = BatchSchedule(len(train_examples), args.batch_size, args.epochs, args.seed)
    optimizer = make_optimizer(model.parameters(), args.lr, args.weight_decay)
    scheduler = make_scheduler(optimizer, schedule.total_steps, args.warmup_ratio, args.lr_schedule)
    start = load_training_state(resume_from, optimizer, scheduler, precision.scaler)["step"] if resume_from else 0
    total, last = schedule.total_steps, last_step(args, schedule.total_steps)

    def save(done):
        return save_checkpoint(args.out, done, model, tokenizer, optimizer, scheduler, scaler=precision.scaler)

    # 4. The loop; `step` optimizer steps are done at the top of each pass.
    eval_metrics = {}
    with TrainingLog(args, start, total, last, desc="rm") as log:
        for step in range(start, last + 1):
            # 4.1 Checkpoint (first: an evaluation that runs out of memory loses nothing) and evaluate.
            if checkpoint_due(args, step, start, last):
                save(step)
            if eval_examples and eval_due(args, step, start, total):
                eval_metrics = evaluate_rm(model, eval_examples, args, pad_id, precision)
                log.eval(step, eval_metrics)
            # 4.2 Stop.
            if step == last:
                break
            # 4.3 Forward/backward: this rank's share of the batch, in micro-batches weighted by their
            #     share of the batch's pairs (rankings), counted over all ranks.
            model.train()
            indices = schedule.batch(step)
            micro = [(ids, to_device(collate([train_examples[i] for i in ids], pad_id), device))
                     for ids in micro_batches(rank_share(indices), args.micro_batch_size)]
            weights = data_parallel_weights([len(ids) for ids, _ in micro])
            guard = DivergenceGuard(lambda: save(step))
            metrics = {}
            for k, ((ids, batch), weight) in enumerate(zip(micro, weights)):
                with gradient_sync(dp_model, last=k == len(micro) - 1):  # ranks average gradients once per step
                    with precision.autocast():
                        if kwise:
                            loss, loss_metrics = kwise_rm_loss(dp_model, batch)
                        else:
                            loss, loss_metrics = pairwise_rm_loss(dp_model, batch, args.margin, args.center_coef)
                    backward_weighted(loss, loss_metrics, weight, metrics, guard=guard, step=step, example_ids=ids,
                                      scaler=precision.scaler)
            metrics.update(optimizer_step(model, optimizer, scheduler, args.max_grad_norm, guard=guard, step=step,
                                          example_ids=indices, scaler=precision.scaler))
            # 4.4 Log.
            metrics["epoch"] = (step + 1) / schedule.steps_per_epoch
            log.train(step + 1, metrics)
    if eval_metrics:
        print("latest test-split evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in eval_metrics.items()), file=sys.stderr)
    return final_path(args, model, tokenizer, last, total)


def main(argv=None):
    args = parse_args(RMArgs, argv, prog="python -m minirlhf rm")
    print(f"saved {train_rm(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
