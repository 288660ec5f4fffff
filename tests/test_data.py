"""Data: templates for each format, bad-input errors, chat formatting + truncation, collators, inspect."""
import json
import subprocess
import sys

import pytest
import torch
from exercise_checks import exercise_tests
from fixtures import write_json, write_jsonl

from minirlhf.data.chat import (
    encode_prompt,
    end_of_turn_ids,
    render_prompt,
    tokenize_prompt_response,
    truncate_prompt_response,
)
from minirlhf.data.collate import collate_preference, collate_prompts, collate_sft, pad_sequences
from minirlhf.data.datasets import (
    convert_records,
    load_kto_data,
    load_preference_data,
    load_prompt_data,
    load_sft_data,
    read_records,
)
from minirlhf.data.templates import (
    KTOExample,
    PreferenceExample,
    PromptExample,
    SFTExample,
    SkipRecord,
    get_template,
    register_template,
    text_field,
)
from minirlhf.errors import DataError

# --- templates: one raw record of each format -> the standard example ----------------------------

HH_CHOSEN = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: An apple."
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: No."
MULTI_TURN = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a fruit."},
]

CONVERSIONS = [
    ("align_anything", {"question": "Q", "response_1": "A", "response_2": "B", "overall_response": 1},
     PreferenceExample("Q", "A", "B")),
    ("align_anything", {"question": "Q", "response_1": "A", "response_2": "B", "overall_response": "2"},
     PreferenceExample("Q", "B", "A")),
    ("pku_saferlhf", {"prompt": "P", "response_0": "x", "response_1": "y", "better_response_id": 1, "safer_response_id": 0},
     PreferenceExample("P", "y", "x")),
    ("pku_saferlhf_safe", {"prompt": "P", "response_0": "x", "response_1": "y", "better_response_id": 1, "safer_response_id": 0},
     PreferenceExample("P", "x", "y")),
    ("hh_rlhf", {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, PreferenceExample(MULTI_TURN, "An apple.", "No.")),
    ("hh_rlhf", {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"},
     PreferenceExample([{"role": "user", "content": "Hi"}], "Hello", "Go away")),
    ("trl_standard", {"prompt": "P", "chosen": "good", "rejected": "bad"}, PreferenceExample("P", "good", "bad")),
    ("trl_conversational",
     {"prompt": [{"role": "user", "content": "P"}], "chosen": [{"role": "assistant", "content": "good"}],
      "rejected": [{"role": "assistant", "content": "bad"}]},
     PreferenceExample([{"role": "user", "content": "P"}], "good", "bad")),
    ("trl_conversational",  # implicit prompt: the shared leading messages
     {"chosen": [{"role": "user", "content": "P"}, {"role": "assistant", "content": "good"}],
      "rejected": [{"role": "user", "content": "P"}, {"role": "assistant", "content": "bad"}]},
     PreferenceExample([{"role": "user", "content": "P"}], "good", "bad")),
    ("prompt", {"prompt": "What is 2+3?", "answer": "5"}, PromptExample("What is 2+3?", "5")),
    ("prompt", {"question": "Q"}, PromptExample("Q", None)),
    ("sft", {"prompt": "P", "response": "R"}, SFTExample("P", "R")),
    ("sft", {"prompt": "P", "completion": "R"}, SFTExample("P", "R")),
    ("sft_messages", {"messages": MULTI_TURN + [{"role": "assistant", "content": "A pear."}]}, SFTExample(MULTI_TURN, "A pear.")),
    ("kto", {"prompt": "P", "completion": "R", "label": False}, KTOExample("P", "R", False)),
]


@pytest.mark.parametrize("name, record, expected", CONVERSIONS, ids=[c[0] for c in CONVERSIONS])
def test_template_converts_its_format(name, record, expected):
    assert get_template(name)(record) == expected


test_exercise_template = exercise_tests("template")


def test_homework_template_is_registered():
    assert get_template("homework").__name__ == "homework_template"


def test_hh_rlhf_with_different_histories_is_skipped():
    record = {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"}
    with pytest.raises(SkipRecord, match="different histories"):
        get_template("hh_rlhf")(record)


def test_a_student_registers_a_template_in_a_few_lines(tmp_path, tiny_tokenizer):
    @register_template("test_qa_pairs")
    def qa_pairs(record):
        return PreferenceExample(text_field(record, "q"), text_field(record, "good", True), text_field(record, "bad", True))

    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "2+2?", "good": "4", "bad": "5"}])
    examples, report = load_preference_data(path, "test_qa_pairs", tiny_tokenizer)
    assert report.kept == 1 and examples[0]["chosen"] == "4"


