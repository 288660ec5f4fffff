"""K-wise ranking data for the reward model: ``{"prompt": ..., "responses": [best, ..., worst]}``.

InstructGPT's labellers ranked K responses to one prompt; every one of the C(K, 2) pairs then
enters the loss (``kwise_bradley_terry_loss``). K may differ between records. Collate with
``collate_rankings``.
"""
from minirlhf.data.chat import tokenize_prompt_response
from minirlhf.data.datasets import DataReport, located_records
from minirlhf.data.templates import SkipRecord, prompt_field, text_field
from minirlhf.errors import DataError


def load_ranking_data(path, tokenizer, max_len, max_prompt_len, system_prompt=None):
    """Tokenized rankings: each example has ``prompt``, ``responses`` (best first), ``input_ids``
    and ``response_mask`` (one list per response). Responses that do not fit are dropped (the
    ranking of the rest is unchanged); a record left with fewer than 2 is skipped and counted."""
    report, examples = DataReport(str(path), "ranking"), []
    for where, record in located_records(path):
        report.records += 1
        try:
            prompt = prompt_field(record, "prompt")
            responses = record.get("responses")
            if not isinstance(responses, list) or len(responses) < 2:
                raise DataError("field 'responses': expected a list of at least 2 responses, best first")
            responses = [text_field({"response": r}, "response") for r in responses]
        except DataError as err:
            raise DataError(f"{path}, {where}: {err}") from None
        kept = []
        for response in responses:
            try:
                kept.append((response, *tokenize_prompt_response(tokenizer, prompt, response, max_len, max_prompt_len, system_prompt)))
            except SkipRecord:
                continue
        if len(kept) < 2:
            report.skipped["fewer than 2 responses fit in max_len"] += 1
            continue
        report.kept += 1
        report.truncated_responses += any(t.response_tokens_cut for *_, t in kept)
        examples.append({"prompt": prompt, "responses": [k[0] for k in kept],
                         "input_ids": [k[1] for k in kept], "response_mask": [k[2] for k in kept]})
    report.examples = len(examples)
    return examples, report
