"""Benchmark 6: the KV-cached sampler on a policy that stops, against transformers' ``generate``.

    python benchmarks/bench_sampling.py [--json out.json]                # the toy world's SFT policy, CPU
    python benchmarks/bench_sampling.py --device cuda --json out.json

``bench_grpo_step.py`` samples from random weights, which never stop: every row runs to the budget.
A trained policy stops at different lengths, and then what the sampler does with finished rows
matters: ``generate_rollouts`` drops them from the batch and the KV cache, while
``model.generate`` keeps decoding them (as padding) until the last row stops. Both sample at
temperature 1 from the toy world's SFT policy, ``--samples`` responses to each of the toy world's
held-out prompts, with the same budget and stop tokens.

Reported: response tokens per second of each (the tokens that end up in responses, EOS included)
and their ratio, and the mean response length (the two sample the same distribution, so the
lengths agree up to sampling noise).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py; it also puts the repository on sys.path)

from minirlhf.data.datasets import load_prompt_data  # noqa: E402
from minirlhf.data.prompts import prompt_batch  # noqa: E402
from minirlhf.models.policy import load_policy, load_tokenizer  # noqa: E402
from minirlhf.models.sampling import eos_token_ids, generate_rollouts  # noqa: E402
from minirlhf.train.toy_world import load_toy_world  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="held-out toy prompts per batch")
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation budget")
    common.add_common_arguments(parser)
    parser.set_defaults(repeats=3)
    args = parser.parse_args()
    common.setup_threads(args)
    device = torch.device(args.device)

    world = load_toy_world()
    policy = load_policy(world.sft_model, device=device).eval()
    tokenizer = load_tokenizer(world.sft_model)
    examples, _ = load_prompt_data(str(world.eval_prompts), "prompt", tokenizer, 64)
    batch = prompt_batch(examples[: args.prompts], tokenizer.pad_token_id, device)
    generator = torch.Generator(device).manual_seed(0)
    out = {}

    def ours():
        rollout = generate_rollouts(policy, tokenizer, batch, args.max_new_tokens, n_per_prompt=args.samples,
                                    generator=generator)
        out["ours"] = rollout["response_length"].float()

    def hf_generate():
        ids = batch["input_ids"].repeat_interleave(args.samples, dim=0)
        sequences = policy.generate(input_ids=ids, attention_mask=batch["attention_mask"].repeat_interleave(
            args.samples, dim=0), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=args.max_new_tokens, eos_token_id=eos_token_ids(policy, tokenizer),
            pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
        stops = torch.isin(sequences, torch.tensor(eos_token_ids(policy, tokenizer), device=device))
        first_stop = torch.where(stops.any(-1), stops.float().argmax(-1) + 1, sequences.shape[1])
        out["transformers generate"] = first_stop.float()

    with torch.no_grad():
        seconds = common.time_alternately({"ours": ours, "transformers generate": hf_generate}, device,
                                          repeats=args.repeats, warmup=args.warmup)
    rows = args.prompts * args.samples
    results = {name: {"seconds": s, "response_tokens_per_second": float(out[name].sum()) / s,
                      "mean_response_length": float(out[name].mean())} for name, s in seconds.items()}
    ratio = results["ours"]["response_tokens_per_second"] / results["transformers generate"]["response_tokens_per_second"]
    summary = {"benchmark": "sampling", "device": common.device_name(args.device), "rows": rows,
               "max_new_tokens": args.max_new_tokens, "torch": torch.__version__, "results": results,
               "ratio_ours_to_generate": ratio}
    common.print_table(f"sampling from the toy SFT policy: {rows} rows, budget {args.max_new_tokens} tokens",
                       ["quantity", "value"], [["response tokens/s, ours ÷ transformers generate", ratio]])
    common.print_table(f"absolute, on {summary['device']}", ["sampler", "response tokens/s", "seconds",
                                                             "mean length"],
                       [[name, r["response_tokens_per_second"], r["seconds"], r["mean_response_length"]]
                        for name, r in results.items()])
    common.write_json(args.json, summary)


if __name__ == "__main__":
    main()
