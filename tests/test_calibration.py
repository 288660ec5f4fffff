"""Reliability bins and expected calibration error, against a per-bin loop and known cases."""
import pytest
import torch

from minirlhf import expected_calibration_error, reliability_bins


def test_matches_a_loop_over_bins():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(500, generator=g, dtype=torch.float64)
    p[:3] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)  # the edges
    o = (torch.rand(500, generator=g, dtype=torch.float64) < p**2).double()
    confidence, frequency, counts = reliability_bins(p, o, num_bins=7)
    ece = 0.0
    for k in range(7):
        inside = (p >= k / 7) & ((p < (k + 1) / 7) if k < 6 else (p <= 1))
        assert counts[k] == inside.sum()
        assert torch.isclose(confidence[k], p[inside].mean()) and torch.isclose(frequency[k], o[inside].mean())
        ece += inside.double().mean() * (o[inside].mean() - p[inside].mean()).abs()
    assert torch.isclose(expected_calibration_error(p, o, num_bins=7), ece, atol=1e-12)


def test_known_cases():
    p = torch.tensor([0.05, 0.3, 0.35, 0.9, 1.0])
    assert expected_calibration_error(p, p) == 0  # soft outcomes equal to the forecasts: perfect
    assert torch.isclose(expected_calibration_error(torch.full((4,), 0.7), torch.tensor([1.0, 0, 0, 1])),
                         torch.tensor(0.2))  # one bin: |mean outcome − forecast|
    confidence, frequency, counts = reliability_bins(p, torch.tensor([True, False, True, True, True]), num_bins=4)
    assert counts.tolist() == [1, 2, 0, 2]  # 1.0 falls in the last bin
    assert torch.isnan(confidence[2]) and torch.isnan(frequency[2])
    assert torch.isclose(frequency[1], torch.tensor(0.5))


def test_calibrated_forecasts_beat_over_confident_ones():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(20_000, generator=g, dtype=torch.float64)
    o = (torch.rand(20_000, generator=g, dtype=torch.float64) < p).double()
    over_confident = torch.sigmoid(3 * torch.logit(p))
    assert expected_calibration_error(p, o) < 0.02
    assert expected_calibration_error(over_confident, o) > 0.1


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"outcomes must have shape \[M=5\]"):
        reliability_bins(torch.rand(5), torch.rand(4))
    with pytest.raises(ValueError, match="at least one forecast"):
        reliability_bins(torch.rand(0), torch.rand(0))
    with pytest.raises(ValueError, match=r"probabilities must lie in \[0, 1\]"):
        expected_calibration_error(torch.tensor([0.5, 1.5]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"outcomes must lie in \[0, 1\]"):
        expected_calibration_error(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="num_bins"):
        reliability_bins(torch.rand(3), torch.rand(3), num_bins=0)
