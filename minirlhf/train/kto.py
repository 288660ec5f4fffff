"""KTO (Ethayarajh et al. 2024): alignment from unpaired thumbs-up / thumbs-down examples.

    desirable y (👍):    L = λ_D · (1 − σ(β(r − z0)))        r = log π_θ(y|x) − log π_ref(y|x)
    undesirable y (👎):  L = λ_U · (1 − σ(β(z0 − r)))

(``kto_loss`` in ``minirlhf/core/dpo_losses.py``). The data is the toy KTO file, or any
preference file split into chosen 👍 / rejected 👎. The reference point z0 estimates
KL(π_θ‖π_ref) on *mismatched* pairs: each example's prompt with another example's response (a
fixed partner, so its reference side is cached with the rest, ``preference.py``). z0 is computed
over the whole optimizer batch, before the micro-batches, so gradient accumulation stays exact.
The policy is judged on preference pairs as sigmoid DPO's implicit rewards are.

The loop is SFT's (``sft.py``): evaluate and checkpoint, stop, forward/backward, log.

    python -m minirlhf dpo --loss kto                   # the toy world's unpaired KTO file
    python -m minirlhf dpo --loss kto --data pairs.jsonl --template align_anything

From Python: ``train_kto(KTOArgs(...))`` (or ``train_dpo(DPOArgs(loss="kto", ...))``).
"""
import dataclasses
import sys
import typing

import torch

from minirlhf.core.dpo_losses import kto_loss
from minirlhf.data.collate import collate_kto, collate_sft, to_device
from minirlhf.data.datasets import load_kto_data, load_preference_data
from minirlhf.data.order import BatchSchedule, epoch_permutation
from minirlhf.models.policy import load_tokenizer
from minirlhf.train.args import PolicyTrainArgs, apply_toy_preset, data_limits
from minirlhf.train.batches import micro_batches
from minirlhf.train.checkpoints import (
    checkpoint_due, final_path, last_step, load_training_state, prepare_run, save_checkpoint,
)
from minirlhf.train.distributed import all_reduce_sum, data_parallel_weights, rank_share
from minirlhf.train.metrics import TrainingLog, eval_due
from minirlhf.train.optim import DivergenceGuard, backward_weighted, make_optimizer, make_scheduler, optimizer_step
from minirlhf.train.parallel import data_parallel, gradient_sync
from minirlhf.train.preference import (
    TOY_PRESET, cached_reference_logps, pair_batch, pair_rows, sequence_logps, sigmoid_dpo_metrics,
)
from minirlhf.train.levers import load_trained_policy, policy_logprobs
from minirlhf.train.precision import Precision
from minirlhf.train.runtime import select_device
from minirlhf.train.toy_world import load_toy_world


@dataclasses.dataclass
class KTOArgs(PolicyTrainArgs):
    """KTO on unpaired desirable/undesirable examples (``dpo --loss kto`` on the command line)."""

    beta: float = 0.1
    """β: strength of the implicit KL regulariser."""
    kto_desirable_weight: float = 1.0
    """KTO's λ_D (weight of thumbs-up examples)."""
    kto_undesirable_weight: float = 1.0
    """KTO's λ_U (weight of thumbs-down examples)."""
    ref_model: typing.Optional[str] = None
    """Reference policy π_ref (default: --model, the starting policy)."""
    template: typing.Optional[str] = None
    """Dataset template of --data: 'kto', or a preference template (default: align_anything)."""
    eval_data: typing.Optional[str] = None
    """Preference test split for the implicit-reward accuracy (default: the toy world's pref_test)."""
    eval_template: typing.Optional[str] = None
    """Dataset template of --eval-data (default: align_anything)."""
    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    system_prompt: typing.Optional[str] = None
    """System prompt put in front of every conversation."""


def mismatched_rows(examples, seed, max_len):
    """KTO's KL pairs: example i's prompt followed by the response of a fixed partner π(i) ≠ i
    (consecutive in a seeded permutation), cut to ``max_len`` tokens."""
    order = epoch_permutation(len(examples), seed, epoch=-2)
    rows = [None] * len(examples)
    for k, i in enumerate(order):
        mine, partner = examples[i], examples[order[(k + 1) % len(order)]]
        prompt = mine["input_ids"][: mine["response_mask"].index(1)]
        response = [t for t, m in zip(partner["input_ids"], partner["response_mask"]) if m]
        ids = (prompt + response)[:max_len]
        rows[i] = {"input_ids": ids, "response_mask": ([0] * len(prompt) + [1] * len(response))[:max_len]}
    return rows


@torch.no_grad()
def kto_reference_point(policy, kl_rows, ref_kl, indices, micro_batch_size, pad_id, precision):
    """z0 = mean over the batch ``indices`` of log π(y_π(i)|x_i) − log π_ref(y_π(i)|x_i), no gradient
    (each rank sums its share of the batch; the sums are all-reduced)."""
    total = 0.0
    with precision.autocast():
        for ids in micro_batches(rank_share(indices), micro_batch_size):
            batch = to_device(collate_sft([kl_rows[i] for i in ids], pad_id), precision.device)
            total += (sequence_logps(policy, batch)[0].float().cpu() - ref_kl[ids]).sum()
    return all_reduce_sum(float(total)) / len(indices)


