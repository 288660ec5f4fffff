"""Data: templates (raw record -> example), chat formatting + truncation, loaders, collators."""
from minirlhf.data.chat import tokenize_prompt_response
from minirlhf.data.collate import collate_kto, collate_preference, collate_prompts, collate_sft, pad_sequences
from minirlhf.data.datasets import (
    DataReport,
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
    get_template,
    register_template,
)
