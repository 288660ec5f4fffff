"""Reward model: learn r_φ(x, y) from human preferences with the Bradley–Terry model.

    P(y_w ≻ y_l | x) = σ(r_φ(x, y_w) − r_φ(x, y_l))
    L_BT(φ) = −E[ log σ(r_φ(x, y_w) − r_φ(x, y_l) − m) ] + c · E[(r_φ(x, y_w) + r_φ(x, y_l))²]

``m`` is an optional margin (Llama 2), ``c`` the centering coefficient that keeps rewards near 0
(the BT likelihood only sees differences, so the mean would drift freely). The model is the SFT
backbone with a fresh scalar head read at the last real token (``models/reward_model.py``).

With ``--loss kwise`` each record ranks K responses to one prompt (InstructGPT): all C(K, 2)
pairs enter the loss, weighted as one example (``kwise_bradley_terry_loss``). The ranking file is
JSONL with ``{"prompt": ..., "responses": [best, ..., worst]}`` (K may vary between records).

    python -m minirlhf rm                                  # toy world: SFT model, pref_train/test
    python -m minirlhf rm --model SFT_DIR --data train.jsonl --template align_anything
"""
import dataclasses
import sys
import typing

import torch

from minirlhf.core.reward_losses import bradley_terry_loss, kwise_bradley_terry_loss
from minirlhf.data.chat import tokenize_prompt_response
from minirlhf.data.collate import collate_preference, pad_sequences
from minirlhf.data.datasets import DataReport, load_preference_data, located_records
from minirlhf.data.templates import SkipRecord, prompt_field, text_field
from minirlhf.errors import DataError, MinirlhfError
from minirlhf.eval.eval_rm import pair_scores, rm_metrics
from minirlhf.models.policy import load_tokenizer
from minirlhf.models.reward_model import RewardModel
from minirlhf.train import common


# Hyperparameters for the toy world's ~1M-parameter SFT backbone (fields left at their defaults).
# Measured on toy world v1, seed 0: test accuracy 72.4% after 1 epoch (Bayes-optimal 75.1%).
TOY_PRESET = dict(lr=5e-4, batch_size=32, epochs=1.0, max_len=64, max_prompt_len=32, eval_every=25)


@dataclasses.dataclass
class RMArgs(common.TrainArgs):
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


# ---------------------------------------------------------------------------------------------
# K-wise ranking data: {"prompt": ..., "responses": [best, ..., worst]}
# ---------------------------------------------------------------------------------------------


def load_ranking_data(path, tokenizer, max_len, max_prompt_len, system_prompt=None):
    """Tokenized rankings: each example has ``prompt``, ``responses`` (best first), ``input_ids``
    and ``response_mask`` (one list per response). Responses that do not fit are dropped (the
    ranking of the rest is unchanged); a record left with fewer than 2 is skipped and counted."""
    report, examples = DataReport(str(path), "ranking"), []
    for where, record in located_records(path):
        report.records += 1
        try:
            prompt = prompt_field(record, "prompt")
            responses = record.get("responses")
            if not isinstance(responses, list) or len(responses) < 2:
                raise DataError("field 'responses': expected a list of at least 2 responses, best first")
            responses = [text_field({"response": r}, "response") for r in responses]
        except DataError as err:
            raise DataError(f"{path}, {where}: {err}") from None
        kept = []
        for response in responses:
            try:
                kept.append((response, *tokenize_prompt_response(tokenizer, prompt, response, max_len, max_prompt_len, system_prompt)))
            except SkipRecord:
                continue
        if len(kept) < 2:
            report.skipped["fewer than 2 responses fit in max_len"] += 1
            continue
        report.kept += 1
        report.truncated_responses += any(t.response_tokens_cut for *_, t in kept)
        examples.append({"prompt": prompt, "responses": [k[0] for k in kept],
                         "input_ids": [k[1] for k in kept], "response_mask": [k[2] for k in kept]})
    report.examples = len(examples)
    return examples, report


