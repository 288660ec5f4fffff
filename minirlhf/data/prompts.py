"""Prompt sets: what the online trainers (PPO, GRPO, RLOO, online DPO) sample responses to.

A prompt file (``load_prompt_data``: one ``prompt`` or ``question`` per record, optionally an
``answer``) is cycled through ``batch_size`` prompts per iteration; each iteration's prompts come
as one left-padded batch, the layout ``generate_rollouts`` expects.
"""
import sys

from minirlhf.data.collate import collate_prompts, to_device
from minirlhf.data.datasets import load_prompt_data
from minirlhf.data.order import BatchSchedule


def prompt_text(prompt):
    """The user's request as text: the string itself, or the last user turn of a message list."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def prompt_batch(examples, pad_id, device):
    """Prompt examples (``load_prompt_data``) as one batch for ``generate_rollouts``:
    ``input_ids``, ``attention_mask`` ``[B0, P]`` (left-padded), ``prompts`` (the user requests as
    text) and ``answers`` (or None each), on ``device``."""
    batch = collate_prompts(examples, pad_id)
    batch["prompts"] = [prompt_text(p) for p in batch.pop("prompt")]
    batch["answers"] = batch.pop("answer")
    return to_device(batch, device)


class PromptSet:
    """The prompts an online trainer cycles through, ``batch_size`` per iteration.

    Iteration ``i`` uses the prompts ``BatchSchedule(n, batch_size, seed).batch(i)`` (each pass
    over the file in a fresh seeded order), so the prompts of an iteration depend only on
    ``(seed, i)`` and ``--resume`` continues exactly. ``texts`` holds every prompt as text. The
    file's ``DataReport`` is printed to stderr.
    """

    def __init__(self, path, tokenizer, template, batch_size, seed, max_prompt_len, system_prompt=None):
        self.examples, report = load_prompt_data(path, template, tokenizer, max_prompt_len, system_prompt)
        print(report, file=sys.stderr)
        self.pad_id = tokenizer.pad_token_id
        self.schedule = BatchSchedule(len(self.examples), batch_size, 1.0, seed)
        self.texts = [prompt_text(e["prompt"]) for e in self.examples]

    def batch(self, iteration, device, share=None):
        """Iteration ``iteration``'s prompts: ``input_ids``, ``attention_mask`` ``[B0, P]``
        (left-padded), ``prompts`` (the user requests as text) and ``answers`` (or None each).
        ``share`` picks this process's part of the prompt indices (data parallelism: ``rank_share``)."""
        indices = self.schedule.batch(iteration)
        return prompt_batch([self.examples[i] for i in (share(indices) if share else indices)], self.pad_id, device)
