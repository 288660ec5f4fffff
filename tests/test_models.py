"""Models: end-token index, response log-probs, reward/value models, save/load round trips.

Everything runs on ``qwen2_checkpoint``, a local directory shaped like a real Qwen2 checkpoint, so
these tests exercise the code path used with ``Qwen/Qwen2.5-0.5B-Instruct``.
"""
import pytest
import torch

from exercise_checks import exercise_tests
from fixtures import build_gpt2_checkpoint
from minirlhf.core.logprobs import entropy_from_logits, gather_logprobs
from minirlhf.core.masked import masked_sum
from minirlhf.data.collate import collate_sft
from minirlhf.models import (
    RewardModel,
    ValueModel,
    load_policy,
    load_tokenizer,
    make_reference,
    position_ids_from_attention_mask,
    response_logprobs,
    rollout_logprobs,
)
from minirlhf.models.forward import fused_response_logprobs
from minirlhf.models.sampling import next_token_probs

test_exercise_rm_end_score = exercise_tests("rm_end_score")

# (prompt length, total length) of three rows; token ids are arbitrary ids of the tiny vocabulary.
ROWS = [(3, 9), (5, 6), (2, 4)]


def make_examples(pad_id, final_token=None, seed=0):
    """Rows of random ids with response masks; ``final_token`` replaces each row's last token."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for prompt_len, length in ROWS:
        ids = torch.randint(3, 300, (length,), generator=generator).tolist()
        if final_token is not None:
            ids[-1] = final_token
        examples.append({"input_ids": ids, "response_mask": [0] * prompt_len + [1] * (length - prompt_len)})
    return examples


def both_paddings(pad_id, **kwargs):
    examples = make_examples(pad_id, **kwargs)
    return collate_sft(examples, pad_id, "left"), collate_sft(examples, pad_id, "right")


def unpad(batch, row, values, shift=0):
    """The real (non-pad) entries of ``values[row]``; ``shift=1`` for label-aligned [B, T] values."""
    keep = batch["attention_mask"][row, shift:].bool()
    return values[row][keep]


def test_position_ids_start_at_zero_on_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_attention_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def reference_logprobs(model, ids, response_mask):
    """Brute force: the whole row unpadded, full logits, log_softmax."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    logps = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    entropy = -(logits.softmax(-1) * torch.log_softmax(logits, -1)).sum(-1)
    mask = torch.tensor(response_mask[1:]).bool()
    return logps[mask], entropy[mask]


