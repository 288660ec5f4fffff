"""Supervised fine-tuning: maximise the log-likelihood of demonstration responses.

    L_SFT(θ) = − Σ_i Σ_t m_{i,t} log π_θ(y_{i,t} | x_i, y_{i,<t}) / Σ_i Σ_t m_{i,t}

The mean is over all response tokens of the batch (``token_mean``; prompt tokens and padding have
``m = 0``), the usual choice for SFT: every demonstrated token weighs the same. Gradient
accumulation therefore weighs each micro-batch by its share of the batch's *tokens*.

The loop has the four steps of every offline trainer (SFT, RM, DPO, KTO), in nanoGPT's order:

1. **Evaluate and checkpoint** the model as it is after ``step`` optimizer steps: the test loss
   every ``--eval-every`` steps and at the end; a resumable checkpoint every ``--save-every``
   steps and at the end.
2. **Stop** after the last step (``--stop-at-step`` stops early; ``--resume`` continues).
3. **Forward/backward.** The batch of step ``s`` is a function of ``(seed, s)``; it is split into
   micro-batches whose weighted gradients add up to the whole batch's; then one AdamW step. Under
   torchrun each rank takes an equal share of the batch and the weights count every rank's tokens
   (``train/distributed.py``): N processes take the step one process would.
4. **Log** loss, gradient norm and learning rate (CSV, TensorBoard, progress bar).

    python -m minirlhf sft                         # the toy world's base model and SFT corpus
    python -m minirlhf sft --model Qwen/Qwen2.5-0.5B --data sft.jsonl --template sft --lr 1e-5
    torchrun --standalone --nproc_per_node 4 -m minirlhf sft ...      # the same run on 4 GPUs

From Python: ``train_sft(SFTArgs(model=..., data=..., out=...))`` returns the saved model directory.
"""
import dataclasses
import sys
from functools import partial
import typing

import torch

from minirlhf.core.masked import masked_mean
from minirlhf.data.collate import collate_sft, to_device
from minirlhf.data.datasets import load_sft_data
from minirlhf.data.order import BatchSchedule
from minirlhf.models.forward import response_logprobs
from minirlhf.models.policy import load_tokenizer
from minirlhf.toy.world import load_world
from minirlhf.train.args import PolicyTrainArgs, apply_toy_preset, data_limits, parse_args
from minirlhf.train.batches import micro_batches, response_tokens
from minirlhf.train.checkpoints import (
    checkpoint_due, final_path, last_step, load_training_state, prepare_run, save_checkpoint,
)
from minirlhf.train.distributed import data_parallel_weights, rank_share
from minirlhf.train.metrics import TrainingLog, eval_due
from minirlhf.train.optim import DivergenceGuard, backward_weighted, make_optimizer, make_scheduler, optimizer_step
from minirlhf.train.parallel import data_parallel, gradient_sync
from minirlhf.train.levers import load_trained_policy, policy_logprobs
from minirlhf.train.precision import Precision
from minirlhf.train.runtime import select_device

# The toy world's SFT policy: a ~1M-parameter model trained from scratch (a high learning rate,
# short sequences). Applied to the fields not set explicitly when no --model is given.
TOY_PRESET = dict(epochs=4.0, lr=3e-3, batch_size=16, max_len=64, max_prompt_len=32)


@dataclasses.dataclass
class SFTArgs(PolicyTrainArgs):
    """Supervised fine-tuning on (prompt, response) demonstrations."""

    template: str = "sft"
    """Dataset template (data/templates.py): 'sft' (prompt, response), 'sft_messages', or a
    preference template such as 'align_anything' (trains on the chosen responses)."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    epochs: float = 2.0
    """Passes over the training data."""
    eval_data: typing.Optional[str] = None
    """Held-out SFT file for the eval loss (default: the toy world's test split; none for --data)."""
    system_prompt: typing.Optional[str] = None
    """System prompt put in front of every conversation (default: none, or the chat template's own)."""


def sft_loss(model, batch, logprobs=response_logprobs):
    """Token-mean negative log-likelihood of the response tokens; returns ``(loss, metrics)``.

    ``batch``: ``input_ids``, ``attention_mask``, ``response_mask`` ``[B, L]``. Logits are
    computed only from the first response column on (``response_logprobs``; or none at all with
    ``logprobs=fused_response_logprobs``).
    """
    token_logprobs, mask = logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    return masked_mean(-token_logprobs, mask), {}


@torch.no_grad()
def evaluate_sft(model, examples, pad_id, batch_size, precision):
    """``{"loss"}``: the token-mean NLL over all of ``examples`` (the test split), ``batch_size`` per forward."""
    model.eval()
    total_nll, total_tokens = 0.0, 0.0
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate_sft(examples[start : start + batch_size], pad_id), precision.device)
        tokens = response_tokens(batch)
        with precision.autocast():
            total_nll += sft_loss(model, batch)[0] * tokens
        total_tokens += tokens
    return {"loss": float(total_nll) / max(total_tokens, 1.0)}


