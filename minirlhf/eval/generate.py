"""Generate responses for a prompt set: ``python -m minirlhf generate``.

    python -m minirlhf generate --model runs/ppo/final --prompts prompts.jsonl --out gen.jsonl
    python -m minirlhf generate                     # the toy SFT policy on the toy eval prompts

Writes one JSON line per (prompt, sample)::

    {"prompt": ..., "response": ..., "sample": 0, "ended": true, "response_tokens": 9,
     "prompt_ids": [...], "response_ids": [...], "gold": 2.0, "gold_helpful": 2.0, "gold_harmless": 0.0}

``ended`` is False when the response was cut at ``--max-new-tokens``. ``prompt_ids`` and
``response_ids`` are the tokens exactly as the policy saw and sampled them (the stop token
included when ``ended``): ``score`` and ``compare`` score those, as the trainers' reward does. The
``gold*`` fields are the toy world's gold reward (present only for toy-world prompts). Sampling
uses the same KV-cached loop as the trainers (``minirlhf.models.sampling``); ``--temperature 0`` is
greedy.

**Crash-safe and resumable.** Each batch of prompts samples with its own generator, seeded by
``(--seed, the batch's first prompt)``, so a batch draws the same responses whether or not the
run was interrupted before it. Finished batches are appended to ``<out>.partial`` (its first line
records the arguments); a run interrupted at any moment and started again with the same
arguments continues after the last complete batch. ``<out>`` itself appears only at the end,
complete (written to a temporary name and renamed).
"""
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

import numpy as np
import torch

from minirlhf.data.atomic import write_jsonl_atomic
from minirlhf.data.datasets import load_prompt_data
from minirlhf.data.prompts import prompt_batch
from minirlhf.errors import MinirlhfError
from minirlhf.models.policy import load_policy, load_tokenizer
from minirlhf.models.sampling import generate_rollouts
from minirlhf.toy.measure import gold_scores, is_toy_prompt
from minirlhf.train.args import parse_args
from minirlhf.train.precision import Precision
from minirlhf.train.runtime import select_device
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
    """Random seed of the sampling (each batch of prompts is seeded by it and its position)."""
    device: typing.Optional[str] = None
    """'cuda', 'cpu', ... (default: CUDA when available)."""


def batch_generator(seed, first, device):
    """The sampling generator of the batch whose first prompt is number ``first``: seeded by
    ``(seed, first)``, so the batch's responses do not depend on the batches before it."""
    state = int(np.random.SeedSequence([seed, first]).generate_state(1)[0])
    return torch.Generator(device).manual_seed(state)