def test_response_logprobs_match_brute_force_for_left_and_right_padding(tiny_policy, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    examples = make_examples(pad)
    for side in ("left", "right"):
        batch = collate_sft(examples, pad, side)
        with torch.no_grad():
            logps, mask, entropy = response_logprobs(tiny_policy, **batch, return_entropy=True)
        B, L = batch["input_ids"].shape
        assert logps.shape == mask.shape == entropy.shape == (B, L - 1) and logps.dtype == torch.float32
        assert torch.equal(mask, batch["response_mask"][:, 1:])
        for row, example in enumerate(examples):
            expected_logps, expected_entropy = reference_logprobs(tiny_policy, example["input_ids"], example["response_mask"])
            got = logps[row][mask[row].bool()].double()
            torch.testing.assert_close(got, expected_logps, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(entropy[row][mask[row].bool()].double(), expected_entropy, atol=1e-5, rtol=1e-5)
        first_label = min(prompt_len for prompt_len, _ in ROWS) - 1
        if side == "right":  # columns before the earliest response label are never computed
            assert (logps[:, :first_label] == 0).all()


def test_response_logprobs_compute_logits_only_from_the_first_response_label(tiny_policy, tiny_tokenizer):
    batch = collate_sft(make_examples(tiny_tokenizer.pad_token_id), tiny_tokenizer.pad_token_id, "right")
    seen = []
    handle = tiny_policy.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    try:
        with torch.no_grad():
            response_logprobs(tiny_policy, **batch)
    finally:
        handle.remove()
    first_label = min(prompt_len for prompt_len, _ in ROWS) - 1  # label column of the earliest response token
    assert seen == [batch["input_ids"].shape[1] - first_label]


def test_response_logprobs_temperature_and_gradient(qwen2_checkpoint, tiny_tokenizer):
    model = load_policy(qwen2_checkpoint)
    batch = collate_sft(make_examples(tiny_tokenizer.pad_token_id), tiny_tokenizer.pad_token_id, "left")
    logps, mask = response_logprobs(model, **batch, temperature=2.0)
    (logps * mask).sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    with torch.no_grad():
        hot, _ = response_logprobs(model, **batch, temperature=2.0)
        cold, _ = response_logprobs(model, **batch)
    assert not torch.allclose(hot[mask.bool()], cold[mask.bool()])


def test_reward_model_end_scores_for_left_right_padding_and_pad_equal_eos(qwen2_checkpoint, tiny_tokenizer):
    rm = RewardModel.from_causal_lm(qwen2_checkpoint).eval()
    pad = tiny_tokenizer.pad_token_id
    # Every row ends in a real token whose id equals the pad id (pad == eos).
    left, right = both_paddings(pad, final_token=pad)
    with torch.no_grad():
        left_scores, left_end = rm(left["input_ids"], left["attention_mask"])
        right_scores, right_end = rm(right["input_ids"], right["attention_mask"])
        for row, example in enumerate(make_examples(pad, final_token=pad)):
            alone_scores, alone_end = rm(torch.tensor([example["input_ids"]]), torch.ones(1, len(example["input_ids"])))
            torch.testing.assert_close(unpad(left, row, left_scores), alone_scores[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(unpad(right, row, right_scores), alone_scores[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(alone_end[0], alone_scores[0, -1])
    assert left_end.shape == (len(ROWS),) and left_end.dtype == torch.float32
    torch.testing.assert_close(left_end, right_end, atol=1e-5, rtol=1e-5)


def test_reward_model_head_is_seeded_and_sized(qwen2_checkpoint):
    a, b, c = (RewardModel.from_causal_lm(qwen2_checkpoint, seed=s) for s in (0, 0, 1))
    assert a.score_head.weight.shape == (1, a.config.hidden_size) and a.score_head.bias is None
    assert torch.equal(a.score_head.weight, b.score_head.weight)
    assert not torch.equal(a.score_head.weight, c.score_head.weight)


def test_reward_model_save_load_with_minirlhf_and_plain_transformers(qwen2_checkpoint, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rm = RewardModel.from_causal_lm(qwen2_checkpoint, seed=3).eval()
    rm.save_pretrained(tmp_path / "rm", tokenizer=tiny_tokenizer)
    assert not list((tmp_path / "rm").glob("*.tmp"))
    # Rows ending in real tokens != pad: HF pools at the last non-pad id, we pool by the mask.
    left, right = both_paddings(tiny_tokenizer.pad_token_id)
    ours = RewardModel.from_pretrained(tmp_path / "rm").eval()
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(hf).__name__ == "Qwen2ForSequenceClassification" and hf.config.num_labels == 1
    with torch.no_grad():
        expected = rm(right["input_ids"], right["attention_mask"])[1]
        for batch in (left, right):
            torch.testing.assert_close(ours(batch["input_ids"], batch["attention_mask"])[1], expected, atol=1e-5, rtol=1e-5)
            hf_scores = hf(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=position_ids_from_attention_mask(batch["attention_mask"]),
            ).logits[:, 0]
            torch.testing.assert_close(hf_scores, expected, atol=1e-5, rtol=1e-5)
    assert load_tokenizer(tmp_path / "rm").chat_template == tiny_tokenizer.chat_template


def test_value_model_shares_the_architecture_and_loads_a_reward_model(qwen2_checkpoint, tiny_tokenizer, tmp_path):
    rm = RewardModel.from_causal_lm(qwen2_checkpoint, seed=5).eval()
    rm.save_pretrained(tmp_path / "rm")
    critic = ValueModel.from_pretrained(tmp_path / "rm").eval()  # PPO often starts the critic from the RM
    left, right = both_paddings(tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        values = critic(left["input_ids"], left["attention_mask"])
        scores, _ = rm(left["input_ids"], left["attention_mask"])
        right_values = critic(right["input_ids"], right["attention_mask"])
    assert values.shape == left["input_ids"].shape and values.dtype == torch.float32
    torch.testing.assert_close(values, scores)
    for row in range(len(ROWS)):
        torch.testing.assert_close(unpad(left, row, values), unpad(right, row, right_values), atol=1e-5, rtol=1e-5)
    critic.save_pretrained(tmp_path / "critic")
    with torch.no_grad():
        reloaded = ValueModel.from_pretrained(tmp_path / "critic")(left["input_ids"], left["attention_mask"])
    torch.testing.assert_close(reloaded, values)
    fresh = ValueModel.from_causal_lm(qwen2_checkpoint, seed=5)
    torch.testing.assert_close(fresh.score_head.weight, rm.score_head.weight)


def test_policy_save_load_gives_identical_logits(tiny_policy, tmp_path):
    tiny_policy.save_pretrained(tmp_path / "policy")
    assert (tmp_path / "policy" / "model.safetensors").exists()
    reloaded = load_policy(tmp_path / "policy")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(tiny_policy(ids).logits, reloaded(ids).logits)


def test_load_policy_dtype_and_pad_token(qwen2_checkpoint):
    model = load_policy(qwen2_checkpoint, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.pad_token_id == load_tokenizer(qwen2_checkpoint).pad_token_id


def test_bf16_response_logprobs_are_float32(qwen2_checkpoint, tiny_tokenizer):
    model = load_policy(qwen2_checkpoint, dtype=torch.bfloat16)
    batch = collate_sft(make_examples(tiny_tokenizer.pad_token_id), tiny_tokenizer.pad_token_id, "left")
    with torch.no_grad():
        logps, _ = response_logprobs(model, **batch)
    assert logps.dtype == torch.float32


def test_load_tokenizer_without_pad_uses_eos_and_keeps_the_side(qwen2_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen2_checkpoint)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "nopad")
    loaded = load_tokenizer(tmp_path / "nopad", padding_side="left")
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>" and loaded.padding_side == "left"


def test_make_reference_is_a_frozen_independent_copy(qwen2_checkpoint):
    policy = load_policy(qwen2_checkpoint).train()
    reference = make_reference(policy)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in policy.parameters()) and policy.training
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)
    assert not torch.equal(next(policy.parameters()), next(reference.parameters()))


# ---------------------------------------------------------------------------------------------
# The same numbers in every pass: dropout off, temperature in float32
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    """A tiny GPT-2 with dropout 0.1 everywhere (Qwen2 has none), built from its config."""
    return build_gpt2_checkpoint(tmp_path_factory.mktemp("gpt2"), dropout=0.1)


def test_dropout_is_off_so_pi_old_is_pi_and_k1_kl_starts_at_exactly_zero(gpt2_checkpoint, tiny_tokenizer):
    batch = collate_sft(make_examples(tiny_tokenizer.pad_token_id), tiny_tokenizer.pad_token_id, "left")
    policy = load_policy(gpt2_checkpoint).train()  # the online trainers score π_old in train mode
    reference = make_reference(load_policy(gpt2_checkpoint))
    first, mask = rollout_logprobs(policy, batch)
    second, _ = rollout_logprobs(policy, batch)
    ref, _ = rollout_logprobs(reference, batch)
    assert torch.equal(first, second)  # π_old in two passes
    assert torch.equal(masked_sum(first - ref, mask, dim=-1), torch.zeros(len(ROWS)))  # k1 KL at initialisation
    # A training forward (with gradient) is deterministic too, and so are the reward and value models.
    logps, _ = response_logprobs(policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    assert torch.equal(logps.detach(), first)
    for head in (RewardModel, ValueModel):
        model = head.from_causal_lm(str(gpt2_checkpoint)).train()
        with torch.no_grad():
            assert torch.equal(model(batch["input_ids"], batch["attention_mask"])[0],
                               model(batch["input_ids"], batch["attention_mask"])[0])
    # keep_dropout=True keeps GPT-2's dropout: then the two passes differ (what the default prevents).
    noisy = load_policy(gpt2_checkpoint, keep_dropout=True).train()
    assert not torch.equal(rollout_logprobs(noisy, batch)[0], rollout_logprobs(noisy, batch)[0])
    assert noisy.config.attn_pdrop == 0.1 and policy.config.attn_pdrop == 0.0


def test_disable_dropout_reaches_modules_attention_attributes_and_config(qwen2_checkpoint):
    from minirlhf.models.policy import disable_dropout

    model = load_policy(qwen2_checkpoint, keep_dropout=True)
    model.config.attention_dropout = 0.3
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3  # what Qwen2's attention reads in train mode
    model.extra = torch.nn.Dropout(0.5)
    disable_dropout(model)
    assert model.config.attention_dropout == 0.0 and model.extra.p == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_temperature_divides_float32_logits_when_scoring_and_sampling(qwen2_checkpoint, tiny_tokenizer, dtype):
    """Scoring (``response_logprobs``) and sampling (``next_token_probs``) both compute
    softmax(float32(z) / τ): for bf16 logits, dividing before the upcast would round them again."""
    model = load_policy(qwen2_checkpoint, dtype=dtype)
    examples = make_examples(tiny_tokenizer.pad_token_id)
    for example in examples:  # the response starts at column 1: every logit column is scored
        example["response_mask"] = [0] + [1] * (len(example["input_ids"]) - 1)
    batch = collate_sft(examples, tiny_tokenizer.pad_token_id, "right")
    temperature = 0.7
    with torch.no_grad():
        logps, mask, entropy = response_logprobs(model, **batch, temperature=temperature, return_entropy=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=position_ids_from_attention_mask(batch["attention_mask"]), use_cache=False,
                       logits_to_keep=batch["input_ids"].shape[1]).logits[:, :-1]
    assert logits.dtype == dtype
    reference = torch.log_softmax(logits.float().double() / temperature, dim=-1)  # float32(z), then / τ
    labels = batch["input_ids"][:, 1:]
    expected = reference.gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(logps[mask.bool()].double(), expected[mask.bool()], atol=2e-6, rtol=0)
    expected_entropy = -(reference.exp() * reference).sum(-1)
    torch.testing.assert_close(entropy[mask.bool()].double(), expected_entropy[mask.bool()], atol=2e-5, rtol=0)
    # The sampler's distribution at each position is the one the log-probs score.
    probs = next_token_probs(logits.reshape(-1, logits.shape[-1]), temperature)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.double(), reference.exp().reshape(probs.shape), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gather_logprobs(logits, labels, temperature), logps, atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy_from_logits(logits, temperature)[mask.bool()], entropy[mask.bool()])
    # The fused LM-head path divides inside its float32 log-softmax too.
    with torch.no_grad():
        fused, _, fused_entropy = fused_response_logprobs(model, **batch, temperature=temperature, return_entropy=True)
    torch.testing.assert_close(fused[mask.bool()].double(), expected[mask.bool()], atol=2e-6, rtol=0)
    torch.testing.assert_close(fused_entropy[mask.bool()].double(), expected_entropy[mask.bool()], atol=2e-5, rtol=0)
