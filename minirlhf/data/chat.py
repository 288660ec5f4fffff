"""Chat formatting and truncation: (prompt, response) -> ``input_ids`` + ``response_mask``.

The prompt is rendered with the tokenizer's own chat template (the format the model was
instruction-tuned on), ending in the generation prompt (Qwen: ``<|im_start|>assistant\\n``). The
response is tokenized on its own and followed by the template's end-of-turn token (Qwen:
``<|im_end|>``), which the model must learn to emit to stop::

    input_ids      <|im_start|>system ... <|im_start|>assistant\\n  Paris  .  <|im_end|>
    response_mask  0 ................................................ 1      1  1

Tokenizing the two parts separately is deliberate: it gives exactly the tokens that generation
produces after the same prompt, so SFT/DPO and PPO/GRPO see one tokenization.

Truncation (``max_len`` tokens in all): the prompt loses tokens from the **left** (the end of the
conversation, next to the response, matters most), then the response is cut on the **right**
(a cut response has no end-of-turn token, so the model is not taught to stop there). A response
with no token left is skipped (``SkipRecord``), never trained on as an empty answer.
"""
from dataclasses import dataclass

from minirlhf.data.templates import SkipRecord
from minirlhf.errors import MinirlhfError


@dataclass(frozen=True)
class Truncation:
    """How many tokens were cut: from the left of the prompt, from the right of the response."""

    prompt_tokens_cut: int = 0
    response_tokens_cut: int = 0


def to_messages(prompt, system_prompt=None):
    """A prompt (string or message list) as a message list, with ``system_prompt`` first if given.

    A system message already in the prompt wins over ``system_prompt``. Without either, the
    template's own default applies (Qwen2.5 adds "You are Qwen, created by Alibaba Cloud...").
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def render_prompt(tokenizer, prompt, system_prompt=None):
    """The prompt as text, ending where the assistant's answer begins.

    With a chat template: ``apply_chat_template(messages, add_generation_prompt=True)``. Without
    one (a base model): a string prompt is used verbatim, a conversation as "Role: content" lines.
    """
    if tokenizer.chat_template is not None:
        messages = to_messages(prompt, system_prompt)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, str) and system_prompt is None:
        return prompt
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in to_messages(prompt, system_prompt)]
    return "\n\n".join(lines) + "\n\nAssistant:"


def encode_prompt(tokenizer, prompt, system_prompt=None):
    """Token ids of ``render_prompt``. A chat template writes BOS itself (Llama's ``{{ bos_token }}``),
    so its text is tokenized without special tokens: BOS appears once, never twice."""
    text = render_prompt(tokenizer, prompt, system_prompt)
    add_special_tokens = tokenizer.chat_template is None
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def end_of_turn_ids(tokenizer):
    """Token ids that close an assistant turn: what the chat template writes after the content, up
    to and including its first special token (Qwen: ``[<|im_end|>]``; Llama 3: ``[<|eot_id|>]``).
    Without a chat template, or if the template writes no special token there: ``[eos_token_id]``."""
    if tokenizer.chat_template is not None:
        probe = "minirlhf-response-probe"
        conversation = [{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}]
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        if probe in text:
            suffix = tokenizer(text[text.rindex(probe) + len(probe):], add_special_tokens=False)["input_ids"]
            special = set(tokenizer.all_special_ids)
            for i, token in enumerate(suffix):
                if token in special:
                    return suffix[: i + 1]
    if tokenizer.eos_token_id is None:
        raise MinirlhfError("the tokenizer has no chat template end-of-turn token and no eos token")
    return [tokenizer.eos_token_id]


def encode_response(tokenizer, response, end_ids=None):
    """Token ids of the response followed by the end-of-turn ids (``end_of_turn_ids`` if not given)."""
    end_ids = end_of_turn_ids(tokenizer) if end_ids is None else end_ids
    return tokenizer(response, add_special_tokens=False)["input_ids"] + list(end_ids)


def truncate_prompt_response(prompt_ids, response_ids, max_len, max_prompt_len=None):
    """Join prompt and response into at most ``max_len`` tokens.

    The prompt keeps its last ``min(max_prompt_len, max_len)`` tokens; the response keeps its
    first ``max_len − len(prompt)``. Returns ``(input_ids, response_mask, Truncation)`` (lists of
    ints); raises ``SkipRecord`` if no response token fits.
    """
    keep = len(prompt_ids) if max_prompt_len is None else min(len(prompt_ids), max_prompt_len)
    prompt = prompt_ids[len(prompt_ids) - min(keep, max_len):]
    room = max_len - len(prompt)
    if room <= 0:
        raise SkipRecord("response truncated away (the prompt fills max_len)")
    response = response_ids[:room]
    truncation = Truncation(len(prompt_ids) - len(prompt), len(response_ids) - len(response))
    return prompt + response, [0] * len(prompt) + [1] * len(response), truncation


def tokenize_prompt_response(tokenizer, prompt, response, max_len, max_prompt_len=None, system_prompt=None):
    """(prompt, response) -> ``(input_ids, response_mask, Truncation)``; ``SkipRecord`` if the
    response does not fit at all. ``response_mask`` is 1 on the response tokens including the
    end-of-turn token, 0 on the prompt."""
    prompt_ids = encode_prompt(tokenizer, prompt, system_prompt)
    return truncate_prompt_response(prompt_ids, encode_response(tokenizer, response), max_len, max_prompt_len)
