"""Every public core function enforces the shapes its docstring states (issue 11, section 1).

Two parts: the cases the issue measured (each a silent wrong number before the contracts), with
the layouts that stay accepted computing the right thing; then a sweep that calls every public
core function once with valid arguments and once per wrongly shaped (or typed) argument, and
expects a ValueError that names the function and that argument.
"""
import importlib
import inspect
import pkgutil

import pytest
import torch

import minirlhf.core
from minirlhf import (
    aggregate_token_losses,
    clipped_surrogate,
    dpo_loss,
    dpop_penalty,
    gae_advantages,
    group_advantages,
    grpo_loss,
    kl_penalty,
    kl_shaped_rewards,
    kto_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    rdpo_length_margin,
    shift_for_next_token,
)

F64 = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def rollout(batch_size, num_tokens, seed=0):
    """logprobs, old_logprobs, ref_logprobs [B, T] and a right-padded bool mask with a full row 0."""
    lengths = torch.randint(1, num_tokens + 1, (batch_size,), generator=torch.Generator().manual_seed(seed))
    lengths[0] = num_tokens
    mask = torch.arange(num_tokens)[None, :] < lengths[:, None]
    old = -randn(batch_size, num_tokens, seed=seed + 1).abs()
    logprobs = old + 0.3 * randn(batch_size, num_tokens, seed=seed + 2)
    return logprobs, old, old + randn(batch_size, num_tokens, seed=seed + 3), mask


# ---------------------------------------------------------------- the cases the issue measured


def test_grpo_loss_rejects_column_advantages_instead_of_cancelling_the_gradient():
    # [B, 1] advantages used to broadcast to [B, B, T]: with group advantages (zero mean over the
    # batch) the gradient cancelled to ~1e-9 while the loss looked plausible.
    logprobs, old, ref, mask = rollout(6, 8)
    advantages = group_advantages(randn(6, seed=4), 3)
    with pytest.raises(ValueError, match=r"^grpo_loss: advantages must have shape \[B=6\] or \[B=6, T=8\]"):
        grpo_loss(logprobs, old, ref, advantages[:, None], mask)
    with pytest.raises(ValueError, match=r"^clipped_surrogate: advantages must have shape"):
        clipped_surrogate(logprobs, old, advantages[:, None])


def test_grpo_loss_per_token_advantages_equal_the_per_sequence_ones_repeated():
    logprobs, old, ref, mask = rollout(6, 8)
    advantages = randn(6, seed=5)
    per_sequence = grpo_loss(logprobs, old, ref, advantages, mask)
    per_token = grpo_loss(logprobs, old, ref, advantages[:, None].expand(6, 8), mask)
    for a, b in zip(per_sequence, per_token):
        torch.testing.assert_close(a, b)
    step = torch.where(mask, randn(6, 8, seed=6), 0.0)  # genuinely per-token advantages: the formula by hand
    ratio = (logprobs - old).exp()
    token_losses = -torch.minimum(ratio * step, ratio.clamp(0.8, 1.2) * step) + 0.04 * kl_penalty(logprobs, ref, "k3")
    expected = ((token_losses * mask).sum(-1) / mask.sum(-1)).mean()
    torch.testing.assert_close(grpo_loss(logprobs, old, ref, step, mask)[0], expected)


@pytest.mark.parametrize("loss", ["ppo_policy_loss", "grpo_loss", "clipped_surrogate"])
def test_per_sequence_advantages_meet_their_rows_when_batch_equals_length(loss):
    # B == T: a [B] advantage used to broadcast as a *row*, giving token t the advantage of sequence t.
    logprobs, old, ref, mask = rollout(5, 5, seed=7)
    advantages = randn(5, seed=8)
    expanded = advantages[:, None].expand(5, 5)
    call = {
        "ppo_policy_loss": lambda a: ppo_policy_loss(logprobs, old, a, mask),
        "grpo_loss": lambda a: grpo_loss(logprobs, old, ref, a, mask),
        "clipped_surrogate": lambda a: clipped_surrogate(logprobs, old, a),
    }[loss]
    for a, b in zip(call(advantages), call(expanded)):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(call(advantages)[0], call(advantages[None, :].expand(5, 5))[0])  # the old reading


