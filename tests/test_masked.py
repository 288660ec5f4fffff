"""Masked reductions: brute-force references, all-masked rows, whitening, and its errors."""
import pytest
import torch

from minirlhf import masked_sum, masked_var
from padded_batches import random_response_mask, to_left_padded

X = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, float("nan"), -float("inf"), 5.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 1]])


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_masked_sum_ignores_masked_values_even_inf_and_nan():
    assert masked_sum(X, MASK).item() == 1 + 2 + 3 + 4 + 5
    assert masked_sum(X, MASK, dim=-1).tolist() == [6.0, 9.0]


@pytest.mark.exercise("masked_mean")
def test_masked_mean_matches_mean_of_selected_elements(impl):
    assert impl.masked_mean(X, MASK).item() == pytest.approx(15 / 5)
    assert impl.masked_mean(X, MASK, dim=-1).tolist() == pytest.approx([2.0, 4.5])
    assert impl.masked_mean(X, MASK.bool(), dim=0).tolist() == pytest.approx([2.5, 2.0, 3.0, 5.0])


@pytest.mark.exercise("masked_mean")
def test_masked_mean_all_masked_row_is_zero_with_zero_gradient(impl):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.float64)
    mask[1] = 0
    row_means = impl.masked_mean(x, mask, dim=-1)
    assert row_means[1].item() == 0.0
    assert impl.masked_mean(x, torch.zeros(3, 5)).item() == 0.0
    row_means.sum().backward()
    # d mean_i / d x_ij = mask_ij / n_i: the analytic gradient, 0 for the empty row.
    assert torch.allclose(x.grad, mask / mask.sum(-1, keepdim=True).clamp(min=1))


@pytest.mark.exercise("masked_mean")
def test_masked_mean_gradcheck(impl):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5) < 0.6
    assert torch.autograd.gradcheck(lambda x: impl.masked_mean(x, mask, dim=-1), (x,))


def test_masked_var_matches_torch_var_of_selected_elements():
    x = torch.randn(4, 7, dtype=torch.float64)
    mask = torch.rand(4, 7) < 0.5
    mask[0, :2] = True
    assert masked_var(x, mask).item() == pytest.approx(x[mask].var().item())
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(x[mask].var(unbiased=False).item())


def test_masked_var_too_few_elements_is_a_clear_error():
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[1, 2] = True
    with pytest.raises(ValueError, match="1 valid element.*at least 2"):
        masked_var(torch.randn(2, 3), one)
    assert masked_var(torch.randn(2, 3), one, unbiased=False).item() == 0.0
    with pytest.raises(ValueError, match="0 valid element"):
        masked_var(torch.randn(2, 3), torch.zeros(2, 3), unbiased=False)


@pytest.mark.exercise("masked_whiten")
def test_masked_whiten_gives_zero_mean_unit_variance_and_zeros_outside_mask(impl):
    x = 3 + 5 * torch.randn(6, 9, dtype=torch.float64)
    mask = torch.rand(6, 9) < 0.7
    white = impl.masked_whiten(x, mask)
    assert white[mask].mean().item() == pytest.approx(0.0, abs=1e-12)
    assert white[mask].var().item() == pytest.approx(1.0, rel=1e-6)
    assert (white[~mask] == 0).all()
    # Brute force on the selected elements.
    selected = x[mask]
    assert torch.allclose(white[mask], (selected - selected.mean()) / (selected.var() + 1e-8).sqrt())


@pytest.mark.exercise("masked_whiten")
def test_masked_whiten_without_shift_keeps_the_mean(impl):
    x = 3 + 5 * torch.randn(6, 9, dtype=torch.float64)
    mask = torch.rand(6, 9) < 0.7
    white = impl.masked_whiten(x, mask, shift_mean=False)
    selected = x[mask]
    assert white[mask].mean().item() == pytest.approx(selected.mean().item())
    assert white[mask].var().item() == pytest.approx(1.0, rel=1e-6)
    assert (white[~mask] == 0).all()


@pytest.mark.exercise("masked_whiten")
def test_masked_whiten_is_padding_invariant_and_ignores_garbage_in_padding(impl):
    x = torch.randn(2, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    garbage = torch.where(mask.bool(), x, torch.tensor(float("nan"), dtype=torch.float64))
    wider = torch.cat([garbage, torch.full((2, 3), 1e6, dtype=torch.float64)], dim=1)
    wider_mask = torch.cat([mask, torch.zeros(2, 3, dtype=mask.dtype)], dim=1)
    assert torch.equal(impl.masked_whiten(garbage, mask), impl.masked_whiten(x, mask))
    assert torch.allclose(impl.masked_whiten(wider, wider_mask)[:, :5], impl.masked_whiten(x, mask))


@pytest.mark.exercise("masked_whiten")
def test_masked_whiten_with_fewer_than_two_valid_elements_raises(impl):
    mask = torch.zeros(2, 4)
    with pytest.raises(ValueError):
        impl.masked_whiten(torch.randn(2, 4), mask)
    mask[0, 1] = 1
    with pytest.raises(ValueError):
        impl.masked_whiten(torch.randn(2, 4), mask)


@pytest.mark.exercise("masked_whiten")
def test_masked_whiten_gradcheck(impl):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]])
    for shift_mean in (True, False):
        assert torch.autograd.gradcheck(lambda x: impl.masked_whiten(x, mask, shift_mean=shift_mean), (x,))


