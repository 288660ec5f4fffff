"""Benchmark 2: one DPO optimizer step, minirlhf's against a deliberately naive one.

    python benchmarks/bench_dpo_step.py [--json out.json]               # CPU: tiny model (common.py)
    python benchmarks/bench_dpo_step.py --device cuda --json out.json   # GPU: Qwen2.5-0.5B shape, bf16, MFU

Both variants take the same initial weights, the same batch of preference pairs, the same loss
function (``minirlhf.core.dpo_losses.dpo_loss``, sigmoid, β = 0.1) and the same AdamW step through
the trainers' ``backward_weighted``/``optimizer_step`` (bf16 autocast on CUDA). Only the
systems choices differ:

- **ours** (``minirlhf/train/dpo.py``): ``pairwise_preference_loss`` runs one forward over the ``[2B, L]``
  chosen-then-rejected batch (``collate_preference``), asks the model for logits only from the
  first response column on (``logits_to_keep``) and gathers log-probs with the chunked
  ``gather_logprobs``. π_ref's log-probs were computed once before training
  (``reference_logps``) and the reference model freed, so a step holds one model.
- **naive**: a forward for the chosen and another for the rejected responses, full-sequence
  logits, ``log_softmax(-1).gather(...)``; the reference model stays loaded and runs both
  forwards again every step.

The script asserts that both give the same loss on the first step (the policy and the reference
are different random models, so the loss is not just log 2).

Reported: step time and tokens/s (real, non-padding tokens of chosen + rejected per step), with
the ratio naive ÷ ours; ours again with the one-time reference pass charged to every step (the
cost per step of a 1-epoch run, the least favourable case for caching); peak memory of the whole
training state (weights, gradients, AdamW, activations; fresh process per variant) and of the
step alone (above what is held before it). On CUDA, MFU = model FLOPs / time / bf16 peak
(989 TFLOP/s for H100 and H200), model FLOPs = 6·N·tokens for the policy's forward+backward, plus
2·N·tokens for the naive step's reference forwards (N = all parameters, the tied head counted
once; attention FLOPs left out). The 6·N·tokens convention counts the LM head on prompt tokens
too, which ours skips, so ours' MFU is in "model FLOPs" (work the step stands for), not hardware
FLOPs. Target: ≥ 35%.
"""
import argparse
import copy
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py; it also puts the repository on sys.path)

from minirlhf.core.dpo_losses import dpo_loss  # noqa: E402
from minirlhf.core.logprobs import sequence_logprobs, shift_for_next_token  # noqa: E402
from minirlhf.data.collate import collate_preference, collate_sft  # noqa: E402
from minirlhf.models.forward import position_ids_from_attention_mask  # noqa: E402
from minirlhf.data.collate import to_device  # noqa: E402
from minirlhf.train.dpo import DPOArgs, pairwise_preference_loss  # noqa: E402
from minirlhf.train.optim import (  # noqa: E402
    DivergenceGuard, backward_weighted, make_optimizer as adamw, make_scheduler, optimizer_step as adamw_step,
)
from minirlhf.train.preference import pair_rows, reference_logps  # noqa: E402
from minirlhf.train.precision import Precision  # noqa: E402

VARIANTS = ("ours", "naive")
BETA = 0.1
MIN_MFU = 0.35


# ---------------------------------------------------------------------------------------------
# The two steps
# ---------------------------------------------------------------------------------------------


def ours_setup(pairs, policy, reference, device):
    """The trainer's flow: cache log π_ref of every response in one no-grad pass, then free π_ref.
    Returns the training batch (``[2B, L]`` plus the cached reference log-probs)."""
    pad_id = policy.config.pad_token_id
    cached = reference_logps(reference, pair_rows(pairs), pad_id, batch_size=len(pairs), device=device)
    batch = collate_preference(pairs, pad_id)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = cached.view(2, -1)
    return to_device(batch, device)


def ours_loss(policy, batch):
    return pairwise_preference_loss(DPOArgs(loss="sigmoid", beta=BETA), policy, batch)


def naive_setup(pairs, pad_id, device):
    """Chosen and rejected as two batches, each padded to its own length."""
    chosen = collate_sft([{"input_ids": p["chosen_input_ids"], "response_mask": p["chosen_response_mask"]}
                          for p in pairs], pad_id)
    rejected = collate_sft([{"input_ids": p["rejected_input_ids"], "response_mask": p["rejected_response_mask"]}
                            for p in pairs], pad_id)
    return to_device(chosen, device), to_device(rejected, device)


