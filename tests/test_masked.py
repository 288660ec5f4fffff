"""Masked reductions and token-loss aggregation: the ``masked`` and ``aggregation`` exercises' checks
(minirlhf/homework/checks/), plus the reference-only ``masked_sum`` and ``masked_var``."""
import pytest
import torch

from exercise_checks import exercise_tests
from minirlhf import masked_sum, masked_var

X = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, float("nan"), -float("inf"), 5.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 1]])

test_exercise_masked = exercise_tests("masked")
test_exercise_aggregation = exercise_tests("aggregation")


def test_masked_sum_ignores_masked_values_even_inf_and_nan():
    assert masked_sum(X, MASK).item() == 1 + 2 + 3 + 4 + 5
    assert masked_sum(X, MASK, dim=-1).tolist() == [6.0, 9.0]


def test_masked_var_matches_torch_var_of_selected_elements():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, dtype=torch.float64, generator=generator)
    mask = torch.rand(4, 7, generator=generator) < 0.5
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
