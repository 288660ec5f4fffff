"""Data: templates (raw record -> example), chat formatting + truncation, loaders, collators,
data order, prompt sets, atomic file writes."""
from minirlhf.data.atomic import atomic_file, write_dir_atomic, write_jsonl_atomic, write_text_atomic
from minirlhf.data.chat import tokenize_prompt_response
from minirlhf.data.collate import (
    collate_kto,
    collate_preference,
    collate_prompts,
    collate_rankings,
    collate_sft,
    pad_sequences,
    to_device,
)
from minirlhf.data.datasets import (
    DataReport,
    load_kto_data,
    load_preference_data,
    load_prompt_data,
    load_sft_data,
    read_records,
)
from minirlhf.data.order import BatchSchedule, epoch_permutation, hold_out
from minirlhf.data.prompts import PromptSet, prompt_batch, prompt_text
from minirlhf.data.rankings import load_ranking_data
from minirlhf.data.templates import (
    KTOExample,
    PreferenceExample,
    PromptExample,
    SFTExample,
    get_template,
    register_template,
)
