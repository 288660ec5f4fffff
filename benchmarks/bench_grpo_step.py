"""Benchmark 3: where a GRPO step's time goes, and what the KV cache buys generation.

    python benchmarks/bench_grpo_step.py [--json out.json]               # CPU: tiny model (common.py)
    python benchmarks/bench_grpo_step.py --device cuda --json out.json   # GPU: Qwen2.5-0.5B shape, bf16

**The step** is ``minirlhf/train/grpo.py``'s iteration, phase by phase, with its own functions:
``generate_rollouts`` (the hand-written sampler with a KV cache), a reward, ``rollout_logprobs``
under π_old and π_ref, ``group_advantages``, and one on-policy update (``grpo_step_loss`` through
the trainers' ``backward_weighted``/``optimizer_step``; bf16 autocast on CUDA). The models are
random, so the reward is a stand-in computed from the tokens (the share of even token ids in the
response; a rule reward such as "math" costs about as little) and responses are decoded as token
ids. Random weights rarely sample EOS, so every response runs to the budget: the worst case for
generation. Reported: each phase's share of the step time (median over steps).

**KV cache.** Greedy generation of the same tokens two ways: ``sample_responses`` (one prefill,
then one column per token reading the cache), and a naive loop that runs the model over the whole
prefix for every new token (``use_cache=False``, last position's logits only). Reported:
tokens/s of each and their ratio, and the fraction of generated tokens on which the two agree
(float rounding in a different summation order may flip a near-tie of an untrained model, after
which the two sequences part ways).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py; it also puts the repository on sys.path)

from minirlhf.core.grpo import group_advantages  # noqa: E402
from minirlhf.data.collate import collate_prompts, to_device  # noqa: E402
from minirlhf.models.forward import position_ids_from_attention_mask, rollout_logprobs  # noqa: E402
from minirlhf.models.policy import make_reference  # noqa: E402
from minirlhf.models.sampling import generate_rollouts, sample_responses  # noqa: E402
from minirlhf.train.batches import micro_batches, select_rows  # noqa: E402
from minirlhf.train.grpo import GRPOArgs, grpo_step_loss, micro_batch_weights  # noqa: E402
from minirlhf.train.optim import (  # noqa: E402
    DivergenceGuard, backward_weighted, make_optimizer, make_scheduler, optimizer_step,
)
from minirlhf.train.precision import Precision  # noqa: E402

PHASES = ("generation", "reward", "log-probs (old + ref)", "advantages", "update")


class TokenIdDecoder:
    """The little of a tokenizer that ``generate_rollouts`` uses; decodes ids as numbers (the
    models are untrained, there is no text to read)."""

    def __init__(self, config):
        self.pad_token_id, self.eos_token_id = config.pad_token_id, config.eos_token_id

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(map(str, row)) for row in rows]


def make_prompts(num_prompts, prompt_len, config, device, seed=0):
    """Left-padded random prompts, lengths uniform in ``[prompt_len/2, prompt_len]``."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(num_prompts):
        n = int(torch.randint(prompt_len // 2, prompt_len + 1, (), generator=generator))
        ids = torch.randint(3, config.vocab_size, (n,), generator=generator)
        examples.append({"input_ids": ids.tolist()})
    return to_device(collate_prompts(examples, config.pad_token_id), device)


def token_reward(rollout):
    """Stand-in reward ``[B]``: the share of even token ids among the response tokens."""
    mask = rollout["response_mask"].bool()
    even = (rollout["input_ids"] % 2 == 0) & mask
    return even.sum(-1).float() / mask.sum(-1).clamp(min=1)


def grpo_step(policy, reference, optimizer, scheduler, prompts, args, device, generator):
    """One GRPO iteration (as in ``train_grpo``); returns ``{phase: seconds}``."""
    seconds = {}

    def phase(name, fn):
        common.sync(device)
        start = time.perf_counter()
        out = fn()
        common.sync(device)
        seconds[name] = time.perf_counter() - start
        return out

    with Precision("auto", device).autocast():
        rollout = phase("generation", lambda: generate_rollouts(
            policy, TokenIdDecoder(policy.config), prompts, args.max_new_tokens, n_per_prompt=args.group_size,
            temperature=args.temperature, generator=generator))
        rewards = phase("reward", lambda: token_reward(rollout))

        def logprobs():
            old, _ = rollout_logprobs(policy, rollout, args.micro_batch_size, args.temperature)
            ref, _ = rollout_logprobs(reference, rollout, args.micro_batch_size, args.temperature)
            return old, ref

        old_logprobs, ref_logprobs = phase("log-probs (old + ref)", logprobs)
    advantages = phase("advantages", lambda: group_advantages(rewards, args.group_size))
    data = {k: rollout[k] for k in ("input_ids", "attention_mask", "response_mask")}
    data.update(old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages)

    def update():
        rows = list(range(len(rewards)))
        micro = [(part, select_rows(data, part)) for part in micro_batches(rows, args.micro_batch_size)]
        guard, totals = DivergenceGuard(lambda: None), {}
        for (ids, batch), weight in zip(micro, micro_batch_weights(micro, args.aggregation)):
            with Precision("auto", device).autocast():
                loss, metrics = grpo_step_loss(policy, batch, args)
            backward_weighted(loss, metrics, weight, totals, guard=guard, step=0, example_ids=ids)
        optimizer_step(policy, optimizer, scheduler, args.max_grad_norm, guard=guard, step=0, example_ids=rows)

    phase("update", update)
    return seconds, int(rollout["response_mask"].sum())


@torch.no_grad()
def generate_without_cache(model, prompt_ids, prompt_mask, max_new_tokens):
    """Greedy decoding that recomputes the whole prefix for every token (no KV cache). It asks for
    the last position's logits only, so the no-cache side does no avoidable LM-head work."""
    ids, mask = prompt_ids, prompt_mask.long()
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask),
                       use_cache=False, logits_to_keep=1).logits[:, -1, :]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
    return ids[:, prompt_ids.shape[1]:]