# --- bad input -> DataError naming file, line/record, field and expectation ----------------------

GOOD = {"question": "Q", "response_1": "A", "response_2": "B", "overall_response": 1}


def error_for(tmp_path, content, template="align_anything", name="bad.jsonl", tokenizer=None):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        convert_records(path, template)
    return str(err.value)


def lines(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def test_malformed_json_line_names_file_and_line(tmp_path):
    message = error_for(tmp_path, lines(GOOD, '{"question": "Q", "response_1": '))
    assert "bad.jsonl" in message and "line 2" in message and "malformed JSON" in message


def test_missing_key_names_line_and_field(tmp_path):
    record = dict(GOOD)
    del record["overall_response"]
    message = error_for(tmp_path, lines(GOOD, GOOD, record))
    assert "bad.jsonl, line 3" in message and "missing field 'overall_response'" in message


def test_label_outside_its_set(tmp_path):
    message = error_for(tmp_path, lines(dict(GOOD, overall_response=3)))
    assert "line 1" in message and "'overall_response'" in message and "expected one of 1, 2" in message and "3" in message
    pku = {"prompt": "P", "response_0": "a", "response_1": "b", "better_response_id": 2}
    message = error_for(tmp_path, lines(pku), template="pku_saferlhf")
    assert "'better_response_id'" in message and "expected one of 0, 1" in message
    assert "safer_response_id" in error_for(tmp_path, lines(pku), template="pku_saferlhf_safe")
    assert "expected one of 1, 2" in error_for(tmp_path, lines(dict(GOOD, overall_response=True)))


def test_empty_or_non_string_prompt_is_an_error(tmp_path):
    assert "field 'question': empty text" in error_for(tmp_path, lines(dict(GOOD, question="  ")))
    assert "field 'question': expected a string, got int" in error_for(tmp_path, lines(dict(GOOD, question=7)))


def test_non_utf8_file_names_the_line(tmp_path):
    content = lines(GOOD).encode() + '{"question": "caf\u00e9"}\n'.encode("latin-1")
    message = error_for(tmp_path, content)
    assert "bad.jsonl, line 2" in message and "not UTF-8" in message


def test_empty_file(tmp_path):
    assert "empty file" in error_for(tmp_path, "\n  \n")
    assert "empty list" in error_for(tmp_path, "[]", name="bad.json")


def test_json_list_names_the_record_and_rejects_non_objects(tmp_path):
    record = dict(GOOD)
    del record["question"]
    message = error_for(tmp_path, json.dumps([GOOD, record]), name="bad.json")
    assert "bad.json, record 1" in message and "'question'" in message
    assert "line 2" in error_for(tmp_path, lines(GOOD, "[1, 2]")) and "expected a JSON object" in error_for(tmp_path, lines("3"))
    assert "expected a JSON list" in error_for(tmp_path, json.dumps(GOOD), name="bad.json")


def test_unknown_template_lists_the_known_ones(tmp_path):
    message = error_for(tmp_path, lines(GOOD), template="align_anyting")
    assert "unknown template 'align_anyting'" in message
    assert all(name in message for name in ("align_anything", "pku_saferlhf", "hh_rlhf", "trl_standard", "homework"))


def test_kto_label_must_be_a_bool(tmp_path):
    message = error_for(tmp_path, lines({"prompt": "P", "completion": "C", "label": "yes"}), template="kto")
    assert "field 'label'" in message and "true or false" in message


def test_missing_file_without_datasets_package(tmp_path):
    pytest.importorskip("pytest")  # always present; the message differs only if `datasets` is installed
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "nope.jsonl")