def test_dpo_logit_offset_is_a_scalar_or_one_per_pair():
    logps = [randn(4, seed=s) - 10 for s in range(4)]
    expected = r"^dpo_loss: logit_offset must be None or a scalar or a tensor of shape \[4\] \(as in policy_chosen"
    with pytest.raises(ValueError, match=expected):
        dpo_loss(*logps, logit_offset=torch.zeros(4, 1))  # used to give [4, 4] losses, hidden by .mean()
    with pytest.raises(ValueError, match="logit_offset"):
        dpo_loss(*logps, logit_offset=torch.zeros(3))
    offset = randn(4, seed=9)
    per_pair = dpo_loss(*logps, logit_offset=torch.full((4,), 0.3, dtype=F64))[0]
    for scalar in (0.3, torch.tensor(0.3)):
        torch.testing.assert_close(dpo_loss(*logps, logit_offset=scalar)[0], per_pair)
    assert dpo_loss(*logps, logit_offset=offset)[0].shape == (4,)


def test_dpo_loss_takes_one_summed_log_prob_per_response():
    token_logps = [randn(4, 6, seed=s) - 1 for s in range(4)]  # [B, T], never summed: per-token "losses"
    with pytest.raises(ValueError, match=r"^dpo_loss: policy_chosen_logps must have shape \[B\] \(or \[\] for one"):
        dpo_loss(*token_logps)
    one_pair = [x.sum(-1)[0] for x in token_logps]  # 0-dim: a single pair, as the notebooks use it
    torch.testing.assert_close(dpo_loss(*one_pair)[0], dpo_loss(*[x.sum(-1) for x in token_logps])[0][0])
    with pytest.raises(ValueError, match=r"^dpo_loss: policy_rejected_logps must have shape \[\]"):
        dpo_loss(one_pair[0], *[x.sum(-1) for x in token_logps[1:]])  # one pair against a batch


@pytest.mark.parametrize("kl_reference", [torch.zeros(4, 1), torch.full((4,), 0.2), torch.tensor([0.2]), [0.2] * 4])
def test_kto_kl_reference_is_one_number_for_the_batch(kl_reference):
    policy, ref = randn(4, seed=1) - 10, randn(4, seed=2) - 10
    desirable = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match=r"^kto_loss: kl_reference must be a scalar"):
        kto_loss(policy, ref, desirable, kl_reference)
    kto_loss(policy, ref, desirable, 0.2)
    kto_loss(policy, ref, desirable, torch.tensor(0.2))


def test_ppo_value_loss_rejects_a_value_heads_trailing_dimension():
    values = randn(4, 4, 1)  # B == T: this used to broadcast to [4, 4, 4] without an error
    old_values, returns = randn(4, 4, seed=1), randn(4, 4, seed=2)
    with pytest.raises(ValueError, match=r"^ppo_value_loss: values must have shape \[B, T\], got \[4, 4, 1\]"):
        ppo_value_loss(values, old_values, returns, torch.ones(4, 4))
    with pytest.raises(ValueError, match=r"^ppo_value_loss: old_values must have shape \[B=4, T=4\]"):
        ppo_value_loss(values[..., 0], old_values[..., None], returns, torch.ones(4, 4))


@pytest.mark.parametrize("reduce", ["masked_sum", "masked_mean", "masked_var", "masked_whiten", "sequence_mean",
                                    "token_mean", "fixed_length"])
def test_masks_are_never_broadcast(reduce):
    x = randn(4, 4)
    row_mask = torch.tensor([1, 1, 0, 1])  # [B] with B == T: used to mask columns silently
    call = {
        "masked_sum": masked_sum, "masked_mean": masked_mean, "masked_var": masked_var, "masked_whiten": masked_whiten,
    }.get(reduce, lambda x, m: aggregate_token_losses(x, m, reduce))
    name = "aggregate_token_losses" if reduce in ("sequence_mean", "token_mean", "fixed_length") else reduce
    for mask in (row_mask, row_mask[:, None], row_mask[None, :]):
        with pytest.raises(ValueError, match=rf"^{name}: mask must have shape"):
            call(x, mask)
    call(x, row_mask[:, None].expand(4, 4))


