"""Score (prompt, response) pairs with a reward model: ``python -m minirlhf score``.

    python -m minirlhf score --model runs/rm/final --data gen.jsonl --out gen.scored.jsonl

Reads any JSON/JSONL file whose records a template turns into (prompt, response) — the default
``sft`` template takes ``prompt`` + ``response`` (or ``completion``), which is what ``generate``
writes — and writes every record back with ``score`` = r_φ(x, y) added (all other fields kept, in
input order). Empty responses are scored too (a policy that says nothing gets the RM's opinion of
that). A record whose prompt leaves no room for the response within ``--max-len`` gets
``"score": null`` and a ``"skipped"`` reason. With toy-world prompts the gold reward is added
(``gold``, ``gold_helpful``, ``gold_harmless``, as ``generate`` names them).
"""
import dataclasses
import sys
import typing
from pathlib import Path

import torch

from minirlhf.data.atomic import write_jsonl_atomic
from minirlhf.data.chat import encode_prompt, encode_response, end_of_turn_ids, truncate_prompt_response
from minirlhf.data.collate import collate_sft, to_device
from minirlhf.data.datasets import located_records
from minirlhf.data.templates import SFTExample, SkipRecord, get_template
from minirlhf.errors import DataError, MinirlhfError
from minirlhf.models.policy import load_tokenizer
from minirlhf.models.reward_model import load_reward_model
from minirlhf.toy.measure import gold_scores, is_toy_prompt
from minirlhf.train.args import parse_args
from minirlhf.train.runtime import autocast, quiet_transformers, select_device


@dataclasses.dataclass
class ScoreArgs:
    """Score prompt/response records with a reward model and write them back as JSONL."""

    model: str = ""
    """Reward model directory (saved by `rm`, or an HF sequence-classification RM)."""
    data: str = ""
    """JSON/JSONL file of (prompt, response) records, e.g. the output of `generate`."""
    template: str = "sft"
    """Template that reads a record as (prompt, response): 'sft' (prompt + response/completion) or 'sft_messages'."""
    out: typing.Optional[str] = None
    """Output JSONL (default: <data>.scored.jsonl next to --data)."""
    gold: typing.Optional[bool] = None
    """Add the toy world's gold reward (default: when every prompt is a toy-world prompt)."""
    batch_size: int = 32
    """Records per forward pass."""
    max_len: int = 512
    """Maximum tokens of prompt + response (the response is cut on the right)."""
    max_prompt_len: typing.Optional[int] = None
    """Maximum prompt tokens (default: half of --max-len)."""
    system_prompt: typing.Optional[str] = None
    """System prompt put in front of every conversation."""
    device: typing.Optional[str] = None
    """'cuda', 'cpu', ... (default: CUDA when available)."""


def read_prompt_responses(path, template="sft"):
    """``[(record, prompt, response)]`` of a file, every record kept in order (empty responses too)."""
    convert, rows = get_template(template), []
    for where, record in located_records(path):
        try:
            example = convert(record)
        except DataError as err:
            raise DataError(f"{path}, {where}: {err}") from None
        if not isinstance(example, SFTExample):
            raise DataError(f"{path}: template {template!r} does not give (prompt, response) records; use 'sft' or 'sft_messages'")
        rows.append((record, example.prompt, example.response))
    return rows


@torch.no_grad()
def score_responses(model, tokenizer, prompts, responses, *, batch_size=32, max_len=512, max_prompt_len=None,
                    system_prompt=None, device="cpu"):
    """``[r_φ(x, y) or None]`` for parallel lists of prompts and responses (None: did not fit)."""
    model.eval()
    end_ids = end_of_turn_ids(tokenizer)
    rows, fits = [], []
    for prompt, response in zip(prompts, responses):
        try:
            ids, mask, _ = truncate_prompt_response(encode_prompt(tokenizer, prompt, system_prompt),
                                                    encode_response(tokenizer, response, end_ids), max_len,
                                                    max_prompt_len or max_len // 2)
        except SkipRecord:
            fits.append(False)
            continue
        rows.append({"input_ids": ids, "response_mask": mask})
        fits.append(True)
    scores = []
    for start in range(0, len(rows), batch_size):
        batch = to_device(collate_sft(rows[start : start + batch_size], tokenizer.pad_token_id), device)
        with autocast(device):
            scores += model(batch["input_ids"], batch["attention_mask"])[1].float().cpu().tolist()
    scores = iter(scores)
    return [next(scores) if fit else None for fit in fits]


def score_file(args: ScoreArgs):
    """Score ``args.data`` and write ``args.out``; returns the output path."""
    # 1. Read the records, load the reward model and its tokenizer.
    rows = read_prompt_responses(args.data, args.template)
    prompts, responses = [r[1] for r in rows], [r[2] for r in rows]
    device = select_device(args.device)
    model = load_reward_model(args.model, device=device)
    tokenizer = load_tokenizer(args.model)

    # 2. Score; add the gold reward in the toy world.
    scores = score_responses(model, tokenizer, prompts, responses, batch_size=args.batch_size, max_len=args.max_len,
                             max_prompt_len=args.max_prompt_len, system_prompt=args.system_prompt, device=device)
    toy = all(map(is_toy_prompt, prompts))
    gold = [gold_scores(p, y) for p, y in zip(prompts, responses)] if toy and args.gold is not False else None
    if args.gold and not toy:
        raise MinirlhfError(f"--gold: {args.data} has prompts that are not toy-world prompts")

    # 3. Write every record back with its score.
    out_records = []
    for i, (record, score) in enumerate(zip((r[0] for r in rows), scores)):
        record = {**record, "score": score}
        if score is None:
            record["skipped"] = "the prompt leaves no room for the response within --max-len"
        if gold is not None:
            record.update(gold[i])
        out_records.append(record)
    out = Path(args.out or Path(args.data).with_suffix(".scored.jsonl"))
    write_jsonl_atomic(out, out_records)
    valid = [s for s in scores if s is not None]
    print(f"scored {len(valid)}/{len(scores)} records, mean score {sum(valid) / max(len(valid), 1):.4g} -> {out}",
          file=sys.stderr)
    return out


def main(argv=None):
    args = parse_args(ScoreArgs, argv, prog="python -m minirlhf score")
    if not args.model or not args.data:
        raise MinirlhfError("score: --model (a reward model) and --data (prompt/response JSONL) are required")
    quiet_transformers()
    score_file(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