def test_template_indexing_a_missing_key_gets_a_clear_error(tmp_path):
    @register_template("test_plain_indexing")
    def plain(record):
        return PreferenceExample(record["prompt"], record["yes"], record["no"])

    message = error_for(tmp_path, lines({"prompt": "P", "yes": "a"}), template="test_plain_indexing")
    assert "line 1" in message and "missing field 'no'" in message


# --- useless records are skipped and counted, not fatal -----------------------------------------


def test_empty_and_identical_responses_are_skipped_and_reported(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        GOOD,
        dict(GOOD, response_2=""),
        dict(GOOD, response_1="same", response_2="same"),
        dict(GOOD, response_1="   "),
    ])
    examples, report = load_preference_data(path, "align_anything", tiny_tokenizer)
    assert (report.records, report.kept, len(examples)) == (4, 1, 1)
    assert report.skipped == {"empty response": 2, "identical chosen and rejected": 1}
    assert "2: empty response" in str(report).replace("skipped 2", "2")


# --- chat formatting, tokenization, truncation ----------------------------------------------------


def test_prompt_tokens_round_trip_through_the_chat_template(tiny_tokenizer):
    text = render_prompt(tiny_tokenizer, "What is 2+2?")
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert "You are Qwen" in text  # the template's default system prompt
    ids = encode_prompt(tiny_tokenizer, "What is 2+2?")
    assert tiny_tokenizer.decode(ids) == text
    # Exactly what generation would be given (transformers 5: return_dict=False for a plain list).
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert ids == tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_system_prompt_replaces_the_default_but_not_an_explicit_one(tiny_tokenizer):
    text = render_prompt(tiny_tokenizer, "Hi", system_prompt="You are a helpful assistant.")
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>") and "Qwen" not in text
    explicit = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert "Be brief." in render_prompt(tiny_tokenizer, explicit, system_prompt="ignored") and "ignored" not in render_prompt(
        tiny_tokenizer, explicit, system_prompt="ignored")


def test_response_ends_with_the_end_of_turn_token_and_is_masked(tiny_tokenizer):
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tiny_tokenizer) == [im_end]
    ids, mask, truncation = tokenize_prompt_response(tiny_tokenizer, MULTI_TURN, "An apple.", max_len=512)
    prompt_len = len(encode_prompt(tiny_tokenizer, MULTI_TURN))
    assert mask == [0] * prompt_len + [1] * (len(ids) - prompt_len)
    assert ids[-1] == im_end and tiny_tokenizer.decode(ids[prompt_len:]) == "An apple.<|im_end|>"
    assert truncation.prompt_tokens_cut == truncation.response_tokens_cut == 0


def test_truncation_cuts_the_prompt_left_and_the_response_right():
    prompt, response = list(range(10, 20)), list(range(100, 108))
    ids, mask, cut = truncate_prompt_response(prompt, response, max_len=12, max_prompt_len=6)
    assert ids == list(range(14, 20)) + list(range(100, 106))
    assert mask == [0] * 6 + [1] * 6 and (cut.prompt_tokens_cut, cut.response_tokens_cut) == (4, 2)
    ids, _, cut = truncate_prompt_response(prompt, response, max_len=30, max_prompt_len=6)
    assert len(ids) == 14 and cut.response_tokens_cut == 0  # a short pair keeps its whole response
    with pytest.raises(SkipRecord, match="truncated away"):
        truncate_prompt_response(prompt, response, max_len=10)  # no max_prompt_len: the prompt fills it