def test_kl_functions_check_every_input():
    logprobs, _, ref, mask = rollout(4, 4)
    with pytest.raises(ValueError, match=r"^kl_penalty: ref_logprobs must have shape \[4, 4\] \(as in logprobs\)"):
        kl_penalty(logprobs, ref[:, 0])  # [B] against [B, T] with B == T: used to broadcast as a row
    score = randn(4, seed=5)
    with pytest.raises(ValueError, match=r"^kl_shaped_rewards: ref_logprobs must have shape \[B=4, T=4\]"):
        kl_shaped_rewards(score, logprobs, ref[:, :3], mask, 0.1)
    with pytest.raises(ValueError, match=r"^kl_shaped_rewards: score must have shape \[B=4\]"):
        kl_shaped_rewards(score[:, None], logprobs, ref, mask, 0.1)
    with pytest.raises(ValueError, match=r"^kl_shaped_rewards: mask must have shape \[B=4, T=4\]"):
        kl_shaped_rewards(score, logprobs, ref, mask[0], 0.1)


def test_dpop_and_rdpo_terms_are_one_per_pair():
    chosen, ref = randn(4) - 10, randn(4, seed=1) - 10
    with pytest.raises(ValueError, match=r"^dpop_penalty: ref_chosen_logps must have shape \[B=4\]"):
        dpop_penalty(chosen, ref[:, None])  # used to give a [4, 4] penalty
    lengths = torch.tensor([3, 5, 2, 7])
    with pytest.raises(ValueError, match=r"^rdpo_length_margin: rejected_lengths must have shape \[B=4\]"):
        rdpo_length_margin(lengths, lengths[:, None], 0.1)


def test_gae_refuses_a_reward_column_it_would_drop():
    values, mask = randn(3, 5), torch.ones(3, 5)
    expected = r"^gae_advantages: values must have shape \[B=3, T=6\] \(B, T as in rewards\), got \[3, 5\]"
    with pytest.raises(ValueError, match=expected):
        gae_advantages(randn(3, 6), values, mask)
    with pytest.raises(ValueError, match=r"^gae_advantages: values must be a floating-point tensor"):
        gae_advantages(randn(3, 5), values.long(), mask)  # integer values: advantages truncated to integers


def test_shift_needs_two_positions():
    with pytest.raises(ValueError, match=r"^shift_for_next_token: input_ids must have L >= 2"):
        shift_for_next_token(randn(2, 1, 5), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))


# ---------------------------------------------------------------- the sweep: every function, every argument

B, T, V, P, K, G = 2, 3, 5, 2, 3, 3  # distinct sizes (L = T + 1 = 4), so any mix-up shows
L = T + 1


def f(*shape):
    return randn(*shape, seed=sum(shape)) - 1.0


def long(*shape):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(0))


def ones(*shape):
    return torch.ones(shape, dtype=torch.bool)


