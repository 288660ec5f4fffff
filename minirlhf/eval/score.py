"""Score (prompt, response) pairs with a reward model: ``python -m minirlhf score``.

    python -m minirlhf score --model runs/rm/final --data gen.jsonl --out gen.scored.jsonl

Reads any JSON/JSONL file whose records a template turns into (prompt, response) — the default
``sft`` template takes ``prompt`` + ``response`` (or ``completion``), which is what ``generate``
writes — and writes every record back with ``score`` = r_φ(x, y) added (all other fields kept, in
input order). Empty responses are scored too (a policy that says nothing gets the RM's opinion of
that). A record whose prompt leaves no room for the response within ``--max-len`` gets
``"score": null`` and a ``"skipped"`` reason. With toy-world prompts the gold reward is added
(``gold``, ``gold_helpful``, ``gold_harmless``, as ``generate`` names them).

**What is scored: exactly what the trainers score.** The online trainers' reward
(``RewardModelReward``) reads the rollout's token ids: the prompt's tokens, then the response's
tokens as the policy sampled them — its stop token included when the response ended, nothing
appended when it was cut at the token budget. A cut response is not a finished answer, and an
end-of-turn token appended to it is a different input (on a trained RM, often a very different
score). ``score`` and ``compare`` follow the same convention:

- a record with ``prompt_ids`` and ``response_ids`` (what ``generate`` writes) is scored from those
  ids, token for token. The RM must use the policy's tokenizer, as in training; this is checked:
  the ids must decode, with the RM's tokenizer, to the record's ``response`` text;
- a record with text only (an older ``generate`` file, data written by people) is tokenized: the
  prompt with the tokenizer's chat template (``--system-prompt``), then the response, then the
  end-of-turn token — unless the record says ``"ended": false`` (cut at the budget). A record
  without ``ended`` counts as a finished response. Re-tokenized text can differ from the sampled
  ids in rare spots (another split of the same characters), so prefer files with ids.
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
from minirlhf.train.precision import Precision
from minirlhf.train.runtime import quiet_transformers, select_device


@dataclasses.dataclass
class ScoreArgs:
    """Score prompt/response records with a reward model and write them back as JSONL."""

    model: str = ""
    """Reward model directory (saved by `rm`, or an HF sequence-classification RM)."""
    data: str = ""
    """JSON/JSONL file of (prompt, response) records, e.g. the output of `generate`."""
    template: str = "sft"
    """Template that reads a record as (prompt, response): 'sft' (prompt + response/completion) or 'sft_messages'.
    Records with prompt_ids/response_ids (from `generate`) are scored from those token ids."""
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
    """System prompt put in front of every conversation (records scored from text only)."""
    device: typing.Optional[str] = None
    """'cuda', 'cpu', ... (default: CUDA when available)."""


class Generation(typing.NamedTuple):
    """One record of a generation file, read for scoring."""

    record: dict  # the raw record, written back with its score
    prompt: object  # a string or a message list
    response: str
    ended: bool  # False: cut at the token budget (no end-of-turn token is appended)
    token_ids: typing.Optional[tuple]  # (prompt_ids, response_ids) as generated, or None: tokenize the text
    where: str  # "line 7", for error messages


def read_prompt_responses(path, template="sft"):
    """``[Generation]`` of a file, every record kept in order (empty responses too).

    ``ended`` is the record's ``ended`` field (True when absent); ``token_ids`` its
    ``prompt_ids``/``response_ids`` lists when it has both (checked to be lists of token ids).
    """
    convert, rows = get_template(template), []
    for where, record in located_records(path):
        try:
            example = convert(record)
        except DataError as err:
            raise DataError(f"{path}, {where}: {err}") from None
        if not isinstance(example, SFTExample):
            raise DataError(f"{path}: template {template!r} does not give (prompt, response) records; use 'sft' or 'sft_messages'")
        ended = record.get("ended", True)
        if not isinstance(ended, bool):
            raise DataError(f"{path}, {where}: field 'ended' must be true or false, got {ended!r}")
        token_ids = None
        if "response_ids" in record or "prompt_ids" in record:
            token_ids = tuple(_token_ids(record, key, f"{path}, {where}") for key in ("prompt_ids", "response_ids"))
        rows.append(Generation(record, example.prompt, example.response, ended, token_ids, f"{path}, {where}"))
    return rows


def _token_ids(record, key, where):
    ids = record.get(key)
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise DataError(f"{where}: field {key!r} must be a list of token ids (non-negative integers), got "
                        f"{str(ids)[:80]}; a record has both prompt_ids and response_ids, or neither")
    return ids


def scored_tokens(tokenizer, generation, *, vocab_size, end_ids, max_len=512, max_prompt_len=None, system_prompt=None):
    """``(input_ids, response_mask)`` that r_φ reads for one ``Generation`` (the convention in the
    module docstring), cut to ``max_len`` like training data (the prompt from the left, the
    response from the right). Raises ``SkipRecord`` when no response token fits, ``DataError``
    when the token ids are not the tokenizer's."""
    if generation.token_ids is not None:
        prompt_ids, response_ids = generation.token_ids
        too_large = max(prompt_ids + response_ids, default=-1)
        if too_large >= vocab_size:
            raise DataError(f"{generation.where}: token id {too_large} is outside the reward model's vocabulary "
                            f"({vocab_size} tokens); it must use the tokenizer that generated the file")
        decoded = tokenizer.decode(response_ids, skip_special_tokens=True)
        if decoded != generation.response:
            raise DataError(
                f"{generation.where}: 'response_ids' decode to {decoded[:60]!r} with the reward model's tokenizer, "
                f"not to the record's response {generation.response[:60]!r}: the file was generated with another "
                "tokenizer, or the response was edited (remove prompt_ids/response_ids to score the text)")
    else:
        prompt_ids = encode_prompt(tokenizer, generation.prompt, system_prompt)
        response_ids = encode_response(tokenizer, generation.response, end_ids if generation.ended else [])
    ids, mask, _ = truncate_prompt_response(prompt_ids, response_ids, max_len, max_prompt_len or max_len // 2)
    return ids, mask


@torch.no_grad()
def score_generations(model, tokenizer, generations, *, batch_size=32, max_len=512, max_prompt_len=None,
                      system_prompt=None, device="cpu"):
    """``[r_φ(x, y) or None]`` of each ``Generation`` (None: the response did not fit in ``max_len``)."""
    model.eval()
    end_ids = end_of_turn_ids(tokenizer)
    rows, fits = [], []
    for generation in generations:
        try:
            ids, mask = scored_tokens(tokenizer, generation, vocab_size=model.config.vocab_size, end_ids=end_ids,
                                      max_len=max_len, max_prompt_len=max_prompt_len, system_prompt=system_prompt)
        except SkipRecord:
            fits.append(False)
            continue
        rows.append({"input_ids": ids, "response_mask": mask})
        fits.append(True)
    scores = []
    for start in range(0, len(rows), batch_size):
        batch = to_device(collate_sft(rows[start : start + batch_size], tokenizer.pad_token_id), device)
        with Precision("auto", device).autocast():
            scores += model(batch["input_ids"], batch["attention_mask"])[1].float().cpu().tolist()
    scores = iter(scores)
    return [next(scores) if fit else None for fit in fits]


def score_responses(model, tokenizer, prompts, responses, *, ended=None, batch_size=32, max_len=512,
                    max_prompt_len=None, system_prompt=None, device="cpu"):
    """``[r_φ(x, y) or None]`` for parallel lists of prompts and response texts (None: did not fit).

    ``ended[i] = False`` marks response ``i`` as cut at the token budget: it is scored without an
    end-of-turn token, as the trainers score it (default: every response finished).
    """
    ended = [True] * len(prompts) if ended is None else ended
    generations = [Generation({}, p, y, e, None, f"response {i}")
                   for i, (p, y, e) in enumerate(zip(prompts, responses, ended))]
    return score_generations(model, tokenizer, generations, batch_size=batch_size, max_len=max_len,
                             max_prompt_len=max_prompt_len, system_prompt=system_prompt, device=device)


def score_file(args: ScoreArgs):
    """Score ``args.data`` and write ``args.out``; returns the output path."""
    # 1. Read the records, load the reward model and its tokenizer.
    rows = read_prompt_responses(args.data, args.template)
    prompts, responses = [r.prompt for r in rows], [r.response for r in rows]
    device = select_device(args.device)
    model = load_reward_model(args.model, device=device)
    tokenizer = load_tokenizer(args.model)

    # 2. Score (the token ids when the file has them; see the module docstring); add the gold
    #    reward in the toy world.
    scores = score_generations(model, tokenizer, rows, batch_size=args.batch_size, max_len=args.max_len,
                               max_prompt_len=args.max_prompt_len, system_prompt=args.system_prompt, device=device)
    toy = all(map(is_toy_prompt, prompts))
    gold = [gold_scores(p, y) for p, y in zip(prompts, responses)] if toy and args.gold is not False else None
    if args.gold and not toy:
        raise MinirlhfError(f"--gold: {args.data} has prompts that are not toy-world prompts")

    # 3. Write every record back with its score.
    out_records = []
    for i, (record, score) in enumerate(zip((r.record for r in rows), scores)):
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