def test_loader_counts_truncation_and_skips_responses_truncated_away(tmp_path, tiny_tokenizer):
    long_question = "How do I bake bread? " * 30
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, dict(GOOD, question=long_question, response_1="Mix flour. " * 20)])
    short_system = {"system_prompt": "Be brief."}  # 25 prompt tokens for GOOD
    examples, report = load_preference_data(path, "align_anything", tiny_tokenizer, max_len=48, max_prompt_len=32, **short_system)
    assert report.kept == 2 and report.truncated_prompts == 1 and report.truncated_responses == 1
    for e in examples:
        for side in ("chosen", "rejected"):
            assert len(e[f"{side}_input_ids"]) <= 48 and sum(1 - m for m in e[f"{side}_response_mask"]) <= 32
    _, report = load_sft_data(path, "align_anything", tiny_tokenizer, max_len=48, max_prompt_len=None, **short_system)
    assert report.skipped == {"response truncated away (the prompt fills max_len)": 1} and report.kept == 1
    with pytest.raises(DataError, match="max_prompt_len"):
        load_preference_data(path, "align_anything", tiny_tokenizer, max_len=32, max_prompt_len=32)


def test_bos_is_not_added_twice(tiny_tokenizer):
    from tokenizers.processors import TemplateProcessing

    tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.bos_token = "<|endoftext|>"
    bos = tokenizer.bos_token_id
    # A Llama-style tokenizer: it adds BOS when encoding, and its chat template writes BOS too.
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    tokenizer.chat_template = "{{ bos_token }}" + tiny_tokenizer.chat_template
    assert tokenizer("x")["input_ids"][0] == bos
    ids = encode_prompt(tokenizer, "Hi")
    assert ids[0] == bos and ids.count(bos) == 1


def test_tokenizer_without_chat_template_uses_plain_text_and_eos(tiny_tokenizer):
    tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = None
    assert render_prompt(tokenizer, "2+2=") == "2+2="
    assert render_prompt(tokenizer, MULTI_TURN).endswith("User: Name a fruit.\n\nAssistant:")
    ids, mask, _ = tokenize_prompt_response(tokenizer, "2+2=", "4", max_len=64)
    assert ids[-1] == tokenizer.eos_token_id and sum(mask) == len(tokenizer("4", add_special_tokens=False)["input_ids"]) + 1


def test_prompt_sft_and_kto_loaders_reuse_preference_files(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, dict(GOOD, question="Q2", overall_response=2)])
    prompts, report = load_prompt_data(path, "align_anything", tiny_tokenizer, max_prompt_len=8)
    assert [p["prompt"] for p in prompts] == ["Q", "Q2"] and all(len(p["input_ids"]) == 8 for p in prompts)
    assert report.truncated_prompts == 2
    sft, _ = load_sft_data(path, "align_anything", tiny_tokenizer)
    assert [e["response"] for e in sft] == ["A", "B"]
    kto, report = load_kto_data(path, "align_anything", tiny_tokenizer)
    assert [(e["response"], e["label"]) for e in kto] == [("A", True), ("B", False), ("B", True), ("A", False)]
    assert report.records == 2 and report.examples == 4
    with pytest.raises(DataError, match="PromptExample"):
        load_preference_data(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}]), "prompt", tiny_tokenizer)


def test_json_and_jsonl_give_the_same_examples(tmp_path, tiny_tokenizer):
    records = [GOOD, dict(GOOD, question="Other", overall_response=2)]
    a, _ = load_preference_data(write_jsonl(tmp_path / "a.jsonl", records), "align_anything", tiny_tokenizer)
    b, _ = load_preference_data(write_json(tmp_path / "b.json", records), "align_anything", tiny_tokenizer)
    assert a == b


# --- collators -------------------------------------------------------------------------------------


def test_pad_sequences_both_sides():
    assert pad_sequences([[1, 2, 3], [4]], 0, "right").tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad_sequences([[1, 2, 3], [4]], 0, "left").tolist() == [[1, 2, 3], [0, 0, 4]]
    with pytest.raises(ValueError):
        pad_sequences([[1]], 0, "middle")


