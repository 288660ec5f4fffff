"""Datasets: read JSON/JSONL records, convert them with a template, tokenize, count what happened.

    examples, report = load_preference_data("pairs.jsonl", "align_anything", tokenizer)
    print(report)   # records read, kept, skipped (by reason), truncated prompts/responses

Problems split in two kinds. A *broken* file or record (malformed JSON, a missing key, a label
outside its set, a non-string or empty prompt, non-UTF-8 bytes, an empty file) raises
``DataError`` naming the file, the line/record, the field and what was expected: fix the data.
A *useless* record (an empty response, chosen == rejected, a response truncated away) is skipped
and counted in the ``DataReport``, so a student sees how much data a setting throws away.

Templates convert to the kind a loader needs when that is natural: a preference file serves as
prompts (its prompts), as SFT data (prompt + chosen) and as KTO data (chosen 👍, rejected 👎).
"""
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from minirlhf.data.chat import encode_prompt, encode_response, end_of_turn_ids, truncate_prompt_response
from minirlhf.data.templates import (
    KTOExample,
    PreferenceExample,
    PromptExample,
    SFTExample,
    TEMPLATES,
    SkipRecord,
    get_template,
)
from minirlhf.errors import DataError


@dataclass
class DataReport:
    """What loading a file did: records read, kept, skipped by reason, truncated."""

    path: str
    template: str
    records: int = 0
    kept: int = 0
    examples: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated_prompts: int = 0  # kept records whose prompt lost tokens on the left
    truncated_responses: int = 0  # kept records with a response cut on the right (either, for a pair)

    def __str__(self):
        lines = [f"{self.path} (template {self.template}): {self.records} records, {self.kept} kept, "
                 f"{sum(self.skipped.values())} skipped -> {self.examples} examples"]
        lines += [f"  skipped {n}: {reason}" for reason, n in self.skipped.most_common()]
        if self.truncated_prompts or self.truncated_responses:
            lines.append(f"  truncated: {self.truncated_prompts} prompts (cut on the left), "
                         f"{self.truncated_responses} responses (cut on the right)")
        return "\n".join(lines)


# --- reading ----------------------------------------------------------------------------------


def read_records(path):
    """All records of a JSON (a list of objects) or JSONL (one object per line) file, as dicts."""
    return [record for _, record in located_records(path)]


def located_records(path):
    """``[(where, record)]`` with ``where`` = "line 7" (JSONL) or "record 3" (JSON list, 0-based).

    A path that is not a file is tried as a Hugging Face dataset ``NAME[@CONFIG][:SPLIT]`` (e.g.
    ``PKU-Alignment/align-anything@text-to-text:train``) when the optional ``datasets`` package is
    installed.
    """
    file = Path(path)
    if not file.is_file():
        return _hub_records(str(path))
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte {raw[err.start]:#04x}); "
                        "expected a UTF-8 encoded JSON/JSONL file") from None
    if not text.strip():
        raise DataError(f"{path}: empty file; expected JSON records (a list) or JSON lines")
    if file.suffix == ".json" or (file.suffix != ".jsonl" and text.lstrip().startswith("[")):
        return _json_records(path, text)
    return _jsonl_records(path, text)


