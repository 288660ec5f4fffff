"""Generate responses for a prompt set: ``python -m minirlhf generate``.

    python -m minirlhf generate --model runs/ppo/final --prompts prompts.jsonl --out gen.jsonl
    python -m minirlhf generate                     # the toy SFT policy on the toy eval prompts

Writes one JSON line per (prompt, sample)::

    {"prompt": ..., "response": ..., "sample": 0, "ended": true, "response_tokens": 9,
     "gold": 2.0, "gold_helpful": 2.0, "gold_harmless": 0.0}

``ended`` is False when the response was cut at ``--max-new-tokens``. The ``gold*`` fields are
the toy world's gold reward (present only for toy-world prompts). The file is written to a
temporary name and renamed, so an interrupted run leaves no half-written output. Sampling uses
the same KV-cached loop as the trainers (``minirlhf.models.sampling``); ``--temperature 0`` is greedy.
"""
import dataclasses
import sys
import typing
from pathlib import Path

import torch

from minirlhf.data.atomic import write_jsonl_atomic
from minirlhf.data.datasets import load_prompt_data
from minirlhf.data.prompts import prompt_batch
from minirlhf.models.policy import load_policy, load_tokenizer
from minirlhf.models.sampling import generate_rollouts
from minirlhf.toy.measure import gold_scores, is_toy_prompt
from minirlhf.train.args import parse_args
from minirlhf.train.runtime import autocast, seed_everything, select_device
from minirlhf.train.toy_world import load_toy_world


@dataclasses.dataclass
class GenerateArgs:
    """Generate responses for a prompt set and write them as JSONL."""

    model: typing.Optional[str] = None
    """Policy: hub name or local path (default: the toy world's SFT policy)."""
    prompts: typing.Optional[str] = None
    """Prompt file, JSONL/JSON (default: the toy world's eval prompts)."""
    template: str = "prompt"
    """Template of the prompt file (prompt: a `prompt` or `question` field, optional `answer`)."""
    out: str = "gen.jsonl"
    """Output JSONL file."""
    n: int = 1
    """Samples per prompt."""
    max_new_tokens: int = 32
    """Generation budget per response (tokens)."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    batch_size: int = 64
    """Prompts per generation batch."""
    max_prompt_len: int = 256
    """Maximum prompt tokens (truncated from the left)."""
    system_prompt: typing.Optional[str] = None
    """System prompt put in front of every prompt (default: the template's)."""
    seed: int = 0
    """Random seed of the sampling."""
    device: typing.Optional[str] = None
    """'cuda', 'cpu', ... (default: CUDA when available)."""


def generate_records(model, tokenizer, examples, n=1, max_new_tokens=32, temperature=1.0, batch_size=64):
    """Responses to ``examples`` (from ``load_prompt_data``), ``n`` per prompt, in file order.

    Returns a list of dicts: ``prompt``, ``response``, ``sample`` (0..n-1), ``ended``,
    ``response_tokens``, ``answer`` (when the prompt has one), and the toy world's ``gold``,
    ``gold_helpful``, ``gold_harmless`` for toy prompts.
    """
    device = next(model.parameters()).device
    records = []
    for first in range(0, len(examples), batch_size):
        chunk = examples[first : first + batch_size]
        batch = prompt_batch(chunk, tokenizer.pad_token_id, device)
        with torch.no_grad(), autocast(device):
            rollout = generate_rollouts(model, tokenizer, batch, max_new_tokens, n_per_prompt=n, temperature=temperature)
        for row, response in enumerate(rollout["responses"]):
            example = chunk[row // n]
            record = {"prompt": example["prompt"], "response": response, "sample": row % n,
                      "ended": bool(rollout["ended"][row]), "response_tokens": int(rollout["response_length"][row])}
            if example.get("answer") is not None:
                record["answer"] = example["answer"]
            text = rollout["prompts"][row]  # the user's request as text
            if is_toy_prompt(text):  # only toy-world prompts have a gold reward
                record.update(gold_scores(text, response))
            records.append(record)
    return records


def generate(args: GenerateArgs):
    """Run ``generate`` with ``args``; returns the output path."""
    if args.model is None or args.prompts is None:
        world = load_toy_world()
        args.model = args.model or str(world.sft_model)
        args.prompts = args.prompts or str(world.eval_prompts)
    seed_everything(args.seed)
    device = select_device(args.device)
    tokenizer = load_tokenizer(args.model)
    model = load_policy(args.model, device=device)
    examples, report = load_prompt_data(args.prompts, args.template, tokenizer, args.max_prompt_len, args.system_prompt)
    print(report, file=sys.stderr)
    records = generate_records(model, tokenizer, examples, args.n, args.max_new_tokens, args.temperature, args.batch_size)
    write_jsonl_atomic(args.out, records)
    golds = [r["gold"] for r in records if "gold" in r]
    if golds:
        print(f"mean gold reward {sum(golds) / len(golds):.3f} over {len(golds)} toy-world responses", file=sys.stderr)
    return Path(args.out)


def main(argv=None):
    args = parse_args(GenerateArgs, argv, prog="python -m minirlhf generate")
    print(f"wrote {generate(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