def test_masks_come_from_lengths_so_pad_equal_eos_keeps_the_real_eos():
    eos = pad = 2
    examples = [{"input_ids": [5, 6, eos], "response_mask": [0, 1, 1]}, {"input_ids": [7, eos], "response_mask": [0, 1]}]
    for side in ("left", "right"):
        batch = collate_sft(examples, pad, side)
        assert batch["attention_mask"].sum(-1).tolist() == [3, 2]
        assert batch["response_mask"].sum(-1).tolist() == [2, 1]
        assert (batch["input_ids"][batch["response_mask"].bool()] == torch.tensor([6, eos, eos])).all()


def test_collate_preference_stacks_chosen_then_rejected(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, dict(GOOD, question="A longer question here", overall_response=2)])
    examples, _ = load_preference_data(path, "align_anything", tiny_tokenizer)
    batch = collate_preference(examples, tiny_tokenizer.pad_token_id, "left")
    assert batch["input_ids"].shape[0] == 4
    chosen, rejected = batch["input_ids"].chunk(2)
    for i, e in enumerate(examples):
        assert chosen[i][batch["attention_mask"][i].bool()].tolist() == e["chosen_input_ids"]
        assert rejected[i][batch["attention_mask"][2 + i].bool()].tolist() == e["rejected_input_ids"]


def test_collate_prompts_left_pads_for_generation(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi", "answer": "1"}, {"prompt": "A much longer prompt than that"}])
    examples, _ = load_prompt_data(path, "prompt", tiny_tokenizer)
    batch = collate_prompts(examples, tiny_tokenizer.pad_token_id)
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][0, 0]
    assert batch["answer"] == ["1", None] and batch["prompt"] == ["Hi", "A much longer prompt than that"]


# --- python -m minirlhf data inspect -------------------------------------------------------------


def inspect_file(tmp_path):
    records = [GOOD, dict(GOOD, response_1="A long detailed answer", overall_response=1), dict(GOOD, response_2="")]
    return write_jsonl(tmp_path / "pairs.jsonl", records)


def test_inspect_prints_counts_examples_and_lengths_and_plots(tmp_path, capsys):
    from minirlhf.data.inspect import main

    plot = tmp_path / "lengths.png"
    assert main(["inspect", str(inspect_file(tmp_path)), "--template", "align_anything", "--n", "1", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "3 records, 2 kept" in out and "skipped 1: empty response" in out
    assert "--- example 0 ---" in out and "--- example 1 ---" not in out
    assert "lengths in words" in out and "chosen       n=2  mean=2.5" in out and "rejected     n=2  mean=1.0" in out
    assert "chosen is longer than rejected in 50.0% of pairs" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*.tmp"))


def test_inspect_counts_tokens_with_a_tokenizer(tmp_path, capsys, qwen2_checkpoint):
    from minirlhf.data.inspect import main

    main(["inspect", str(inspect_file(tmp_path)), "--template", "align_anything", "--tokenizer", str(qwen2_checkpoint)])
    out = capsys.readouterr().out
    assert "lengths in tokens" in out and "<|im_start|>assistant\n⟦" in out and "<|im_end|>⟧" in out


def test_inspect_cli_fails_cleanly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines(GOOD, "{oops"), encoding="utf-8")
    plot = tmp_path / "out.png"
    result = subprocess.run(
        [sys.executable, "-m", "minirlhf", "data", "inspect", str(bad), "--template", "align_anything", "--plot", str(plot)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bad.jsonl, line 2: malformed JSON" in result.stderr and not plot.exists()


def test_hub_dataset_name_with_config_and_split(monkeypatch):
    # No hub here: a stand-in `datasets` module records how the name was parsed.
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": "q", "response_1": "a", "response_2": "b", "overall_response": 1}]

    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", load_dataset, raising=False)
    from minirlhf.data.datasets import read_records

    assert read_records("PKU-Alignment/align-anything@text-to-text:train")[0]["question"] == "q"
    read_records("some/dataset")
    assert calls == [("PKU-Alignment/align-anything", "text-to-text", "train"), ("some/dataset", None, "train")]


def test_missing_template_is_a_clear_error(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    with pytest.raises(DataError, match=r"no template given; pass --template NAME \(one of: .*align_anything"):
        load_prompt_data(path, None, tiny_tokenizer)
