"""Templates: one small function per dataset format, raw record -> a standard example.

Datasets disagree on key names (align-anything says ``question, response_1, response_2,
overall_response``; PKU-SafeRLHF says ``prompt, response_0, response_1, better_response_id``). A
template maps one raw record to the example every trainer understands::

    @register_template("my_format")
    def my_format(record):
        return PreferenceExample(prompt=text_field(record, "q"), chosen=..., rejected=...)

A ``prompt`` is a string (one user turn) or a list of ``{"role", "content"}`` messages (a
multi-turn conversation so far); ``data/chat.py`` renders either with the tokenizer's chat
template. Templates check *types and labels* and raise ``DataError`` naming the field; the loader
adds the file and line. Empty responses and identical pairs are not errors: the loader skips and
counts them. A template may also raise ``SkipRecord(reason)`` for a record it cannot use.
"""
from dataclasses import dataclass

from minirlhf.errors import DataError


@dataclass(frozen=True)
class PreferenceExample:
    """A pair of responses to one prompt, the preferred one first."""

    prompt: object  # str or list of {"role", "content"} messages
    chosen: str
    rejected: str


@dataclass(frozen=True)
class PromptExample:
    """A prompt to generate from (PPO/GRPO); ``answer`` is the reference for verifiable tasks."""

    prompt: object
    answer: object = None


@dataclass(frozen=True)
class SFTExample:
    """A prompt and the response to imitate."""

    prompt: object
    response: str


@dataclass(frozen=True)
class KTOExample:
    """One response with a thumbs-up (``label=True``, desirable) or thumbs-down (``False``)."""

    prompt: object
    completion: str
    label: bool


class SkipRecord(Exception):
    """Raised by a template or tokenizer step for a record that is skipped (and counted), not fatal."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


TEMPLATES = {}


def register_template(name):
    """Decorator: make ``function(record) -> example`` available as ``get_template(name)``."""

    def register(function):
        TEMPLATES[name] = function
        return function

    return register


def get_template(name):
    """The template function registered under ``name``; ``DataError`` listing known names otherwise."""
    if name not in TEMPLATES:
        raise DataError(f"unknown template {name!r}; known templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


# --- field helpers: they name the field and the expectation in every error ---------------------


def missing_field_message(record, key):
    return f"missing field {key!r} (the record has: {', '.join(map(repr, record)) or 'no fields'})"


def text_field(record, key, allow_empty=False):
    """``record[key]`` as a string; ``DataError`` if missing, not a string, or (unless allowed) blank.

    Responses use ``allow_empty=True``: an empty response is skipped by the loader, not fatal.
    """
    if key not in record:
        raise DataError(missing_field_message(record, key))
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"field {key!r}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"field {key!r}: empty text")
    return value


def choice_field(record, key, allowed):
    """``record[key]``, which must be one of ``allowed`` (e.g. (1, 2) for ``overall_response``)."""
    if key not in record:
        raise DataError(missing_field_message(record, key))
    value = record[key]
    # JSON often stores labels as strings ("1"); accept those, but reject True (== 1 in Python).
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or value not in allowed:
        raise DataError(f"field {key!r}: expected one of {', '.join(map(str, allowed))}, got {record[key]!r}")
    return value


def prompt_field(record, key):
    """A prompt: a non-empty string, or a non-empty list of ``{"role", "content"}`` messages."""
    if key in record and isinstance(record[key], list):
        return messages_field(record, key)
    return text_field(record, key)


def messages_field(record, key):
    """A non-empty list of ``{"role": str, "content": str}`` dicts."""
    if key not in record:
        raise DataError(missing_field_message(record, key))
    messages = record[key]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"field {key!r}: expected a non-empty list of {{role, content}} messages")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(f"field {key!r}, message {i}: expected {{\"role\": str, \"content\": str}}, got {message!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# --- preference templates ---------------------------------------------------------------------


@register_template("align_anything")
def align_anything(record):
    """PKU-Alignment/align-anything text-to-text: ``question, response_1, response_2, overall_response ∈ {1, 2}``."""
    better = choice_field(record, "overall_response", (1, 2))
    responses = {1: text_field(record, "response_1", True), 2: text_field(record, "response_2", True)}
    return PreferenceExample(text_field(record, "question"), responses[better], responses[3 - better])


def _pku_saferlhf(record, label_key):
    better = choice_field(record, label_key, (0, 1))
    responses = {0: text_field(record, "response_0", True), 1: text_field(record, "response_1", True)}
    return PreferenceExample(text_field(record, "prompt"), responses[better], responses[1 - better])


@register_template("pku_saferlhf")
def pku_saferlhf(record):
    """PKU-SafeRLHF, helpfulness preference: ``prompt, response_0, response_1, better_response_id ∈ {0, 1}``."""
    return _pku_saferlhf(record, "better_response_id")


@register_template("pku_saferlhf_safe")
def pku_saferlhf_safe(record):
    """PKU-SafeRLHF, harmlessness preference: the same keys, labelled by ``safer_response_id ∈ {0, 1}``."""
    return _pku_saferlhf(record, "safer_response_id")


HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def _split_hh_transcript(transcript, field):
    """``"\\n\\nHuman: q\\n\\nAssistant: a ..."`` -> (messages before the last assistant turn, last response)."""
    cut = transcript.rfind(ASSISTANT)
    if cut < 0:
        raise DataError(f"field {field!r}: expected a transcript with '\\n\\nHuman:' and '\\n\\nAssistant:' turns")
    # Some copies drop the leading "\n\n" of the first turn; put it back so every turn splits alike.
    history, response = "\n\n" + transcript[:cut].lstrip("\n"), transcript[cut + len(ASSISTANT):]
    messages = []
    for turn in history.split(HUMAN)[1:]:
        user, *assistant = turn.split(ASSISTANT)
        messages.append({"role": "user", "content": user.strip()})
        messages += [{"role": "assistant", "content": a.strip()} for a in assistant]
    if not messages:
        raise DataError(f"field {field!r}: no '\\n\\nHuman:' turn before the last '\\n\\nAssistant:'")
    return messages, response.strip()


@register_template("hh_rlhf")
def hh_rlhf(record):
    """Anthropic HH-RLHF: ``chosen`` and ``rejected`` are whole transcripts sharing all but the last turn.

    The shared history becomes the prompt (a message list, multi-turn kept); the two final
    assistant turns become the responses.
    """
    prompt, chosen = _split_hh_transcript(text_field(record, "chosen"), "chosen")
    rejected_prompt, rejected = _split_hh_transcript(text_field(record, "rejected"), "rejected")
    if rejected_prompt != prompt:
        raise SkipRecord("chosen and rejected transcripts have different histories")
    return PreferenceExample(prompt, chosen, rejected)


@register_template("trl_standard")
def trl_standard(record):
    """TRL's standard preference format: ``prompt, chosen, rejected`` strings."""
    return PreferenceExample(
        text_field(record, "prompt"), text_field(record, "chosen", True), text_field(record, "rejected", True)
    )