VALID = {  # function -> a valid call's keyword arguments
    "shift_for_next_token": lambda: dict(logits=f(B, L, V), input_ids=long(B, L), mask=ones(B, L)),
    "gather_logprobs": lambda: dict(logits=f(B, T, V), labels=long(B, T)),
    "entropy_from_logits": lambda: dict(logits=f(B, T, V)),
    "sequence_logprobs": lambda: dict(token_logprobs=f(B, T), mask=ones(B, T)),
    "masked_sum": lambda: dict(x=f(B, T), mask=ones(B, T)),
    "masked_mean": lambda: dict(x=f(B, T), mask=ones(B, T)),
    "masked_var": lambda: dict(x=f(B, T), mask=ones(B, T)),
    "masked_whiten": lambda: dict(x=f(B, T), mask=ones(B, T), eps=1e-8),
    "aggregate_token_losses": lambda: dict(token_losses=f(B, T), mask=ones(B, T), aggregation="fixed_length",
                                           max_len=8),
    "bradley_terry_loss": lambda: dict(chosen_rewards=f(B), rejected_rewards=f(B), margin=f(B), center_coef=0.1),
    "kwise_bradley_terry_loss": lambda: dict(rewards=f(P, K), mask=ones(P, K)),
    "plackett_luce_loss": lambda: dict(rewards=f(P, K), mask=ones(P, K)),
    "dpo_loss": lambda: dict(policy_chosen_logps=f(B), policy_rejected_logps=f(B), ref_chosen_logps=f(B),
                             ref_rejected_logps=f(B), beta=0.1, label_smoothing=0.0, logit_offset=f(B)),
    "dpop_penalty": lambda: dict(policy_chosen_logps=f(B), ref_chosen_logps=f(B), lam=5.0),
    "rdpo_length_margin": lambda: dict(chosen_lengths=long(B), rejected_lengths=long(B), alpha=0.1),
    "simpo_loss": lambda: dict(policy_chosen_avg_logps=f(B), policy_rejected_avg_logps=f(B), beta=2.0, gamma=0.5),
    "log1mexp": lambda: dict(x=-f(B, T).abs()),
    "orpo_loss": lambda: dict(policy_chosen_avg_logps=f(B), policy_rejected_avg_logps=f(B), lam=0.1),
    "kto_loss": lambda: dict(policy_logps=f(B), ref_logps=f(B), desirable=ones(B), kl_reference=0.1, beta=0.1,
                             desirable_weight=1.0, undesirable_weight=1.0),
    "kl_penalty": lambda: dict(logprobs=f(B, T), ref_logprobs=f(B, T)),
    "kl_shaped_rewards": lambda: dict(score=f(B), logprobs=f(B, T), ref_logprobs=f(B, T), mask=ones(B, T), beta=0.1),
    "gae_advantages": lambda: dict(rewards=f(B, T), values=f(B, T), mask=ones(B, T), gamma=1.0, lam=0.95),
    "clipped_surrogate": lambda: dict(logprobs=f(B, T), old_logprobs=f(B, T), advantages=f(B), clip_eps=0.2),
    "ppo_policy_loss": lambda: dict(logprobs=f(B, T), old_logprobs=f(B, T), advantages=f(B, T), mask=ones(B, T),
                                    clip_eps=0.2),
    "ppo_value_loss": lambda: dict(values=f(B, T), old_values=f(B, T), returns=f(B, T), mask=ones(B, T),
                                   clip_range=0.2),
    "group_advantages": lambda: dict(rewards=f(B * G), group_size=G, eps=1e-4),
    "rloo_advantages": lambda: dict(rewards=f(B * G), group_size=G),
    "grpo_loss": lambda: dict(logprobs=f(B, T), old_logprobs=f(B, T), ref_logprobs=f(B, T), advantages=f(B),
                              mask=ones(B, T), clip_eps=0.2, beta=0.04),
    "fused_head_logprobs": lambda: dict(hidden=f(B, K), weight=f(V, K), labels=long(B), bias=f(V), temperature=1.0),
    "pair_accuracy": lambda: dict(chosen_rewards=f(B), rejected_rewards=f(B)),
    "best_of_n_value": lambda: dict(selector_scores=f(P, K), values=f(P, K), n=2),
    "best_of_n_kl": lambda: dict(n=4),
    "reliability_bins": lambda: dict(probabilities=f(B).sigmoid(), outcomes=ones(B), num_bins=5),
    "expected_calibration_error": lambda: dict(probabilities=f(B).sigmoid(), outcomes=ones(B), num_bins=5),
}

