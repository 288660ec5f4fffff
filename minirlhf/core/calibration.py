"""Calibration of predicted probabilities: the reliability diagram and the expected calibration error.

A forecaster that says "p" should be right a fraction p of the times it says so. For a reward
model the forecast is the Bradley–Terry probability it implies for a pair,
p = σ(r_φ(x, y_1) − r_φ(x, y_2)), and the outcome is the label "y_1 was preferred". Cut [0, 1]
into K bins of equal width; in bin B_k (M forecasts in all)

    confidence_k = mean_{i∈B_k} p_i,     frequency_k = mean_{i∈B_k} o_i,
    ECE = Σ_k (|B_k| / M) · |frequency_k − confidence_k|        (Naeini et al. 2015; Guo et al. 2017)

The reliability diagram plots frequency_k against confidence_k: a calibrated forecaster lies on
the diagonal; below it is over-confident (p > ½ side), above it under-confident.

Outcomes may be soft, o_i ∈ [0, 1]: with the toy world's true probabilities σ(r*_1 − r*_2) as
outcomes the comparison is with the truth itself, free of label noise. With sampled 0/1 labels
even a perfect forecaster has ECE > 0: each frequency_k carries a binomial error of order
√(p(1−p)/|B_k|).
"""
import numbers

import torch

from minirlhf.core.shapes import check_shapes


def _check_forecasts(function, probabilities, outcomes, num_bins):
    check_shapes(function, probabilities=(probabilities, "M"), outcomes=(outcomes, "M"))
    if probabilities.numel() == 0:
        raise ValueError(f"{function}: probabilities must hold at least one forecast, got [0]")
    if not (isinstance(num_bins, numbers.Integral) and num_bins >= 1):
        raise ValueError(f"{function}: num_bins must be a positive int, got {num_bins!r}")
    for name, x in (("probabilities", probabilities), ("outcomes", outcomes)):
        if not ((x >= 0) & (x <= 1)).all():
            raise ValueError(f"{function}: {name} must lie in [0, 1] (got values from {float(x.min())} to {float(x.max())})")


def reliability_bins(probabilities, outcomes, num_bins=10):
    """Per equal-width bin of [0, 1]: ``(confidence [K], frequency [K], counts [K])``.

    ``confidence_k`` = mean forecast and ``frequency_k`` = mean outcome of the forecasts in bin k
    (NaN for an empty bin, whose count is 0); a forecast of exactly 1 is in the last bin.

    Shapes: ``probabilities`` p and ``outcomes`` o ``[M]``, values in [0, 1] (o bool, 0/1 or soft);
    confidence and frequency come back in p's floating dtype, counts as long.
    """
    _check_forecasts("reliability_bins", probabilities, outcomes, num_bins)
    p = probabilities if probabilities.is_floating_point() else probabilities.double()
    o = outcomes.to(p.dtype)
    bins = (p * num_bins).long().clamp(max=num_bins - 1)
    counts = torch.bincount(bins, minlength=num_bins)
    confidence = p.new_zeros(num_bins).index_add_(0, bins, p) / counts
    frequency = p.new_zeros(num_bins).index_add_(0, bins, o) / counts
    return confidence, frequency, counts


def expected_calibration_error(probabilities, outcomes, num_bins=10):
    """``ECE = Σ_k (|B_k| / M) · |frequency_k − confidence_k|`` over the non-empty bins (a 0-dim tensor).

    Shapes and values as ``reliability_bins``.
    """
    _check_forecasts("expected_calibration_error", probabilities, outcomes, num_bins)
    confidence, frequency, counts = reliability_bins(probabilities, outcomes, num_bins)
    filled = counts > 0
    share = counts[filled].to(confidence.dtype) / counts.sum()
    return (share * (frequency[filled] - confidence[filled]).abs()).sum()
