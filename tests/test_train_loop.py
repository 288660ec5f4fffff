"""The leaves every training loop is built from: data order, gradient accumulation, the optimizer
step and its NaN guard, checkpoints and exact resume, metrics, atomic directories."""
import math
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from minirlhf.data.atomic import write_dir_atomic
from minirlhf.data.order import BatchSchedule
from minirlhf.errors import MinirlhfError, TrainingDiverged
from minirlhf.train.args import TrainArgs
from minirlhf.train.batches import accumulation_weights, micro_batches, response_tokens
from minirlhf.train.checkpoints import (
    checkpoint_due, final_path, last_step, latest_checkpoint, load_training_state, prepare_run, save_checkpoint,
)
from minirlhf.train.metrics import TrainingLog, eval_due, read_metrics
from minirlhf.train.optim import DivergenceGuard, backward_weighted, make_optimizer, make_scheduler, optimizer_step
from minirlhf.train.sft import sft_loss


VOCAB = 32


def tiny_lm(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        attention_dropout=dropout, tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


def synthetic_examples(n=24, seed=0):
    """(prompt_ids, response_ids) pairs of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        p, r = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        examples.append((torch.randint(1, VOCAB, (p,), generator=g), torch.randint(1, VOCAB, (r,), generator=g)))
    return examples


def collate(examples, left_pad=False):
    """Pad (prompt, response) pairs into input_ids / attention_mask / response_mask [B, L]."""
    length = max(len(p) + len(r) for p, r in examples)
    batch = {k: torch.zeros(len(examples), length, dtype=torch.long) for k in ("input_ids", "attention_mask", "response_mask")}
    for i, (p, r) in enumerate(examples):
        ids = torch.cat([p, r])
        cols = slice(length - len(ids), length) if left_pad else slice(0, len(ids))
        batch["input_ids"][i, cols] = ids
        batch["attention_mask"][i, cols] = 1
        batch["response_mask"][i, cols] = torch.cat([torch.zeros(len(p)), torch.ones(len(r))]).long()
    return batch


# ------------------------------------------------------------------------------------------------


def test_batch_schedule_is_a_function_of_seed_and_step():
    schedule = BatchSchedule(num_examples=10, batch_size=3, epochs=2.5, seed=7)
    assert schedule.steps_per_epoch == 3 and schedule.total_steps == 8
    epoch0 = [i for s in range(3) for i in schedule.batch(s)]
    assert len(set(epoch0)) == 9  # no example twice within an epoch
    again = BatchSchedule(10, 3, 2.5, seed=7)
    torch.manual_seed(123)  # unrelated randomness does not change the order
    assert [again.batch(s) for s in range(8)] == [schedule.batch(s) for s in range(8)]
    assert schedule.batch(3) != schedule.batch(0) or schedule.batch(4) != schedule.batch(1)
    assert BatchSchedule(10, 3, 1, seed=8).batch(0) != schedule.batch(0) or BatchSchedule(10, 3, 1, seed=8).batch(1) != schedule.batch(1)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def accumulate(micro, loss_fn, weights, guard):
    """What every trainer's forward/backward does: ``backward_weighted`` per micro-batch."""
    totals = {}
    for (ids, batch), weight in zip(micro, weights):
        loss, metrics = loss_fn(batch)
        backward_weighted(loss, metrics, weight, totals, guard=guard, step=0, example_ids=ids)
    return totals


@pytest.mark.parametrize("split", [[8], [3, 3, 2], [1] * 8])
def test_gradient_accumulation_equals_big_batch_token_mean(split):
    """Token-mean loss: weighting micro-batches by their token share reproduces the big-batch gradient."""
    model, examples = tiny_lm().double(), synthetic_examples(8)
    guard = DivergenceGuard(lambda: None)

    model.zero_grad()
    big = collate(examples)
    loss, _ = sft_loss(model, big)
    loss.backward()
    expected = _grads(model).clone()

    model.zero_grad()
    bounds = [sum(split[:k]) for k in range(len(split) + 1)]
    micro = [(list(range(a, b)), collate(examples[a:b], left_pad=k % 2 == 1)) for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    tokens = [float(b["response_mask"].sum()) for _, b in micro]
    assert accumulation_weights([response_tokens(b) for _, b in micro]) == [n / sum(tokens) for n in tokens]
    metrics = accumulate(micro, lambda b: sft_loss(model, b), [n / sum(tokens) for n in tokens], guard)
    torch.testing.assert_close(_grads(model), expected, rtol=1e-10, atol=1e-12)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-10)
    if len(split) > 1:  # weighting by examples instead of tokens is *not* the big-batch gradient
        model.zero_grad()
        accumulate(micro, lambda b: sft_loss(model, b), [n / 8 for n in split], guard)
        assert not torch.allclose(_grads(model), expected, rtol=1e-6)


def test_gradient_accumulation_equals_big_batch_example_mean():
    """Per-example mean losses (RM, DPO): weighting by the example share is exact."""
    model, examples = tiny_lm().double(), synthetic_examples(6)
    guard = DivergenceGuard(lambda: None)

    def per_sequence_loss(batch):
        from minirlhf.models.forward import response_logprobs
        from minirlhf.core.logprobs import sequence_logprobs

        logps, mask = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        return -sequence_logprobs(logps, mask).mean(), {}

    model.zero_grad()
    per_sequence_loss(collate(examples))[0].backward()
    expected = _grads(model).clone()
    model.zero_grad()
    micro = [([0, 1, 2, 3], collate(examples[:4])), ([4, 5], collate(examples[4:], left_pad=True))]
    assert accumulation_weights([len(ids) for ids, _ in micro]) == [4 / 6, 2 / 6]
    accumulate(micro, per_sequence_loss, [4 / 6, 2 / 6], guard)
    torch.testing.assert_close(_grads(model), expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------


class _Tok:
    """The smallest object save_checkpoint accepts as a tokenizer."""

    def save_pretrained(self, path):
        Path(path, "tokenizer.txt").write_text("tiny")


def run_demo(out, *, stop_at_step=0, resume=False, nan_at_step=None, micro_batch_size=0, save_every=0, dropout=0.2):
    """A miniature SFT run on synthetic data, its loop written as ``sft.py`` writes it."""
    args = TrainArgs(out=str(out), seed=3, epochs=2, lr=3e-3, batch_size=4, micro_batch_size=micro_batch_size,
                     warmup_ratio=0.2, stop_at_step=stop_at_step, resume=resume, progress=False,
                     save_every=save_every, eval_every=2)
    resume_from = prepare_run(args, "demo")
    examples = synthetic_examples(18)
    if resume_from:
        model = Qwen2ForCausalLM.from_pretrained(resume_from)
    else:
        model = tiny_lm(seed=1, dropout=dropout)  # with dropout, resuming must restore the RNG exactly
    schedule = BatchSchedule(len(examples), args.batch_size, args.epochs, args.seed)
    optimizer = make_optimizer(model.parameters(), args.lr)
    scheduler = make_scheduler(optimizer, schedule.total_steps, args.warmup_ratio)
    start = load_training_state(resume_from, optimizer, scheduler)["step"] if resume_from else 0
    total, last = schedule.total_steps, last_step(args, schedule.total_steps)
    tokenizer, calls = _Tok(), 0
    with TrainingLog(args, start, total, last, desc=None) as log:
        for step in range(start, last + 1):
            if eval_due(args, step, start, total):
                model.eval()
                with torch.no_grad():
                    log.eval(step, {"loss": float(sft_loss(model, collate(examples[:4]))[0])})
            if checkpoint_due(args, step, start, last):
                save_checkpoint(args.out, step, model, tokenizer, optimizer, scheduler)
            if step == last:
                break
            model.train()
            indices = schedule.batch(step)
            micro = [(ids, collate([examples[i] for i in ids])) for ids in micro_batches(indices, args.micro_batch_size)]
            weights = accumulation_weights([response_tokens(batch) for _, batch in micro])
            guard = DivergenceGuard(lambda: save_checkpoint(args.out, step, model, tokenizer, optimizer, scheduler))
            metrics = {}
            for (ids, batch), weight in zip(micro, weights):
                loss, loss_metrics = sft_loss(model, batch)
                calls += 1
                if nan_at_step is not None and calls == nan_at_step + 1:
                    loss = loss * float("nan")
                backward_weighted(loss, loss_metrics, weight, metrics, guard=guard, step=step, example_ids=ids)
            metrics.update(optimizer_step(model, optimizer, scheduler, args.max_grad_norm,
                                          guard=guard, step=step, example_ids=indices))
            log.train(step + 1, metrics)
    return model, final_path(args, model, tokenizer, last, total), schedule


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_continues_exactly(tmp_path):
    full, _, schedule = run_demo(tmp_path / "full")
    assert schedule.total_steps == 8
    _, stopped, _ = run_demo(tmp_path / "cut", stop_at_step=3, save_every=2)
    assert stopped.name == "step-000003"
    assert (tmp_path / "cut" / "checkpoints" / "step-000002").exists()  # the previous one is kept
    resumed, final, _ = run_demo(tmp_path / "cut", resume=True, save_every=2)
    for name, value in _params(full).items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    # The metrics of the resumed run continue the interrupted ones without duplicate steps.
    rows = read_metrics(tmp_path / "cut")
    assert [r["step"] for r in rows] == list(range(1, 9))
    full_rows = read_metrics(tmp_path / "full")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in full_rows], rel=1e-6)
    assert [r["step"] for r in read_metrics(tmp_path / "cut", "eval")] == [0, 2, 4, 6, 8]
    assert list((tmp_path / "cut" / "tb").glob("events.out.tfevents.*"))
    # The final model reloads with plain transformers and computes what the trained one does.
    reloaded = Qwen2ForCausalLM.from_pretrained(final)
    assert torch.equal(reloaded.model.embed_tokens.weight, resumed.model.embed_tokens.weight)
    # Checkpoint rotation keeps the newest two; `latest` names the newest.
    names = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("step-*"))
    assert names == ["step-000006", "step-000008"]
    assert latest_checkpoint(tmp_path / "cut").name == "step-000008"