BAD = [  # (function, argument, wrong value, what is wrong)
    ("shift_for_next_token", "logits", f(B, T, V), "already shifted"),
    ("shift_for_next_token", "logits", f(B, L), "rank"),
    ("shift_for_next_token", "logits", long(B, L, V), "dtype"),
    ("shift_for_next_token", "input_ids", long(B, L, 1), "rank"),
    ("shift_for_next_token", "input_ids", f(B, L), "dtype"),
    ("shift_for_next_token", "mask", ones(B, T), "length"),
    ("shift_for_next_token", "mask", ones(B), "rank"),
    ("shift_for_next_token", "mask", [[1] * L] * B, "not a tensor"),
    ("gather_logprobs", "logits", f(B, T), "rank"),
    ("gather_logprobs", "logits", long(B, T, V), "dtype"),
    ("gather_logprobs", "labels", long(B, L), "length"),
    ("gather_logprobs", "labels", long(T, B), "transposed"),
    ("gather_logprobs", "labels", long(B, T, 1), "rank"),
    ("gather_logprobs", "labels", long(B, T).float(), "dtype"),
    ("entropy_from_logits", "logits", f(B, T), "rank"),
    ("entropy_from_logits", "logits", long(B, T, V), "dtype"),
    ("entropy_from_logits", "logits", None, "not a tensor"),
    ("sequence_logprobs", "token_logprobs", f(B, T, 1), "rank"),
    ("sequence_logprobs", "token_logprobs", long(B, T), "dtype"),
    ("sequence_logprobs", "mask", ones(B), "rank"),
    ("sequence_logprobs", "mask", ones(B, L), "length"),
    ("masked_sum", "mask", ones(B), "rank"),
    ("masked_sum", "mask", ones(B, 1), "broadcast"),
    ("masked_sum", "x", [1.0, 2.0], "not a tensor"),
    ("masked_mean", "mask", ones(T), "row"),
    ("masked_mean", "x", f(B, T, 1), "rank"),
    ("masked_var", "mask", ones(B, L), "length"),
    ("masked_var", "x", f(B), "rank"),
    ("masked_whiten", "mask", ones(B, 1), "broadcast"),
    ("masked_whiten", "x", f(B, L), "length"),
    ("masked_whiten", "eps", f(B), "not a scalar"),
    ("aggregate_token_losses", "token_losses", f(B), "rank"),
    ("aggregate_token_losses", "token_losses", f(B, T, 1), "rank"),
    ("aggregate_token_losses", "mask", ones(B), "rank"),
    ("aggregate_token_losses", "mask", ones(B, L), "length"),
    ("aggregate_token_losses", "max_len", 0, "not positive"),
    ("aggregate_token_losses", "max_len", 2.5, "not an int"),
    ("bradley_terry_loss", "chosen_rewards", f(B, 2), "two columns"),
    ("bradley_terry_loss", "chosen_rewards", long(B), "dtype"),
    ("bradley_terry_loss", "rejected_rewards", f(B + 1), "batch"),
    ("bradley_terry_loss", "margin", f(B, 2), "two columns"),
    ("bradley_terry_loss", "margin", f(B + 1), "batch"),
    ("bradley_terry_loss", "center_coef", f(B), "not a scalar"),
    ("kwise_bradley_terry_loss", "rewards", f(P * K), "rank"),
    ("kwise_bradley_terry_loss", "rewards", long(P, K), "dtype"),
    ("kwise_bradley_terry_loss", "mask", ones(P), "rank"),
    ("kwise_bradley_terry_loss", "mask", ones(P, K + 1), "responses"),
    ("plackett_luce_loss", "rewards", f(P, K, 1), "rank"),
    ("plackett_luce_loss", "rewards", long(P, K), "dtype"),
    ("plackett_luce_loss", "mask", ones(P + 1, K), "prompts"),
    ("dpo_loss", "policy_chosen_logps", f(B, 1), "column"),
    ("dpo_loss", "policy_rejected_logps", f(B + 1), "batch"),
    ("dpo_loss", "ref_chosen_logps", long(B), "dtype"),
    ("dpo_loss", "ref_rejected_logps", f(B, T), "token level"),
    ("dpo_loss", "logit_offset", f(B, 1), "column"),
    ("dpo_loss", "logit_offset", f(B + 1), "batch"),
    ("dpo_loss", "beta", f(B), "not a scalar"),
    ("dpo_loss", "label_smoothing", f(B, 1).sigmoid() / 4, "column"),
    ("dpo_loss", "label_smoothing", f(B + 1).sigmoid() / 4, "batch"),
    ("dpop_penalty", "policy_chosen_logps", long(B), "dtype"),
    ("dpop_penalty", "ref_chosen_logps", f(B, 1), "column"),
    ("dpop_penalty", "lam", f(B, 1), "not a scalar"),
    ("rdpo_length_margin", "chosen_lengths", long(B + 1), "batch"),
    ("rdpo_length_margin", "rejected_lengths", long(B, 1), "column"),
    ("rdpo_length_margin", "alpha", f(B), "not a scalar"),
    ("simpo_loss", "policy_chosen_avg_logps", f(B + 1), "batch"),
    ("simpo_loss", "policy_rejected_avg_logps", f(B, 1), "column"),
    ("simpo_loss", "beta", f(B), "not a scalar"),
    ("simpo_loss", "gamma", f(B, 1), "not a scalar"),
    ("log1mexp", "x", long(B), "dtype"),
    ("log1mexp", "x", [-1.0], "not a tensor"),
    ("orpo_loss", "policy_chosen_avg_logps", long(B), "dtype"),
    ("orpo_loss", "policy_rejected_avg_logps", f(B, 1), "column"),
    ("orpo_loss", "lam", f(B), "not a scalar"),
    ("kto_loss", "policy_logps", long(B), "dtype"),
    ("kto_loss", "ref_logps", f(B + 1), "batch"),
    ("kto_loss", "desirable", ones(B, 1), "column"),
    ("kto_loss", "kl_reference", f(B), "per example"),
    ("kto_loss", "kl_reference", f(B, 1), "column"),
    ("kto_loss", "beta", f(B), "not a scalar"),
    ("kl_penalty", "logprobs", long(B, T), "dtype"),
    ("kl_penalty", "ref_logprobs", f(B), "rank"),
    ("kl_penalty", "ref_logprobs", f(B, T, 1), "rank"),
    ("kl_shaped_rewards", "score", f(B, 1), "column"),
    ("kl_shaped_rewards", "score", f(T), "length"),
    ("kl_shaped_rewards", "logprobs", long(B, T), "dtype"),
    ("kl_shaped_rewards", "ref_logprobs", f(B, L), "length"),
    ("kl_shaped_rewards", "mask", ones(B), "rank"),
    ("kl_shaped_rewards", "beta", f(B), "not a scalar"),
    ("gae_advantages", "rewards", f(B, L), "an extra column"),
    ("gae_advantages", "values", f(B, T, 1), "value head"),
    ("gae_advantages", "values", long(B, T), "dtype"),
    ("gae_advantages", "mask", ones(B), "rank"),
    ("gae_advantages", "gamma", f(B), "not a scalar"),
    ("gae_advantages", "lam", f(B, 1), "not a scalar"),
    ("clipped_surrogate", "logprobs", long(B, T), "dtype"),
    ("clipped_surrogate", "old_logprobs", f(B, L), "length"),
    ("clipped_surrogate", "advantages", f(B, 1), "column"),
    ("clipped_surrogate", "advantages", f(T), "row"),
    ("clipped_surrogate", "clip_eps", f(B), "not a scalar"),
    ("ppo_policy_loss", "logprobs", f(B, T, 1), "rank"),
    ("ppo_policy_loss", "old_logprobs", f(B + 1, T), "batch"),
    ("ppo_policy_loss", "advantages", f(B, 1), "column"),
    ("ppo_policy_loss", "advantages", f(T), "row"),
    ("ppo_policy_loss", "mask", ones(B), "rank"),
    ("ppo_policy_loss", "clip_eps", f(B, 1), "not a scalar"),
    ("ppo_value_loss", "values", f(B, T, 1), "value head"),
    ("ppo_value_loss", "old_values", f(B, L), "length"),
    ("ppo_value_loss", "returns", long(B, T), "dtype"),
    ("ppo_value_loss", "mask", ones(T), "row"),
    ("ppo_value_loss", "clip_range", f(B), "not a scalar"),
    ("group_advantages", "rewards", f(B, G), "[P, G]"),
    ("group_advantages", "rewards", long(B * G), "dtype"),
    ("group_advantages", "group_size", 1, "G < 2"),
    ("group_advantages", "group_size", 4, "not a divisor"),
    ("group_advantages", "group_size", 3.0, "not an int"),
    ("group_advantages", "eps", f(B * G), "not a scalar"),
    ("rloo_advantages", "rewards", f(B, G), "[P, G]"),
    ("rloo_advantages", "group_size", 1, "G < 2"),
    ("rloo_advantages", "group_size", 4, "not a divisor"),
    ("grpo_loss", "logprobs", long(B, T), "dtype"),
    ("grpo_loss", "old_logprobs", f(B, T, 1), "rank"),
    ("grpo_loss", "ref_logprobs", f(B, L), "length"),
    ("grpo_loss", "advantages", f(B, 1), "column"),
    ("grpo_loss", "advantages", f(T), "row"),
    ("grpo_loss", "mask", ones(B), "rank"),
    ("grpo_loss", "clip_eps", f(B), "not a scalar"),
    ("grpo_loss", "beta", f(B), "not a scalar"),
    ("fused_head_logprobs", "hidden", f(B, T, K), "not flattened"),
    ("fused_head_logprobs", "weight", f(V, K + 1), "width"),
    ("fused_head_logprobs", "labels", long(B + 1), "rows"),
    ("fused_head_logprobs", "labels", f(B), "dtype"),
    ("fused_head_logprobs", "bias", f(V + 1), "vocabulary"),
    ("fused_head_logprobs", "temperature", f(B), "not a scalar"),
    ("fused_head_logprobs", "temperature", 0.0, "not positive"),
    ("pair_accuracy", "chosen_rewards", f(B, 2), "two columns"),
    ("pair_accuracy", "rejected_rewards", f(B + 1), "batch"),
    ("pair_accuracy", "rejected_rewards", long(B), "dtype"),
    ("best_of_n_value", "selector_scores", f(P, K + 1), "pool size"),
    ("best_of_n_value", "values", f(P * K), "rank"),
    ("best_of_n_value", "values", long(P, K), "dtype"),
    ("best_of_n_value", "n", K + 1, "n > N"),
    ("best_of_n_value", "n", 2.0, "not an int"),
    ("best_of_n_kl", "n", 0, "n < 1"),
    ("best_of_n_kl", "n", 2.5, "not an int"),
    ("reliability_bins", "probabilities", f(B, 1).sigmoid(), "column"),
    ("reliability_bins", "outcomes", ones(B + 1), "length"),
    ("reliability_bins", "num_bins", 0, "not positive"),
    ("expected_calibration_error", "probabilities", f(B) + 2, "outside [0, 1]"),
    ("expected_calibration_error", "outcomes", ones(B, 1), "column"),
]


