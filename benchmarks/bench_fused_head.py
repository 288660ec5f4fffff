"""Benchmark 6: the fused LM-head log-probs against today's path, on one DPO forward + backward.

    python benchmarks/bench_fused_head.py [--json out.json]               # CPU: 2-layer Qwen width, V = 151,936, 4 pairs
    python benchmarks/bench_fused_head.py --device cuda --json out.json   # GPU: Qwen2.5-0.5B shape, bf16 autocast, 8 pairs

Both variants run the same model over the same ``[2B, L]`` chosen-then-rejected batch
(``collate_preference``), sum the response log-probs and take the sigmoid DPO loss
(``dpo_loss``, β = 0.1, fixed stand-in reference log-probs), then backward:

- **unfused** (today's path, ``response_logprobs``): logits ``[2B, L − start, V]`` from the first
  response column of the batch on (``logits_to_keep``), chunked ``gather_logprobs``;
- **fused** (``fused_response_logprobs``): hidden states of the response tokens only, through the
  LM head and the log-softmax chunk by chunk (``minirlhf/core/fused_logprobs.py``); no logits.

**Peak extra** = peak memory of a steady-state forward + backward above what is held before it
(weights, their gradients from a first step, the batch): activations, logits and the head's
transients. Fresh process per variant; on CPU peak RSS (VmHWM) with glibc's mmap threshold fixed
(``common.TENSOR_RSS_ENV``: without it the same step's peak drifts by ±0.2 GiB between runs), on
CUDA max_memory_allocated.
**Time** = median step, the two variants alternately in one process. The script asserts equal
losses. Targets: fused peak extra ≤ 0.5× unfused, fused time ≤ 1.2× unfused.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py; it also puts the repository on sys.path)

from minirlhf.core.dpo_losses import dpo_loss  # noqa: E402
from minirlhf.core.logprobs import sequence_logprobs  # noqa: E402
from minirlhf.data.collate import collate_preference  # noqa: E402
from minirlhf.models.forward import fused_response_logprobs, response_logprobs  # noqa: E402

VARIANTS = {"unfused": response_logprobs, "fused": fused_response_logprobs}
BETA = 0.1
MAX_MEMORY_RATIO, MAX_TIME_RATIO = 0.5, 1.2


def make_batch(args, device):
    config = common.model_config(args.shape)
    pairs = common.make_pairs(args.pairs, args.prompt_len, args.response_len, config)
    batch = {k: v.to(device) for k, v in collate_preference(pairs, config.pad_token_id).items()}
    return batch, int(batch["attention_mask"].sum()), int(batch["response_mask"].sum())


def dpo_step(variant, model, batch, device):
    """Forward + backward of the DPO loss on ``batch`` with ``variant``'s log-probs; returns the loss."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:
        token_logps, mask = VARIANTS[variant](model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        chosen, rejected = sequence_logprobs(token_logps, mask).chunk(2)
        reference = torch.linspace(-1.0, 1.0, chosen.numel(), device=device)  # a fixed stand-in for log π_ref
        losses, _, _ = dpo_loss(chosen, rejected, chosen.detach() + reference, rejected.detach() - reference, BETA)
        loss = losses.mean()
    loss.backward()
    return loss.item()


def measure_memory(args, variant):
    """Worker (fresh process): peak extra memory of one steady-state forward + backward."""
    device = torch.device(args.device)
    model = common.build_model(args.shape, device, seed=1)
    batch, _, _ = make_batch(args, device)
    dpo_step(variant, model, batch, device)  # allocates the parameter gradients
    memory = common.PeakMemory(device).start()
    dpo_step(variant, model, batch, device)
    return {"variant": variant, "peak_extra_bytes": memory.peak_extra()}


def measure_time(args):
    device = torch.device(args.device)
    model = common.build_model(args.shape, device, seed=1)
    batch, _, _ = make_batch(args, device)
    losses = {v: [] for v in VARIANTS}

    def step(variant):
        model.zero_grad(set_to_none=False)
        losses[variant].append(dpo_step(variant, model, batch, device))

    seconds = common.time_alternately({v: (lambda v=v: step(v)) for v in VARIANTS}, device,
                                      repeats=args.repeats, warmup=args.warmup)
    tolerance = 1e-2 if device.type == "cuda" else 1e-5
    if abs(losses["fused"][0] - losses["unfused"][0]) > tolerance:
        raise AssertionError(f"fused and unfused give different losses: {losses}")
    return seconds, {v: values[0] for v, values in losses.items()}, common.num_parameters(model)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", help="model shape in common.model_config (default: qwen-width-2l on CPU, "
                                        "qwen2.5-0.5b on CUDA)")
    parser.add_argument("--pairs", type=int, help="preference pairs (default 4 on CPU, 8 on CUDA)")
    parser.add_argument("--prompt-len", type=int, default=256, help="longest prompt (default 256)")
    parser.add_argument("--response-len", type=int, default=256, help="longest response (default 256)")
    common.add_common_arguments(parser)
    parser.set_defaults(repeats=3)
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.setup_threads(args)
    on_cuda = args.device == "cuda"
    args.shape = args.shape or ("qwen2.5-0.5b" if on_cuda else "qwen-width-2l")
    args.pairs = args.pairs or (8 if on_cuda else 4)
    if args.worker:
        print(json.dumps(measure_memory(args, args.worker)))
        return

    sizes = ["--device", args.device, "--threads", str(args.threads), "--shape", args.shape, "--pairs", str(args.pairs),
             "--prompt-len", str(args.prompt_len), "--response-len", str(args.response_len)]
    memory = {v: common.run_worker(__file__, sizes + ["--worker", v], env=common.TENSOR_RSS_ENV)["peak_extra_bytes"]
              for v in VARIANTS}
    seconds, losses, n_params = measure_time(args)
    _, tokens, response_tokens = make_batch(args, torch.device("cpu"))
    memory_ratio, time_ratio = memory["fused"] / memory["unfused"], seconds["fused"] / seconds["unfused"]
    summary = {
        "benchmark": "fused LM-head log-probs, DPO forward + backward",
        "device": common.device_name(args.device),
        "model": {"shape": args.shape, "parameters": n_params},
        "batch": {"pairs": args.pairs, "prompt_len": args.prompt_len, "response_len": args.response_len,
                  "tokens": tokens, "response_tokens": response_tokens},
        "torch": torch.__version__,
        "loss": losses,
        "results": {v: {"peak_extra_bytes": memory[v], "step_seconds": seconds[v]} for v in VARIANTS},
        "fused_over_unfused": {"peak_extra": memory_ratio, "time": time_ratio},
    }
    common.print_table(
        f"DPO forward + backward, {args.shape} ({n_params / 1e6:.0f}M parameters), {args.pairs} pairs, "
        f"{tokens} tokens ({response_tokens} response)",
        ["", "peak extra, fused ÷ unfused", "time, fused ÷ unfused"],
        [["ratio (target)", f"{memory_ratio:.3f} (≤ {MAX_MEMORY_RATIO})", f"{time_ratio:.3f} (≤ {MAX_TIME_RATIO})"]],
    )
    common.print_table(f"absolute, on {summary['device']}", ["variant", "peak extra (MiB)", "step (s)"],
                       [[v, common.mib(memory[v]), seconds[v]] for v in VARIANTS])
    for name, ratio, target in (("memory", memory_ratio, MAX_MEMORY_RATIO), ("time", time_ratio, MAX_TIME_RATIO)):
        if ratio > target:
            print(f"MISSED TARGET: {name} ratio {ratio:.3f} > {target}")
    common.write_json(args.json, summary)


if __name__ == "__main__":
    main()