def generate_records(model, tokenizer, examples, n=1, max_new_tokens=32, temperature=1.0, batch_size=64, seed=None,
                     first=0):
    """Responses to ``examples`` (from ``load_prompt_data``), ``n`` per prompt, in file order.

    Returns a list of dicts: ``prompt``, ``response``, ``sample`` (0..n-1), ``ended``,
    ``response_tokens``, ``prompt_ids``, ``response_ids``, ``answer`` (when the prompt has one), and
    the toy world's ``gold``, ``gold_helpful``, ``gold_harmless`` for toy prompts. With ``seed``,
    each batch samples with ``batch_generator(seed, first + its first index)``; else with torch's
    global generator.
    """
    device = next(model.parameters()).device
    records = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = prompt_batch(chunk, tokenizer.pad_token_id, device)
        generator = None if seed is None else batch_generator(seed, first + start, device)
        with torch.no_grad(), Precision("auto", device).autocast():
            rollout = generate_rollouts(model, tokenizer, batch, max_new_tokens, n_per_prompt=n, temperature=temperature,
                                        generator=generator)
        width = batch["input_ids"].shape[1]
        for row, response in enumerate(rollout["responses"]):
            example, length = chunk[row // n], int(rollout["response_length"][row])
            record = {"prompt": example["prompt"], "response": response, "sample": row % n,
                      "ended": bool(rollout["ended"][row]), "response_tokens": length,
                      "prompt_ids": list(example["input_ids"]),
                      "response_ids": rollout["input_ids"][row, width : width + length].tolist()}
            if example.get("answer") is not None:
                record["answer"] = example["answer"]
            text = rollout["prompts"][row]  # the user's request as text
            if is_toy_prompt(text):  # only toy-world prompts have a gold reward
                record.update(gold_scores(text, response))
            records.append(record)
    return records


def generate(args: GenerateArgs):
    """Run ``generate`` with ``args``; returns the output path. Resumes ``<out>.partial`` (see the
    module docstring)."""
    if args.model is None or args.prompts is None:
        world = load_toy_world()
        args.model = args.model or str(world.sft_model)
        args.prompts = args.prompts or str(world.eval_prompts)
    if not args.temperature >= 0:
        raise MinirlhfError(f"generate: --temperature {args.temperature}: must be >= 0 (0 = greedy)")
    for name in ("n", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise MinirlhfError(f"generate: --{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    out = Path(args.out)
    if out.is_dir():
        raise MinirlhfError(f"generate: --out {out} is a directory; give a file name such as {out / 'gen.jsonl'}")
    device = select_device(args.device)
    tokenizer = load_tokenizer(args.model)
    model = load_policy(args.model, device=device)
    examples, report = load_prompt_data(args.prompts, args.template, tokenizer, args.max_prompt_len, args.system_prompt)
    print(report, file=sys.stderr)

    # Resume: the complete batches of an interrupted run with the same arguments.
    partial = out.with_name(out.name + ".partial")
    header = {"minirlhf_generate": {**dataclasses.asdict(args), "out": None, "device": None,
                                    "files": file_signature(args.model) + file_signature(args.prompts)}}
    records = completed_batches(partial, header, args.batch_size * args.n, len(examples) * args.n)
    done_prompts = len(records) // args.n
    if done_prompts:
        print(f"resuming {partial}: {done_prompts} of {len(examples)} prompts done", file=sys.stderr)
    write_jsonl_atomic(partial, [header] + records)
    with open(partial, "a", encoding="utf-8") as f:
        for start in range(done_prompts, len(examples), args.batch_size):
            batch = generate_records(model, tokenizer, examples[start : start + args.batch_size], args.n,
                                     args.max_new_tokens, args.temperature, args.batch_size, seed=args.seed,
                                     first=start)
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in batch))
            f.flush()
            os.fsync(f.fileno())
            records += batch
    write_jsonl_atomic(out, records)
    partial.unlink()
    golds = [r["gold"] for r in records if "gold" in r]
    if golds:
        print(f"mean gold reward {sum(golds) / len(golds):.3f} over {len(golds)} toy-world responses", file=sys.stderr)
    return out


def file_signature(path):
    """``[[name, size, mtime_ns]]`` of a local file, or of a model directory's weights (``[]`` for a
    hub name): a changed model or prompt file is not resumed from an old ``.partial``."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path] if path.is_file() else []
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def completed_batches(partial, header, batch_records, total_records):
    """The records of ``partial`` up to its last complete batch when its first line is ``header``
    (the same arguments), else ``[]``. A batch is complete when all its lines parse."""
    if not partial.exists():
        return []
    lines = partial.read_text(encoding="utf-8").split("\n")
    try:
        if json.loads(lines[0]) != json.loads(json.dumps(header)):
            print(f"warning: {partial} was written with other arguments; starting over", file=sys.stderr)
            return []
    except json.JSONDecodeError:
        return []
    records = []
    for line in lines[1:]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by the crash, or the end of the file
    if len(records) == total_records:
        return records
    return records[: len(records) // batch_records * batch_records]


def main(argv=None):
    args = parse_args(GenerateArgs, argv, prog="python -m minirlhf generate")
    print(f"wrote {generate(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
