"""How sure a number is: the standard error of an evaluation mean, of a paired gain, and the spread
of a number over seeds.

An evaluation samples ``n`` responses to each of ``P`` prompts. The responses to one prompt are not
independent draws (they share the prompt), so the standard error is computed over prompts::

    m_i = mean of the values of prompt i's responses           (i = 1 … P)
    mean = (1/P) Σ_i m_i,          SE = sd(m_1 … m_P) / √P

With the same number of responses per prompt ``mean`` is the plain mean over responses. Two
policies evaluated on the *same* prompts differ by a **paired** gain: the prompt-to-prompt spread
(a math prompt is worth more gold reward than a harmful one) cancels in each difference::

    d_i = m_i(π) − m_i(π_SFT),     gain = (1/P) Σ_i d_i,     SE = sd(d_1 … d_P) / √P

Values may be ``None`` for responses a metric does not apply to (math accuracy off the math
prompts); a prompt without any value is left out. Over seeds, ``mean_sd`` gives the mean and the
sample standard deviation (n − 1) of one number measured once per seed.
"""
from __future__ import annotations

import math


def per_prompt_means(values: list, prompt_ids: list) -> dict:
    """``{prompt id: mean of its values}`` (``None`` values skipped; prompts without values left out)."""
    if len(values) != len(prompt_ids):
        raise ValueError(f"per_prompt_means: {len(values)} values but {len(prompt_ids)} prompt ids; expected one id per value")
    sums, counts = {}, {}
    for value, prompt in zip(values, prompt_ids):
        if value is None:
            continue
        sums[prompt] = sums.get(prompt, 0.0) + float(value)
        counts[prompt] = counts.get(prompt, 0) + 1
    return {prompt: sums[prompt] / counts[prompt] for prompt in sums}


def mean_se(samples: list) -> tuple[float, float]:
    """``(mean, standard error of the mean)`` of independent ``samples`` (SE is NaN for one sample)."""
    if not samples:
        raise ValueError("mean_se: no samples")
    n = len(samples)
    mean = sum(samples) / n
    if n == 1:
        return mean, math.nan
    variance = sum((x - mean) ** 2 for x in samples) / (n - 1)
    return mean, math.sqrt(variance / n)


def prompt_mean_se(values: list, prompt_ids: list) -> tuple[float, float]:
    """``(mean, SE)`` of an evaluation metric, its SE computed over prompts (module docstring)."""
    return mean_se(list(per_prompt_means(values, prompt_ids).values()))


def paired_gain(values: list, prompt_ids: list, base_values: list, base_prompt_ids: list) -> tuple[float, float]:
    """``(gain, SE)`` of ``values`` over ``base_values`` measured on the same prompts: the mean and
    standard error of the per-prompt differences (prompts that lack a value on either side are left out)."""
    policy, base = per_prompt_means(values, prompt_ids), per_prompt_means(base_values, base_prompt_ids)
    shared = [prompt for prompt in policy if prompt in base]
    if not shared:
        raise ValueError("paired_gain: the two evaluations share no prompt")
    return mean_se([policy[prompt] - base[prompt] for prompt in shared])


def mean_sd(samples: list) -> tuple[float, float]:
    """``(mean, sample standard deviation)`` of one number measured once per seed (sd NaN for one)."""
    mean, se = mean_se(samples)
    return mean, se * math.sqrt(len(samples))
