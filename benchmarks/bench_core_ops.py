"""Benchmark 4: the core RL math at realistic sizes, as a fraction of a training step.

    python benchmarks/bench_core_ops.py [--json out.json]               # CPU: toy policy, B=64, T=512
    python benchmarks/bench_core_ops.py --device cuda --json out.json   # GPU: Qwen2.5-0.5B shape, bf16

Each op of ``minirlhf/core`` that a PPO/GRPO iteration runs once per batch is timed on ``[B, T]``
float32 tensors (right-padded rows: prompt columns masked out, responses of random lengths):
``gae_advantages``, ``group_advantages`` (G = 8), ``kl_penalty`` (k3) and ``kl_shaped_rewards``,
and the three policy-gradient losses, forward + backward: ``ppo_policy_loss``,
``ppo_value_loss``, ``grpo_loss``. Each time is divided by the time of a training step of a model
at the same B and T: forward + backward of the policy over the batch in micro-batches
(``response_logprobs`` + ``ppo_policy_loss``, gradient accumulation) and the AdamW step. That
denominator is a lower bound for a real iteration (no generation, no value model, no reference
pass), so the fractions are upper bounds. CPU: the toy world's policy (the smallest model minirlhf
trains); CUDA: Qwen2.5-0.5B's shape under bf16 autocast. Target: each op < 1% of the step.

GAE has to run backwards over time, but it must not also loop over the batch: the table compares
``gae_advantages`` (one loop over T, every row at once) with calling it row by row in a Python
loop, and the script asserts both give the same advantages.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py; it also puts the repository on sys.path)

from minirlhf.core.gae import gae_advantages  # noqa: E402
from minirlhf.core.grpo import group_advantages, grpo_loss  # noqa: E402
from minirlhf.core.kl import kl_penalty, kl_shaped_rewards  # noqa: E402
from minirlhf.core.ppo_losses import ppo_policy_loss, ppo_value_loss  # noqa: E402
from minirlhf.models.forward import response_logprobs  # noqa: E402
from minirlhf.train.batches import micro_batches  # noqa: E402
from minirlhf.train.optim import (  # noqa: E402
    DivergenceGuard, backward_weighted, make_optimizer, make_scheduler, optimizer_step,
)
from minirlhf.train.precision import Precision  # noqa: E402

TARGET_FRACTION = 0.01
GROUP_SIZE = 8


def make_rollout(batch, length, device, seed=0):
    """A rollout's tensors. Inputs ``[B, T + 1]``: a prompt of ``T/4 … T/2`` tokens, a response of
    ``1 … T/2`` tokens, right padding (``attention_mask``, ``response_mask``). Token-level ``[B, T]``
    (aligned with the labels): ``mask = response_mask[:, 1:]`` and random log-probs, values,
    rewards, advantages; ``score`` ``[B]``."""
    generator = torch.Generator().manual_seed(seed)
    columns = torch.arange(length + 1)
    prompt = torch.randint(length // 4, length // 2 + 1, (batch, 1), generator=generator)
    response = torch.randint(1, length // 2 + 1, (batch, 1), generator=generator)
    response_mask = (columns >= prompt) & (columns < prompt + response)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    return {
        "attention_mask": (columns < prompt + response).long().to(device),
        "response_mask": response_mask.long().to(device),
        "mask": response_mask[:, 1:].to(device),
        "logprobs": (randn(batch, length) * 0.1 - 2.0).requires_grad_(True),
        "old_logprobs": randn(batch, length) * 0.1 - 2.0,
        "ref_logprobs": randn(batch, length) * 0.1 - 2.0,
        "values": randn(batch, length).requires_grad_(True),
        "old_values": randn(batch, length),
        "rewards": randn(batch, length) * 0.01,
        "advantages": randn(batch, length),
        "returns": randn(batch, length),
        "score": randn(batch),
    }


def gae_row_by_row(rewards, values, mask):
    """The same GAE, one row at a time: what 'not vectorised over the batch' costs."""
    rows = [gae_advantages(rewards[b : b + 1], values[b : b + 1], mask[b : b + 1]) for b in range(len(rewards))]
    return torch.cat([a for a, _ in rows]), torch.cat([r for _, r in rows])


def core_ops(x):
    """``{name: zero-argument function}`` for every op, forward + backward for the losses."""
    def backward(loss_and_diagnostics):
        loss_and_diagnostics[0].backward()

    seq_advantages = x["advantages"][:, 0]
    return {
        "gae_advantages": lambda: gae_advantages(x["rewards"], x["values"].detach(), x["mask"]),
        "group_advantages (G=8)": lambda: group_advantages(x["score"], GROUP_SIZE),
        "kl_penalty (k3)": lambda: kl_penalty(x["logprobs"].detach(), x["ref_logprobs"], "k3"),
        "kl_shaped_rewards": lambda: kl_shaped_rewards(x["score"], x["logprobs"].detach(), x["ref_logprobs"],
                                                       x["mask"], beta=0.05),
        "ppo_policy_loss fwd+bwd": lambda: backward(ppo_policy_loss(
            x["logprobs"], x["old_logprobs"], x["advantages"], x["mask"])),
        "ppo_value_loss fwd+bwd": lambda: backward(ppo_value_loss(
            x["values"], x["old_values"], x["returns"], x["mask"])),
        "grpo_loss fwd+bwd": lambda: backward(grpo_loss(
            x["logprobs"], x["old_logprobs"], x["ref_logprobs"], seq_advantages, x["mask"])),
    }


def time_op(fn, device, repeats, warmup, budget=0.05):
    """Median seconds per call; each timing runs ``fn`` enough times to last about ``budget`` s."""
    for _ in range(max(warmup, 1)):
        common.sync(device)
        start = time.perf_counter()
        fn()
        common.sync(device)
        single = time.perf_counter() - start
    calls = max(1, int(budget / max(single, 1e-7)))
    samples = []
    for _ in range(repeats):
        common.sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        common.sync(device)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def training_step_seconds(args, device):
    """Median seconds of one policy update at ``[B, T + 1]`` (micro-batches, AdamW)."""
    model = common.build_model(args.shape, device).train()
    optimizer = make_optimizer(model.parameters(), lr=1e-5)
    scheduler = make_scheduler(optimizer, 10**6, schedule="constant")
    x = make_rollout(args.batch, args.length, device)
    input_ids = torch.randint(3, model.config.vocab_size, (args.batch, args.length + 1), device=device)
    attention_mask, response_mask = x["attention_mask"], x["response_mask"]
    rows = list(range(args.batch))
    guard = DivergenceGuard(lambda: None)

    def loss_fn(ids):
        logprobs, mask = response_logprobs(model, input_ids[ids], attention_mask[ids], response_mask[ids])
        loss, _, _ = ppo_policy_loss(logprobs, x["old_logprobs"][ids], x["advantages"][ids], mask)
        return loss, {}

    def step():
        totals = {}
        for ids in micro_batches(rows, args.micro_batch):
            with Precision("auto", device).autocast():
                loss, metrics = loss_fn(ids)
            backward_weighted(loss, metrics, len(ids) / len(rows), totals, guard=guard, step=0, example_ids=ids)
        optimizer_step(model, optimizer, scheduler, 1.0, guard=guard, step=0, example_ids=rows)

    seconds = common.time_alternately({"step": step}, device, repeats=args.step_repeats, warmup=1)["step"]
    return seconds, common.num_parameters(model)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", help="model shape in common.model_config (default: toy on CPU, "
                                        "qwen2.5-0.5b on CUDA)")
    parser.add_argument("--batch", type=int, default=64, help="B")
    parser.add_argument("--length", type=int, default=512, help="T")
    parser.add_argument("--micro-batch", type=int, help="rows per forward/backward of the training step "
                                                        "(default 16 on CPU, 8 on CUDA)")
    parser.add_argument("--step-repeats", type=int, default=2, help="timed training steps (median reported)")
    common.add_common_arguments(parser)
    args = parser.parse_args()
    common.setup_threads(args)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    args.shape = args.shape or ("qwen2.5-0.5b" if on_cuda else "toy")
    args.micro_batch = args.micro_batch or (8 if on_cuda else 16)

    x = make_rollout(args.batch, args.length, device)
    ops = core_ops(x)
    op_seconds = {name: time_op(fn, device, args.repeats, args.warmup) for name, fn in ops.items()}

    vectorised = gae_advantages(x["rewards"], x["values"].detach(), x["mask"])
    per_row = gae_row_by_row(x["rewards"], x["values"].detach(), x["mask"])
    for ours, reference in zip(vectorised, per_row):
        torch.testing.assert_close(ours, reference)
    row_loop_seconds = time_op(lambda: gae_row_by_row(x["rewards"], x["values"].detach(), x["mask"]), device,
                               repeats=max(1, args.repeats // 2), warmup=0)

    step_seconds, n_params = training_step_seconds(args, device)
    fractions = {name: s / step_seconds for name, s in op_seconds.items()}
    summary = {
        "benchmark": "core ops",
        "device": common.device_name(args.device),
        "shape": {"B": args.batch, "T": args.length, "group_size": GROUP_SIZE},
        "step_model": {"shape": args.shape, "parameters": n_params, "micro_batch": args.micro_batch},
        "torch": torch.__version__,
        "step_seconds": step_seconds,
        "op_seconds": op_seconds,
        "fraction_of_step": fractions,
        "gae_row_loop_seconds": row_loop_seconds,
        "gae_vectorised_speedup": row_loop_seconds / op_seconds["gae_advantages"],
        "missed": [name for name, f in fractions.items() if f >= TARGET_FRACTION],
    }
    common.print_table(
        f"core ops at B={args.batch}, T={args.length}: fraction of one training step of the {args.shape} "
        f"model ({n_params / 1e6:.1f}M parameters) at the same B, T (target < {TARGET_FRACTION:.0%})",
        ["op", "fraction of step", "target met"],
        [[name, f"{100 * f:.2g}%", "yes" if f < TARGET_FRACTION else "NO"] for name, f in fractions.items()]
        + [["gae_advantages, row by row ÷ vectorised (time)", f"{summary['gae_vectorised_speedup']:.1f}×", ""]],
    )
    common.print_table(
        f"absolute, on {summary['device']}",
        ["op", "ms per call"],
        [[name, s * 1e3] for name, s in op_seconds.items()]
        + [["gae_advantages row by row", row_loop_seconds * 1e3],
           [f"training step ({args.shape}, micro-batches of {args.micro_batch})", step_seconds * 1e3]],
    )
    if summary["missed"]:
        print(f"\nMISSED TARGET (≥ {TARGET_FRACTION:.0%} of a step): {', '.join(summary['missed'])}")
    common.write_json(args.json, summary)


if __name__ == "__main__":
    main()