@register_template("trl_conversational")
def trl_conversational(record):
    """TRL's conversational format: ``prompt`` messages, ``chosen``/``rejected`` = ``[assistant message]``.

    The implicit-prompt variant (no ``prompt``; ``chosen``/``rejected`` are whole conversations)
    is accepted too: the shared leading messages become the prompt.
    """
    chosen, rejected = messages_field(record, "chosen"), messages_field(record, "rejected")
    if "prompt" in record:
        prompt = messages_field(record, "prompt")
    else:  # implicit prompt: everything but the last message, which must agree
        prompt = chosen[:-1]
        if not prompt or rejected[:-1] != prompt:
            raise DataError("fields 'chosen'/'rejected': without 'prompt' they must share all but their last message")
        chosen, rejected = chosen[-1:], rejected[-1:]
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise DataError(f"field {key!r}: expected exactly one assistant message")
    return PreferenceExample(prompt, chosen[0]["content"], rejected[0]["content"])


@register_template("homework")
def homework_template(record):
    """HOMEWORK: ``{"instruction": str, "output_a": str, "output_b": str, "preferred": "a" | "b"}``.

    Return a ``PreferenceExample`` whose ``chosen`` is the preferred output. Use the field helpers
    so a bad record gets an error naming the field: ``text_field`` (``allow_empty=True`` for
    outputs; the loader skips empty ones) and ``choice_field`` for the label.

    Hint: model it on ``align_anything`` above: pick the label, then index a dict of the outputs.
    """
    # BEGIN SOLUTION
    preferred = choice_field(record, "preferred", ("a", "b"))
    outputs = {"a": text_field(record, "output_a", True), "b": text_field(record, "output_b", True)}
    other = "b" if preferred == "a" else "a"
    return PreferenceExample(text_field(record, "instruction"), outputs[preferred], outputs[other])
    # END SOLUTION


# --- prompt-only, SFT and unpaired (KTO) templates ----------------------------------------------


@register_template("prompt")
def prompt_only(record):
    """Prompts for PPO/GRPO: ``prompt`` (or ``question``), string or messages; optional ``answer``."""
    key = "prompt" if "prompt" in record else "question"
    return PromptExample(prompt_field(record, key), record.get("answer"))


@register_template("sft")
def sft(record):
    """SFT pairs: ``prompt`` (string or messages) and ``response`` (or TRL's ``completion``)."""
    key = "completion" if "completion" in record and "response" not in record else "response"
    return SFTExample(prompt_field(record, "prompt"), text_field(record, key, True))


@register_template("sft_messages")
def sft_messages(record):
    """SFT conversations: ``messages`` ending in an assistant turn, which is the response."""
    messages = messages_field(record, "messages")
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise DataError("field 'messages': expected at least one turn followed by a final assistant message")
    return SFTExample(messages[:-1], messages[-1]["content"])


@register_template("kto")
def kto(record):
    """Unpaired thumbs-up/down (TRL's format): ``prompt, completion, label`` with ``label`` a bool."""
    if "label" not in record:
        raise DataError(missing_field_message(record, "label"))
    label = record["label"]
    if not isinstance(label, bool):
        raise DataError(f"field 'label': expected true or false, got {label!r}")
    return KTOExample(prompt_field(record, "prompt"), text_field(record, "completion", True), label)