def train_sft(args: SFTArgs):
    """Run SFT with ``args``; returns the path of the saved, HF-loadable model (``<out>/final``)."""
    # 1. Defaults (the toy world when no model/data is given), run directory, resume point, seed.
    if args.model is None or args.data is None:
        world = load_world()  # the base model and SFT corpus; the toy SFT policy is not needed
        if args.model is None:
            args.model = str(world.base_model)
            apply_toy_preset(args, TOY_PRESET)
        if args.data is None:
            args.data, args.eval_data = str(world.sft_train), args.eval_data or str(world.sft_test)
    resume_from = prepare_run(args, "sft")
    device = select_device(args.device)
    precision = Precision(args.precision, device)

    # 2. Tokenizer, model (from the checkpoint when resuming; LoRA, checkpointing), data.
    tokenizer = load_tokenizer(args.model)
    pad_id = tokenizer.pad_token_id
    model = load_trained_policy(args, resume_from, device, precision.dtype)
    data_kwargs = dict(template=args.template, tokenizer=tokenizer, system_prompt=args.system_prompt, **data_limits(args))
    train_examples, report = load_sft_data(args.data, **data_kwargs)
    eval_examples = load_sft_data(args.eval_data, **data_kwargs)[0] if args.eval_data else []
    print(report, file=sys.stderr)

    # 3. Data parallelism (DDP, or FSDP2 with --fsdp; `model` itself in one process), optimizer,
    #    learning-rate schedule and the deterministic batch order; resume state.
    dp_model = data_parallel(model, args.fsdp)
    schedule = BatchSchedule(len(train_examples), args.batch_size, args.epochs, args.seed)
    optimizer = make_optimizer(model.parameters(), args.lr, args.weight_decay)
    scheduler = make_scheduler(optimizer, schedule.total_steps, args.warmup_ratio, args.lr_schedule)
    start = load_training_state(resume_from, optimizer, scheduler, precision.scaler)["step"] if resume_from else 0
    total, last = schedule.total_steps, last_step(args, schedule.total_steps)

    def save(done):
        return save_checkpoint(args.out, done, model, tokenizer, optimizer, scheduler, scaler=precision.scaler)

    loss_fn = partial(sft_loss, logprobs=policy_logprobs(args)) if args.fused_head else sft_loss

    # 4. The loop; `step` optimizer steps are done at the top of each pass.
    with TrainingLog(args, start, total, last, desc="sft") as log:
        for step in range(start, last + 1):
            # 4.1 Checkpoint (first: an evaluation that runs out of memory loses nothing) and evaluate.
            if checkpoint_due(args, step, start, last):
                save(step)
            if eval_examples and eval_due(args, step, start, total):
                log.eval(step, evaluate_sft(model, eval_examples, pad_id, args.micro_batch_size or args.batch_size,
                                            precision))
            # 4.2 Stop.
            if step == last:
                break
            # 4.3 Forward/backward: this rank's share of the batch, in micro-batches weighted by their
            #     share of the batch's response tokens (counted over all ranks).
            model.train()
            indices = schedule.batch(step)
            micro = [(ids, to_device(collate_sft([train_examples[i] for i in ids], pad_id), device))
                     for ids in micro_batches(rank_share(indices), args.micro_batch_size)]
            weights = data_parallel_weights([response_tokens(batch) for _, batch in micro])
            guard = DivergenceGuard(lambda: save(step))
            metrics = {}
            for k, ((ids, batch), weight) in enumerate(zip(micro, weights)):
                with gradient_sync(dp_model, last=k == len(micro) - 1):  # ranks average gradients once per step
                    with precision.autocast():
                        loss, loss_metrics = loss_fn(dp_model, batch)
                    backward_weighted(loss, loss_metrics, weight, metrics, guard=guard, step=step, example_ids=ids,
                                      scaler=precision.scaler)
            metrics.update(optimizer_step(model, optimizer, scheduler, args.max_grad_norm, guard=guard, step=step,
                                          example_ids=indices, scaler=precision.scaler))
            # 4.4 Log.
            metrics["epoch"] = (step + 1) / schedule.steps_per_epoch
            log.train(step + 1, metrics)
    return final_path(args, model, tokenizer, last, total)


def main(argv=None):
    args = parse_args(SFTArgs, argv, prog="python -m minirlhf sft")
    print(f"saved {train_sft(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