def public_core_functions():
    """name -> function, for every public function defined in a minirlhf/core module."""
    found = {}
    for module_info in pkgutil.iter_modules(minirlhf.core.__path__):
        module = importlib.import_module(f"minirlhf.core.{module_info.name}")
        for name, value in vars(module).items():
            if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_"):
                found[name] = value
    found.pop("check_shapes")  # the checker itself (tests/test_shapes.py)
    return found


FUNCTIONS = public_core_functions()


def test_every_public_core_function_and_tensor_argument_is_swept():
    assert set(VALID) == set(FUNCTIONS)
    swept = {(function, argument) for function, argument, _, _ in BAD}
    required = []
    for function, make in VALID.items():
        for argument, value in make().items():
            if torch.is_tensor(value) or argument in ("beta", "lam", "gamma", "alpha", "eps", "clip_eps", "clip_range"):
                required.append((function, argument))
    assert set(required) <= swept, f"no wrongly shaped argument for {sorted(set(required) - swept)}"


@pytest.mark.parametrize("function", sorted(VALID))
def test_valid_call(function):
    FUNCTIONS[function](**VALID[function]())


@pytest.mark.parametrize("function, argument, value", [b[:3] for b in BAD], ids=[f"{b[0]}-{b[1]}-{b[3]}" for b in BAD])
def test_wrong_argument_is_a_clear_error(function, argument, value):
    kwargs = VALID[function]()
    kwargs[argument] = value
    with pytest.raises(ValueError, match=rf"^{function}: ") as error:
        FUNCTIONS[function](**kwargs)
    assert argument in str(error.value)