def collate_rankings(examples, pad_id):
    """Rankings -> ``input_ids``/``attention_mask`` ``[P·K, L]`` (row p·K + k is response k of
    prompt p; missing responses are 1-token padding rows) and ``rank_mask`` ``[P, K]``."""
    k = max(len(e["input_ids"]) for e in examples)
    rows, lengths, rank_mask = [], [], torch.zeros(len(examples), k, dtype=torch.bool)
    for p, example in enumerate(examples):
        for j in range(k):
            present = j < len(example["input_ids"])
            rows.append(example["input_ids"][j] if present else [pad_id])
            lengths.append(len(rows[-1]))
            rank_mask[p, j] = present
    return {
        "input_ids": pad_sequences(rows, pad_id),
        "attention_mask": pad_sequences([[1] * n for n in lengths], 0),
        "rank_mask": rank_mask,
    }


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train_rm(args: RMArgs):
    """Train a reward model with ``args``; returns the saved RM directory (``<out>/final``), loadable
    with ``RewardModel.from_pretrained`` or ``AutoModelForSequenceClassification``."""
    # 1. Defaults (toy world: the SFT policy and its preference splits), run directory, seed.
    if args.model is None or args.data is None:
        world = common.toy_world()
        if args.model is None:
            args.model = str(world.sft_model)
            common.apply_toy_preset(args, TOY_PRESET)
        if args.data is None:
            if args.loss == "kwise":
                raise MinirlhfError("--loss kwise needs --data: a JSONL of {prompt, responses: [best, ..., worst]}")
            args.data, args.eval_data = str(world.pref_train), args.eval_data or str(world.pref_test)
            args.template = world.templates["pref_train"]
    resume_from = common.prepare_run(args, "rm")
    device = common.select_device(args.device)

    # 2. Tokenizer, reward model (SFT backbone + new head, or the checkpoint), data and test split.
    tokenizer = load_tokenizer(args.model)
    if resume_from:
        model = RewardModel.from_pretrained(resume_from, dtype=common.TRAIN_DTYPE, device=device)
    else:
        model = RewardModel.from_causal_lm(args.model, dtype=common.TRAIN_DTYPE, device=device, seed=args.seed)
    limits = common.data_limits(args)
    if args.loss == "kwise":
        load = lambda path: load_ranking_data(path, tokenizer, system_prompt=args.system_prompt, **limits)  # noqa: E731
        collate, loss_fn = collate_rankings, lambda batch: kwise_rm_loss(model, batch)
    else:
        load = lambda path: load_preference_data(path, args.template, tokenizer, system_prompt=args.system_prompt, **limits)  # noqa: E731
        collate = collate_preference
        loss_fn = lambda batch: pairwise_rm_loss(model, batch, args.margin, args.center_coef)  # noqa: E731
    train_examples, report = load(args.data)
    print(report, file=sys.stderr)
    if args.eval_data:
        eval_examples = load(args.eval_data)[0]
    else:  # a held-out slice of --data, fixed by the seed
        order = common.epoch_permutation(len(train_examples), args.seed, epoch=-1)
        n_eval = int(round(args.eval_fraction * len(train_examples)))
        eval_examples = [train_examples[i] for i in order[:n_eval]]
        train_examples = [train_examples[i] for i in order[n_eval:]]

    # 3. Optimizer, schedule, deterministic batch order; resume state.
    schedule = common.BatchSchedule(len(train_examples), args.batch_size, args.epochs, args.seed)
    optimizer = common.make_optimizer(model.parameters(), args.lr, args.weight_decay)
    scheduler = common.make_scheduler(optimizer, schedule.total_steps, args.warmup_ratio, args.lr_schedule)
    start_step = common.load_training_state(resume_from, optimizer, scheduler)["step"] if resume_from else 0

    # 4. Micro-batches weigh by their share of the batch's examples (the loss is a mean over pairs).
    def make_micro_batches(indices):
        micro = [(ids, common.to_device(collate([train_examples[i] for i in ids], tokenizer.pad_token_id), device))
                 for ids in common.micro_batches(indices, args.micro_batch_size)]
        return micro, [len(ids) / len(indices) for ids, _ in micro]

    def evaluate():
        if args.loss == "kwise":  # average the per-batch K-wise metrics, weighted by prompts
            totals = {}
            for start in range(0, len(eval_examples), args.batch_size):
                chunk = eval_examples[start : start + args.batch_size]
                loss, metrics = kwise_rm_loss(model, common.to_device(collate(chunk, tokenizer.pad_token_id), device))
                for name, value in {"loss": loss, **metrics}.items():
                    totals[name] = totals.get(name, 0.0) + float(value) * len(chunk) / len(eval_examples)
            return totals
        return rm_metrics(*pair_scores(model, eval_examples, tokenizer.pad_token_id, args.batch_size, device))

    # 5. Train; evaluate on the test split; save the final RM with its tokenizer.
    metrics = common.run_steps(
        args, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler, schedule=schedule,
        start_step=start_step, device=device, make_micro_batches=make_micro_batches, loss_fn=loss_fn,
        evaluate=evaluate if eval_examples else None, desc="rm",
    )
    if metrics:
        print("latest test-split evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), file=sys.stderr)
    return common.finish_run(args, model, tokenizer, schedule)


def main(argv=None):
    args = common.parse_args(RMArgs, argv, prog="python -m minirlhf rm")
    print(f"saved {train_rm(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