def _json_records(path, text):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}, column {err.colno}: malformed JSON ({err.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got a JSON {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: empty list; expected at least one record")
    return [(f"record {i}", _as_record(path, f"record {i}", r)) for i, r in enumerate(data)]


def _jsonl_records(path, text):
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: malformed JSON ({err.msg} at column {err.colno}); "
                            "expected one JSON object per line") from None
        records.append((f"line {number}", _as_record(path, f"line {number}", record)))
    return records


def _as_record(path, where, record):
    if not isinstance(record, dict):
        raise DataError(f"{path}, {where}: expected a JSON object {{...}}, got {type(record).__name__}")
    return record


def _hub_records(name):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: no such file (and the optional `datasets` package is not installed, "
                        "so it is not tried as a Hugging Face dataset name)") from None
    dataset_name, _, split = name.partition(":")
    dataset_name, _, config = dataset_name.partition("@")
    try:
        rows = datasets.load_dataset(dataset_name, config or None, split=split or "train")
    except Exception as err:  # the hub raises many types; the user needs the message
        raise DataError(f"{name}: no such file, and loading it as a Hugging Face dataset failed: {err}") from None
    return [(f"row {i}", dict(row)) for i, row in enumerate(rows)]


# --- converting ---------------------------------------------------------------------------------


def convert_records(path, template, kind=PreferenceExample):
    """Read ``path`` and apply ``template`` (a name or a function) to every record.

    ``kind`` is the example class the caller needs (None: whatever the template gives); other
    kinds are converted when natural (see the module docstring). Returns ``([(where, example)], DataReport)``; broken records raise
    ``DataError`` with file, line and field; useless ones are counted in ``report.skipped``.
    """
    if template is None:
        raise DataError(f"{path}: no template given; pass --template NAME (one of: {', '.join(sorted(TEMPLATES))})")
    template_name = template if isinstance(template, str) else template.__name__
    convert = get_template(template) if isinstance(template, str) else template
    report = DataReport(str(path), template_name)
    converted = []
    for where, record in located_records(path):
        report.records += 1
        try:
            examples = _as_kind(convert(record), kind, template_name)
            for example in examples:
                _check_useful(example)
        except SkipRecord as skip:
            report.skipped[skip.reason] += 1
            continue
        except DataError as err:
            raise DataError(f"{path}, {where}: {err}") from None
        except KeyError as err:  # a template that indexes record[...] directly
            raise DataError(f"{path}, {where}: missing field {err} (template {template_name}; "
                            f"the record has: {', '.join(map(repr, record))})") from None
        report.kept += 1
        converted += [(where, example) for example in examples]
    report.examples = len(converted)
    return converted, report


def _as_kind(example, kind, template_name):
    if kind is None or isinstance(example, kind):
        return [example]
    if kind is PromptExample and hasattr(example, "prompt"):
        return [PromptExample(example.prompt)]
    if kind is SFTExample and isinstance(example, PreferenceExample):
        return [SFTExample(example.prompt, example.chosen)]
    if kind is KTOExample and isinstance(example, PreferenceExample):
        return [KTOExample(example.prompt, example.chosen, True), KTOExample(example.prompt, example.rejected, False)]
    raise DataError(f"template {template_name} gives {type(example).__name__}, not the {kind.__name__} this loader needs")


def _check_useful(example):
    if isinstance(example, PreferenceExample):
        if not example.chosen.strip() or not example.rejected.strip():
            raise SkipRecord("empty response")
        if example.chosen == example.rejected:
            raise SkipRecord("identical chosen and rejected")
    elif isinstance(example, (SFTExample, KTOExample)):
        if not (example.response if isinstance(example, SFTExample) else example.completion).strip():
            raise SkipRecord("empty response")


# --- tokenizing ---------------------------------------------------------------------------------


def _check_lengths(max_len, max_prompt_len):
    if max_prompt_len is not None and not 1 <= max_prompt_len < max_len:
        raise DataError(f"max_prompt_len={max_prompt_len}: expected 1 <= max_prompt_len < max_len={max_len}")


def load_preference_data(path, template, tokenizer, max_len=512, max_prompt_len=256, system_prompt=None):
    """Tokenized preference pairs and a ``DataReport``.

    Each example is a dict: ``prompt``, ``chosen``, ``rejected`` (text) and
    ``chosen_input_ids``, ``chosen_response_mask``, ``rejected_input_ids``,
    ``rejected_response_mask`` (lists; see ``data/chat.py`` for truncation). Collate with
    ``collate_preference``.
    """
    _check_lengths(max_len, max_prompt_len)
    converted, report = convert_records(path, template, PreferenceExample)
    end_ids = end_of_turn_ids(tokenizer)
    examples = []
    for _, ex in converted:
        prompt_ids = encode_prompt(tokenizer, ex.prompt, system_prompt)
        try:
            chosen = truncate_prompt_response(prompt_ids, encode_response(tokenizer, ex.chosen, end_ids), max_len, max_prompt_len)
            rejected = truncate_prompt_response(prompt_ids, encode_response(tokenizer, ex.rejected, end_ids), max_len, max_prompt_len)
            if chosen[0] == rejected[0]:
                raise SkipRecord("identical chosen and rejected after truncation")
        except SkipRecord as skip:
            _unkeep(report, skip.reason)
            continue
        _count_truncation(report, chosen[2], rejected[2])
        examples.append({
            "prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected,
            "chosen_input_ids": chosen[0], "chosen_response_mask": chosen[1],
            "rejected_input_ids": rejected[0], "rejected_response_mask": rejected[1],
        })
    report.examples = len(examples)
    return examples, report


def load_prompt_data(path, template, tokenizer, max_prompt_len=256, system_prompt=None):
    """Tokenized prompts for generation (PPO/GRPO) and a ``DataReport``.

    Each example: ``prompt`` (raw), ``answer`` (or None), ``input_ids`` (the chat-formatted prompt
    with the generation prompt, left-truncated to ``max_prompt_len``). Collate with ``collate_prompts``.
    """
    converted, report = convert_records(path, template, PromptExample)
    examples = []
    for _, ex in converted:
        ids = encode_prompt(tokenizer, ex.prompt, system_prompt)
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            report.truncated_prompts += 1
            ids = ids[len(ids) - max_prompt_len:]
        examples.append({"prompt": ex.prompt, "answer": ex.answer, "input_ids": ids})
    report.examples = len(examples)
    return examples, report


def load_sft_data(path, template, tokenizer, max_len=512, max_prompt_len=256, system_prompt=None):
    """Tokenized (prompt, response) examples: ``prompt``, ``response``, ``input_ids``,
    ``response_mask``; and a ``DataReport``. Collate with ``collate_sft``."""
    return _load_single_responses(path, template, tokenizer, SFTExample, max_len, max_prompt_len, system_prompt)


def load_kto_data(path, template, tokenizer, max_len=512, max_prompt_len=256, system_prompt=None):
    """Tokenized unpaired examples: ``prompt``, ``response``, ``label`` (bool), ``input_ids``,
    ``response_mask``; and a ``DataReport``. Collate with ``collate_kto``."""
    return _load_single_responses(path, template, tokenizer, KTOExample, max_len, max_prompt_len, system_prompt)


def _load_single_responses(path, template, tokenizer, kind, max_len, max_prompt_len, system_prompt):
    _check_lengths(max_len, max_prompt_len)
    converted, report = convert_records(path, template, kind)
    end_ids = end_of_turn_ids(tokenizer)
    examples, skipped_at = [], set()
    for where, ex in converted:
        response = ex.response if kind is SFTExample else ex.completion
        prompt_ids = encode_prompt(tokenizer, ex.prompt, system_prompt)
        try:
            ids, mask, truncation = truncate_prompt_response(
                prompt_ids, encode_response(tokenizer, response, end_ids), max_len, max_prompt_len
            )
        except SkipRecord as skip:
            if where not in skipped_at:  # a preference record gives two KTO examples: count it once
                skipped_at.add(where)
                _unkeep(report, skip.reason)
            continue
        _count_truncation(report, truncation)
        example = {"prompt": ex.prompt, "response": response, "input_ids": ids, "response_mask": mask}
        if kind is KTOExample:
            example["label"] = ex.label
        examples.append(example)
    report.examples = len(examples)
    return examples, report


def _unkeep(report, reason):
    report.kept -= 1
    report.skipped[reason] += 1


def _count_truncation(report, *truncations):
    report.truncated_prompts += any(t.prompt_tokens_cut for t in truncations)
    report.truncated_responses += any(t.response_tokens_cut for t in truncations)