def naive_sequence_logps(model, batch):
    """Summed response log-probs the textbook way: logits for every position, a full log-softmax."""
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=position_ids_from_attention_mask(batch["attention_mask"]), use_cache=False)
    logits, labels, mask = shift_for_next_token(output.logits, batch["input_ids"], batch["response_mask"])
    token_logps = logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()
    return sequence_logprobs(token_logps, mask)


def naive_loss(policy, reference, batches):
    chosen, rejected = batches
    policy_chosen, policy_rejected = naive_sequence_logps(policy, chosen), naive_sequence_logps(policy, rejected)
    with torch.no_grad():  # π_ref again, every step
        ref_chosen, ref_rejected = naive_sequence_logps(reference, chosen), naive_sequence_logps(reference, rejected)
    losses, _, _ = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, BETA, "sigmoid")
    return losses.mean(), {}


def forward_backward(loss_fn, batch, device, guard, step):
    """One micro-batch's forward and backward exactly as the trainers run it; returns the metrics."""
    with Precision("auto", device).autocast():
        loss, metrics = loss_fn(batch)
    return backward_weighted(loss, metrics, 1.0, {}, guard=guard, step=step, example_ids=[0])


def optimizer_step(policy, optimizer, scheduler, loss_fn, batch, device):
    """One optimizer step exactly as the trainers take it; returns the loss."""
    guard = DivergenceGuard(lambda: None)
    metrics = forward_backward(loss_fn, batch, device, guard, step=0)
    adamw_step(policy, optimizer, scheduler, 1.0, guard=guard, step=0, example_ids=[0])
    return float(metrics["loss"])


def make_optimizer(policy):
    optimizer = adamw(policy.parameters(), lr=1e-6)
    return optimizer, make_scheduler(optimizer, 10**6, schedule="constant")


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def measure_memory(args, variant):
    """Worker (fresh process): peak memory of ``variant``'s training state and of one step."""
    device = torch.device(args.device)
    config = common.model_config(args.shape)
    pairs = common.make_pairs(args.pairs, args.prompt_len, args.response_len, config)
    memory = common.PeakMemory(device).start()
    policy = common.build_model(args.shape, device, seed=1).train()
    reference = common.build_model(args.shape, device, seed=0).eval().requires_grad_(False)
    if variant == "ours":
        batch = ours_setup(pairs, policy, reference, device)
        del reference  # the trainer frees π_ref once its log-probs are cached
        gc.collect()

        def loss_fn(b):
            return ours_loss(policy, b)
    else:
        batch = naive_setup(pairs, config.pad_token_id, device)

        def loss_fn(b):
            return naive_loss(policy, reference, b)
    optimizer, scheduler = make_optimizer(policy)
    optimizer_step(policy, optimizer, scheduler, loss_fn, batch, device)  # allocates AdamW's state
    # A steady-state forward + backward: its peak above the weights, AdamW state and batch held
    # before it, less the parameter gradients it leaves behind (the same for both variants).
    step = common.PeakMemory(device).start()
    guard = DivergenceGuard(lambda: None)
    forward_backward(loss_fn, batch, device, guard, step=1)
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in policy.parameters() if p.grad is not None)
    activations = step.peak_extra() - gradients
    adamw_step(policy, optimizer, scheduler, 1.0, guard=guard, step=1, example_ids=[0])
    return {"variant": variant, "peak_total_bytes": memory.peak_extra(), "peak_activation_bytes": activations}


