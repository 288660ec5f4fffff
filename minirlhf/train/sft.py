"""Supervised fine-tuning: maximise the log-likelihood of demonstration responses.

    L_SFT(θ) = − Σ_i Σ_t m_{i,t} log π_θ(y_{i,t} | x_i, y_{i,<t}) / Σ_i Σ_t m_{i,t}

The mean is over all response tokens of the batch (``token_mean``; prompt tokens and padding have
``m = 0``), the usual choice for SFT: every demonstrated token weighs the same. Gradient
accumulation therefore weighs each micro-batch by its share of the batch's *tokens*.

    python -m minirlhf sft                         # the toy world's base model and SFT corpus
    python -m minirlhf sft --model Qwen/Qwen2.5-0.5B --data sft.jsonl --template sft --lr 1e-5

From Python: ``train_sft(SFTArgs(model=..., data=..., out=...))`` returns the saved model directory.
"""
import dataclasses
import sys
import typing

from minirlhf.core.masked import masked_mean
from minirlhf.data.collate import collate_sft
from minirlhf.data.datasets import load_sft_data
from minirlhf.models.forward import response_logprobs
from minirlhf.models.policy import load_policy, load_tokenizer
from minirlhf.toy.world import SFT_HYPERPARAMETERS
from minirlhf.train import common


@dataclasses.dataclass
class SFTArgs(common.TrainArgs):
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


def sft_loss(model, batch):
    """Token-mean negative log-likelihood of the response tokens; returns ``(loss, metrics)``.

    ``batch``: ``input_ids``, ``attention_mask``, ``response_mask`` ``[B, L]``. Logits are
    computed only from the first response column on (``response_logprobs``).
    """
    token_logprobs, mask = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    return masked_mean(-token_logprobs, mask), {}


def train_sft(args: SFTArgs):
    """Run SFT with ``args``; returns the path of the saved, HF-loadable model (``<out>/final``)."""
    # 1. Defaults (the toy world when no model/data is given), run directory, resume point, seed.
    if args.model is None or args.data is None:
        world = common.toy_world(sft=False)
        if args.model is None:
            args.model = str(world.base_model)
            common.apply_toy_preset(args, SFT_HYPERPARAMETERS)
        if args.data is None:
            args.data, args.eval_data = str(world.sft_train), args.eval_data or str(world.sft_test)
    resume_from = common.prepare_run(args, "sft")
    device = common.select_device(args.device)

    # 2. Tokenizer, model (from the checkpoint when resuming), data.
    tokenizer = load_tokenizer(args.model)
    model = load_policy(str(resume_from or args.model), dtype=common.TRAIN_DTYPE, device=device)
    data_kwargs = dict(template=args.template, tokenizer=tokenizer, system_prompt=args.system_prompt,
                       **common.data_limits(args))
    train_examples, report = load_sft_data(args.data, **data_kwargs)
    eval_examples = load_sft_data(args.eval_data, **data_kwargs)[0] if args.eval_data else None
    print(report, file=sys.stderr)

    # 3. Optimizer, learning-rate schedule and the deterministic batch order.
    schedule = common.BatchSchedule(len(train_examples), args.batch_size, args.epochs, args.seed)
    optimizer = common.make_optimizer(model.parameters(), args.lr, args.weight_decay)
    scheduler = common.make_scheduler(optimizer, schedule.total_steps, args.warmup_ratio, args.lr_schedule)
    start_step = common.load_training_state(resume_from, optimizer, scheduler)["step"] if resume_from else 0

    # 4. Micro-batches weighted by their share of the batch's response tokens (token-mean loss).
    def make_micro_batches(indices):
        micro = []
        for ids in common.micro_batches(indices, args.micro_batch_size):
            micro.append((ids, common.to_device(collate_sft([train_examples[i] for i in ids], tokenizer.pad_token_id), device)))
        tokens = [float(batch["response_mask"][:, 1:].sum()) for _, batch in micro]
        return micro, [n / sum(tokens) for n in tokens]

    def evaluate():
        total_nll, total_tokens = 0.0, 0.0
        for start in range(0, len(eval_examples), args.batch_size):
            batch = collate_sft(eval_examples[start : start + args.batch_size], tokenizer.pad_token_id)
            batch = common.to_device(batch, device)
            tokens = float(batch["response_mask"][:, 1:].sum())
            total_nll += float(sft_loss(model, batch)[0]) * tokens
            total_tokens += tokens
        return {"loss": total_nll / max(total_tokens, 1.0)}

    # 5. Train, then save the final model and tokenizer.
    common.run_steps(
        args, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
        schedule=schedule, start_step=start_step, device=device, make_micro_batches=make_micro_batches,
        loss_fn=lambda batch: sft_loss(model, batch), evaluate=evaluate if eval_examples else None, desc="sft",
    )
    return common.finish_run(args, model, tokenizer, schedule)


def main(argv=None):
    args = common.parse_args(SFTArgs, argv, prog="python -m minirlhf sft")
    print(f"saved {train_sft(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