def test_loss_goes_down_and_refuses_to_overwrite_a_run(tmp_path):
    run_demo(tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["loss"] < rows[0]["loss"]
    with pytest.raises(MinirlhfError, match="--resume"):
        run_demo(tmp_path / "run")


def test_gradient_accumulation_in_a_run_matches_the_big_batch(tmp_path):
    # Without dropout (a different split draws different dropout masks), 8 optimizer steps with
    # micro-batches of 1 land where the one-pass run does, up to float32 rounding.
    big, _, _ = run_demo(tmp_path / "big", dropout=0.0)
    small, _, _ = run_demo(tmp_path / "small", micro_batch_size=1, dropout=0.0)
    for name, value in _params(big).items():
        torch.testing.assert_close(small.state_dict()[name], value, rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_with_step_batch_and_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged) as info:
        run_demo(tmp_path / "nan", nan_at_step=2)
    message = str(info.value)
    schedule = BatchSchedule(18, 4, 2, seed=3)
    assert "at optimizer step 2" in message and str(schedule.batch(2)) in message
    checkpoint = latest_checkpoint(tmp_path / "nan")
    assert checkpoint.name == "step-000002" and str(checkpoint) in message
    # The saved state is finite and equals a clean run stopped after 2 steps.
    saved = Qwen2ForCausalLM.from_pretrained(checkpoint)
    clean, _, _ = run_demo(tmp_path / "clean", stop_at_step=2)
    for name, value in _params(clean).items():
        assert torch.isfinite(value).all() and torch.equal(saved.state_dict()[name], value), name


def test_atomic_directory_write_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "ckpt"
    write_dir_atomic(target, lambda d: (d / "a.txt").write_text("good"))

    def broken(d):
        (d / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_dir_atomic(target, broken)
    assert (target / "a.txt").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind


def test_atomic_writes_keep_the_old_content_and_a_finished_cache(tmp_path):
    from minirlhf.data.atomic import atomic_file, write_text_atomic

    path = write_text_atomic(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write("half")
        raise RuntimeError("crash")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    # keep_existing: a cache another process finished first is kept, ours discarded.
    write_dir_atomic(tmp_path / "cache", lambda d: (d / "x").write_text("first"), keep_existing=True)
    write_dir_atomic(tmp_path / "cache", lambda d: (d / "x").write_text("second"), keep_existing=True)
    assert (tmp_path / "cache" / "x").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "cache"]


def test_scheduler_warmup_then_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, total_steps=10, warmup_ratio=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.1
    assert math.isclose(max(lrs), 1.0)