def kto_batch_loss(args, model, batch):
    """KTO on an unpaired batch (``labels`` True = desirable, cached ``ref_logps``, and the
    step's ``kl_reference`` z0); ``(loss, metrics)``."""
    logps, _ = sequence_logps(model, batch, policy_logprobs(args))
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


@torch.no_grad()
def evaluate_kto(args, model, examples, ref, pad_id, precision):
    """Sigmoid DPO's implicit-reward metrics on the preference test split (weighted by pairs),
    ``--micro-batch-size`` pairs per forward (else ``--batch-size``)."""
    model.eval()
    totals, size = {}, args.micro_batch_size or args.batch_size
    for start in range(0, len(examples), size):
        ids = list(range(start, min(start + size, len(examples))))
        with precision.autocast():
            _, metrics = sigmoid_dpo_metrics(model, pair_batch(examples, ids, pad_id, precision.device, ref), args.beta)
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value * len(ids) / len(examples)
    return totals


def train_kto(args: KTOArgs):
    """Train the policy with KTO; returns the saved model directory (``<out>/final``)."""
    # 1. Defaults (toy world: SFT policy, its KTO file and pref_test), run directory, seed.
    if args.model is None or args.data is None:
        world = load_toy_world()
        if args.model is None:
            args.model = str(world.sft_model)
            apply_toy_preset(args, TOY_PRESET)
        if args.data is None:
            args.data, args.template = str(world.kto_train), world.templates["kto_train"]
            args.eval_data = args.eval_data or str(world.pref_test)
    args.template = args.template or "align_anything"
    resume_from = prepare_run(args, "dpo-kto")
    device = select_device(args.device)
    precision = Precision(args.precision, device)

    # 2. Tokenizer, policy (from the checkpoint when resuming; LoRA, checkpointing), data, test split, KL pairs.
    tokenizer = load_tokenizer(args.model)
    pad_id = tokenizer.pad_token_id
    policy = load_trained_policy(args, resume_from, device, precision.dtype)
    load_kwargs = dict(tokenizer=tokenizer, system_prompt=args.system_prompt, **data_limits(args))
    train_examples, report = load_kto_data(args.data, args.template, **load_kwargs)
    print(report, file=sys.stderr)
    eval_examples = []
    if args.eval_data:
        eval_examples = load_preference_data(args.eval_data, args.eval_template or "align_anything", **load_kwargs)[0]
    kl_rows = mismatched_rows(train_examples, args.seed, args.max_len)

    # 3. Reference log-probs of the test pairs, the examples and their KL pairs, computed once.
    rows = {"eval": pair_rows(eval_examples), "train": train_examples, "train_kl": kl_rows}
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
    with TrainingLog(args, start, total, last, desc="dpo (kto)") as log:
        for step in range(start, last + 1):
            # 5.1 Checkpoint (first: an evaluation that runs out of memory loses nothing) and evaluate.
            if checkpoint_due(args, step, start, last):
                save(step)
            if eval_examples and eval_due(args, step, start, total):
                log.eval(step, evaluate_kto(args, policy, eval_examples, ref["eval"], pad_id, precision))
            # 5.2 Stop.
            if step == last:
                break
            # 5.3 Forward/backward: z0 over the whole batch, then this rank's share of the batch in
            #     micro-batches weighted by their share of the batch's examples (over all ranks).
            policy.train()
            indices = schedule.batch(step)
            z0 = kto_reference_point(policy, kl_rows, ref["train_kl"], indices, args.micro_batch_size, pad_id, precision)
            micro = []
            for ids in micro_batches(rank_share(indices), args.micro_batch_size):
                batch = collate_kto([train_examples[i] for i in ids], pad_id)
                batch.update(ref_logps=ref["train"][ids], kl_reference=torch.tensor(z0))
                micro.append((ids, to_device(batch, device)))
            weights = data_parallel_weights([len(ids) for ids, _ in micro])
            guard = DivergenceGuard(lambda: save(step))
            metrics = {}
            for k, ((ids, batch), weight) in enumerate(zip(micro, weights)):
                with gradient_sync(dp_policy, last=k == len(micro) - 1):  # ranks average gradients once per step
                    with precision.autocast():
                        loss, loss_metrics = kto_batch_loss(args, dp_policy, batch)
                    backward_weighted(loss, loss_metrics, weight, metrics, guard=guard, step=step, example_ids=ids,
                                      scaler=precision.scaler)
            metrics.update(optimizer_step(policy, optimizer, scheduler, args.max_grad_norm, guard=guard, step=step,
                                          example_ids=indices, scaler=precision.scaler))
            # 5.4 Log.
            metrics["epoch"] = (step + 1) / schedule.steps_per_epoch
            log.train(step + 1, metrics)
    return final_path(args, policy, tokenizer, last, total)