# ---- aggregate_token_losses: sequence mean (GRPO), token mean (DAPO), fixed length (Dr. GRPO) ----

LOSSES = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
LOSS_MASK = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])


@pytest.mark.exercise("aggregate_token_losses")
@pytest.mark.parametrize(
    "aggregation, expected",
    [
        ("sequence_mean", (1.0 + 4.0) / 2),  # each sequence weighs 1/2: the short one's token weighs 4x
        ("token_mean", (4 * 1.0 + 4.0) / 5),  # each of the 5 tokens weighs 1/5
        ("fixed_length", (4 * 1.0 + 4.0) / (2 * 4)),  # constant normaliser B * T
    ],
)
def test_aggregations_by_hand(impl, aggregation, expected):
    assert impl.aggregate_token_losses(LOSSES, LOSS_MASK, aggregation).item() == pytest.approx(expected)


@pytest.mark.exercise("aggregate_token_losses")
def test_fixed_length_uses_max_len_and_unknown_name_lists_options(impl):
    assert impl.aggregate_token_losses(LOSSES, LOSS_MASK, "fixed_length", max_len=16).item() == pytest.approx(8 / 32)
    with pytest.raises(ValueError, match="sequence_mean.*token_mean.*fixed_length"):
        impl.aggregate_token_losses(LOSSES, LOSS_MASK, "sum")


@pytest.mark.exercise("aggregate_token_losses")
@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "fixed_length"])
def test_aggregation_gradient_is_the_per_token_weight(impl, aggregation):
    # L = Σ w_it ℓ_it, so dL/dℓ_it = w_it: 1/(B' n_i), 1/N, 1/(B max_len) on valid tokens, 0 elsewhere.
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)
    losses = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    max_len = 7 if aggregation == "fixed_length" else None
    impl.aggregate_token_losses(losses, mask, aggregation, max_len).backward()
    n_i = mask.sum(-1, keepdim=True)
    expected = {
        "sequence_mean": mask / n_i.clamp(min=1) / 3,  # 3 non-empty rows
        "token_mean": mask / mask.sum(),
        "fixed_length": mask / (4 * 7),
    }[aggregation]
    assert torch.allclose(losses.grad, expected)
    x = losses.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: impl.aggregate_token_losses(x, mask, aggregation), (x,))


@pytest.mark.exercise("aggregate_token_losses")
@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "fixed_length"])
def test_aggregation_invariances(impl, aggregation):
    generator = torch.Generator().manual_seed(1)
    mask = random_response_mask(6, 8, generator)
    losses = torch.randn(6, 8, dtype=torch.float64, generator=generator)
    garbage = torch.where(mask, losses, torch.tensor(float("nan"), dtype=torch.float64))

    def aggregate(x, m):
        return impl.aggregate_token_losses(x, m, aggregation, max_len=8).item()

    full = aggregate(losses, mask)
    assert aggregate(garbage, mask) == pytest.approx(full)  # padding values never leak in
    assert aggregate(to_left_padded(losses, mask), to_left_padded(mask, mask)) == pytest.approx(full)
    order = torch.randperm(6, generator=generator)
    assert aggregate(losses[order], mask[order]) == pytest.approx(full)
    pad = torch.zeros(6, 3, dtype=torch.float64)
    assert aggregate(torch.cat([losses, pad], 1), torch.cat([mask, pad.bool()], 1)) == pytest.approx(full)

    # Splitting the batch in two: recombine with the right weights (rows, tokens, rows).
    halves = [(losses[:2], mask[:2]), (losses[2:], mask[2:])]
    weights = [m.sum().item() if aggregation == "token_mean" else m.shape[0] for _, m in halves]
    recombined = sum(w * aggregate(x, m) for w, (x, m) in zip(weights, halves)) / sum(weights)
    assert recombined == pytest.approx(full)
    if aggregation == "token_mean":  # the naive mean of the two halves is wrong when lengths differ
        assert (aggregate(*halves[0]) + aggregate(*halves[1])) / 2 != pytest.approx(full)


@pytest.mark.exercise("aggregate_token_losses")
@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "fixed_length"])
def test_aggregation_of_all_masked_rows_is_zero_not_nan(impl, aggregation):
    losses = torch.randn(3, 4, requires_grad=True)
    empty = torch.zeros(3, 4)
    loss = impl.aggregate_token_losses(losses, empty, aggregation)
    loss.backward()
    assert loss.item() == 0.0 and (losses.grad == 0).all()
    # An empty row inside a batch does not change the value (sequence_mean skips it).
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    with_empty = impl.aggregate_token_losses(losses, mask, aggregation, max_len=4)
    without = impl.aggregate_token_losses(losses[[0, 2]], mask[[0, 2]], aggregation, max_len=4)
    if aggregation == "fixed_length":  # B counts the empty row: 2 rows' worth of sum over 3 rows
        assert with_empty.item() == pytest.approx(without.item() * 2 / 3)
    else:
        assert with_empty.item() == pytest.approx(without.item())