def measure_time(args):
    """Both steps, alternately, in this process; the first-step losses must agree."""
    device = torch.device(args.device)
    config = common.model_config(args.shape)
    pairs = common.make_pairs(args.pairs, args.prompt_len, args.response_len, config)
    reference = common.build_model(args.shape, device, seed=0).eval().requires_grad_(False)
    start_policy = common.build_model(args.shape, device, seed=1).train()
    policies = {v: copy.deepcopy(start_policy) for v in VARIANTS}
    del start_policy
    optimizers = {v: make_optimizer(policies[v]) for v in VARIANTS}
    ours_batch = ours_setup(pairs, policies["ours"], reference, device)
    naive_batches = naive_setup(pairs, config.pad_token_id, device)
    losses = {v: [] for v in VARIANTS}

    def ours_step():
        losses["ours"].append(optimizer_step(policies["ours"], *optimizers["ours"],
                                             lambda b: ours_loss(policies["ours"], b), ours_batch, device))

    def naive_step():
        losses["naive"].append(optimizer_step(policies["naive"], *optimizers["naive"],
                                              lambda b: naive_loss(policies["naive"], reference, b),
                                              naive_batches, device))

    def reference_pass():
        ours_setup(pairs, policies["ours"], reference, device)

    seconds = common.time_alternately({"ours": ours_step, "naive": naive_step, "reference_pass": reference_pass},
                                      device, repeats=args.repeats, warmup=args.warmup)
    tolerance = 3e-2 if device.type == "cuda" else 1e-4  # bf16 autocast vs float32
    first = {v: losses[v][0] for v in VARIANTS}
    if abs(first["ours"] - first["naive"]) > tolerance:
        raise AssertionError(f"the two steps compute different losses on the same weights and data: {first}")
    return seconds, first, sum(len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in pairs), \
        common.num_parameters(reference)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", help="model shape in common.model_config (default: tiny on CPU, "
                                        "qwen2.5-0.5b on CUDA)")
    parser.add_argument("--pairs", type=int, help="preference pairs per step (default 4 on CPU, 8 on CUDA)")
    parser.add_argument("--prompt-len", type=int, help="longest prompt (default 96 on CPU, 512 on CUDA)")
    parser.add_argument("--response-len", type=int, help="longest response (default 48 on CPU, 256 on CUDA)")
    common.add_common_arguments(parser)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)  # memory of one variant
    args = parser.parse_args()
    common.setup_threads(args)
    on_cuda = args.device == "cuda"
    args.shape = args.shape or common.default_shape(args.device)
    args.pairs = args.pairs or (8 if on_cuda else 4)
    args.prompt_len = args.prompt_len or (512 if on_cuda else 96)
    args.response_len = args.response_len or (256 if on_cuda else 48)
    sizes = ["--device", args.device, "--threads", str(args.threads), "--shape", args.shape, "--pairs", str(args.pairs),
             "--prompt-len", str(args.prompt_len), "--response-len", str(args.response_len)]
    if args.worker:
        import json

        print(json.dumps(measure_memory(args, args.worker)))
        return

    memory = {v: common.run_worker(__file__, sizes + ["--worker", v]) for v in VARIANTS}
    seconds, first_losses, tokens, n_params = measure_time(args)
    ours_amortised = seconds["ours"] + seconds["reference_pass"]
    results = {}
    for name, step_seconds in (("ours", seconds["ours"]), ("ours + reference pass", ours_amortised),
                               ("naive", seconds["naive"])):
        variant = "naive" if name == "naive" else "ours"
        flops = (8 if variant == "naive" else 6) * n_params * tokens
        results[name] = {
            "step_seconds": step_seconds,
            "tokens_per_second": tokens / step_seconds,
            "speedup_vs_naive": seconds["naive"] / step_seconds,
            "mfu": common.mfu(flops, step_seconds, args.device) if name != "ours + reference pass" else None,
            "peak_total_bytes": memory[variant]["peak_total_bytes"],
            "peak_activation_bytes": memory[variant]["peak_activation_bytes"],
        }
    summary = {
        "benchmark": "DPO step",
        "device": common.device_name(args.device),
        "model": {"shape": args.shape, "parameters": n_params},
        "batch": {"pairs": args.pairs, "prompt_len": args.prompt_len, "response_len": args.response_len,
                  "tokens_per_step": tokens},
        "first_step_loss": first_losses,
        "torch": torch.__version__,
        "results": results,
    }
    naive = results["naive"]
    common.print_table(
        f"DPO step, {args.shape} model ({n_params / 1e6:.1f}M parameters), {args.pairs} pairs, "
        f"{tokens} tokens/step: ratios (> 1 = ours is better)",
        ["variant", "tokens/s, ours ÷ naive", "peak memory total, naive ÷ ours", "peak activations, naive ÷ ours"],
        [[name, r["speedup_vs_naive"], naive["peak_total_bytes"] / r["peak_total_bytes"],
          naive["peak_activation_bytes"] / r["peak_activation_bytes"]]
         for name, r in results.items() if name != "naive"],
    )
    common.print_table(
        f"absolute, on {summary['device']}",
        ["variant", "step (s)", "tokens/s", "peak total (MiB)", "peak activations (MiB)", "MFU"],
        [[name, r["step_seconds"], r["tokens_per_second"], common.mib(r["peak_total_bytes"]),
          common.mib(r["peak_activation_bytes"]), r["mfu"]] for name, r in results.items()],
    )
    print(f"\nfirst-step loss: ours {first_losses['ours']:.6f}, naive {first_losses['naive']:.6f} (asserted equal)")
    if results["ours"]["mfu"] is not None and results["ours"]["mfu"] < MIN_MFU:
        print(f"MISSED TARGET: ours' MFU {results['ours']['mfu']:.1%} < {MIN_MFU:.0%}")
    common.write_json(args.json, summary)


if __name__ == "__main__":
    main()