def compare_cache(policy, prompts, args, device):
    """Tokens/s of greedy generation with and without the KV cache, on ``args.compare_rows`` rows."""
    policy.eval()
    ids = prompts["input_ids"].repeat_interleave(args.group_size, dim=0)[: args.compare_rows]
    mask = prompts["attention_mask"].repeat_interleave(args.group_size, dim=0)[: args.compare_rows]
    never = [-1]  # no stop token: both loops generate exactly max_new_tokens
    out = {}
    with Precision("auto", device).autocast():
        functions = {
            "with KV cache": lambda: out.__setitem__("with KV cache", sample_responses(
                policy, ids, mask, args.max_new_tokens, never, policy.config.pad_token_id, temperature=0)[0]),
            "without cache": lambda: out.__setitem__("without cache", generate_without_cache(
                policy, ids, mask, args.max_new_tokens)),
        }
        seconds = common.time_alternately(functions, device, repeats=args.compare_repeats, warmup=0)
    policy.train()
    agreement = float((out["with KV cache"] == out["without cache"]).float().mean())
    tokens = len(ids) * args.max_new_tokens
    return {name: {"seconds": s, "tokens_per_second": tokens / s} for name, s in seconds.items()}, agreement


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", help="model shape in common.model_config (default: tiny on CPU, "
                                        "qwen2.5-0.5b on CUDA)")
    parser.add_argument("--prompts", type=int, help="prompts per step (default 4 on CPU, 8 on CUDA)")
    parser.add_argument("--group-size", type=int, help="samples per prompt (default 4 on CPU, 8 on CUDA)")
    parser.add_argument("--prompt-len", type=int, help="longest prompt (default 48 on CPU, 256 on CUDA)")
    parser.add_argument("--max-new-tokens", type=int, help="generation budget (default 32 on CPU, 256 on CUDA)")
    parser.add_argument("--compare-rows", type=int, help="rows for the cache comparison (default 8 on CPU, "
                                                         "all 64 on CUDA)")
    parser.add_argument("--compare-repeats", type=int, default=2, help="timed rounds of the cache comparison")
    common.add_common_arguments(parser)
    parser.set_defaults(repeats=3)
    args = parser.parse_args()
    common.setup_threads(args)
    on_cuda = args.device == "cuda"
    device = torch.device(args.device)
    args.shape = args.shape or common.default_shape(args.device)
    args.prompts = args.prompts or (8 if on_cuda else 4)
    args.group_size = args.group_size or (8 if on_cuda else 4)
    args.prompt_len = args.prompt_len or (256 if on_cuda else 48)
    args.max_new_tokens = args.max_new_tokens or (256 if on_cuda else 32)
    args.compare_rows = args.compare_rows or (args.prompts * args.group_size if on_cuda else 8)
    grpo_args = GRPOArgs(batch_size=args.prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                         micro_batch_size=16 if on_cuda else 0)

    policy = common.build_model(args.shape, device, seed=0).train()
    reference = make_reference(policy)
    optimizer = make_optimizer(policy.parameters(), grpo_args.lr)
    scheduler = make_scheduler(optimizer, 10**6, schedule="constant")
    prompts = make_prompts(args.prompts, args.prompt_len, policy.config, device)
    generator = torch.Generator(device).manual_seed(0)

    steps, response_tokens = [], 0
    for i in range(args.warmup + args.repeats):
        seconds, response_tokens = grpo_step(policy, reference, optimizer, scheduler, prompts, grpo_args, device,
                                             generator)
        if i >= args.warmup:
            steps.append(seconds)
    phase_seconds = {p: statistics.median(s[p] for s in steps) for p in PHASES}
    step_seconds = statistics.median(sum(s.values()) for s in steps)
    cache, agreement = compare_cache(policy, prompts, args, device)
    speedup = cache["with KV cache"]["tokens_per_second"] / cache["without cache"]["tokens_per_second"]

    summary = {
        "benchmark": "GRPO step",
        "device": common.device_name(args.device),
        "model": {"shape": args.shape, "parameters": common.num_parameters(policy)},
        "step": {"prompts": args.prompts, "group_size": args.group_size, "prompt_len": args.prompt_len,
                 "max_new_tokens": args.max_new_tokens, "response_tokens": response_tokens},
        "torch": torch.__version__,
        "step_seconds": step_seconds,
        "phase_seconds": phase_seconds,
        "phase_share": {p: s / sum(phase_seconds.values()) for p, s in phase_seconds.items()},
        "cache": {"rows": args.compare_rows, "new_tokens": args.max_new_tokens, "speedup": speedup,
                  "greedy_agreement": agreement, **cache},
    }
    common.print_table(
        f"GRPO step, {args.shape} model ({summary['model']['parameters'] / 1e6:.1f}M parameters), "
        f"{args.prompts} prompts × {args.group_size} samples, ≤{args.prompt_len} prompt + "
        f"{args.max_new_tokens} new tokens: ratios",
        ["quantity", "value"],
        [["generation share of the step", summary["phase_share"]["generation"]],
         [f"generation tokens/s, KV cache ÷ no cache ({args.compare_rows} rows)", speedup],
         ["greedy tokens identical with and without cache", agreement]],
    )
    common.print_table(
        f"absolute, on {summary['device']}",
        ["phase", "seconds (median)", "share"],
        [[p, phase_seconds[p], summary["phase_share"][p]] for p in PHASES] + [["step", step_seconds, 1.0]],
    )
    common.print_table(
        f"generation throughput, on {summary['device']}", ["generation", "tokens/s", "seconds"],
        [[name, c["tokens_per_second"], c["seconds"]] for name, c in cache.items()]
        + [["in the GRPO step (sampling, with cache)", response_tokens / phase_seconds["generation"],
            phase_seconds["generation"]]],
    )
    common.write_json(args.json, summary)


if __name__ == "__main__":
    main()
