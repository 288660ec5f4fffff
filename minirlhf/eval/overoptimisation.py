"""Reward over-optimisation (Gao, Schulman & Hilton 2023): gold vs proxy reward against KL.

A reward model is a proxy for what people want. Optimising it moves the policy away from π_ref
(the KL grows); at first both the proxy and the true (*gold*) reward rise, then the policy finds
what the proxy over-pays — in the toy world the planted length bias, filler words — and the gold
reward turns down while the proxy keeps climbing. Gao et al. plot both against
``d = sqrt(KL(π‖π_ref))``; the toy world lets us do the same, because its gold reward is known.

Input: PPO run directories (``out/train.csv`` logs ``reward`` = proxy score, ``gold`` and ``kl``
per iteration). Each curve is drawn relative to its first iteration (the reward model's offset is
arbitrary: only changes are comparable) and smoothed with a running mean over ``smooth``
iterations, since each iteration is a small noisy batch.
"""
from pathlib import Path

import numpy as np

from minirlhf.eval.plots import read_csv_columns, save_figure, subplots


def running_mean(values, window):
    """Trailing running mean over ``window`` points (the first points average what exists)."""
    values = np.asarray(values, dtype=float)
    return np.array([values[max(0, i - window + 1) : i + 1].mean() for i in range(len(values))])


def overoptimisation_curves(run_dir, smooth=5):
    """``{"kl", "sqrt_kl", "proxy", "gold"}`` arrays of a PPO run: KL per response, and the proxy
    and gold rewards minus their first-iteration values, all smoothed over ``smooth`` iterations.

    Raises ValueError if the run did not log a gold reward (not a toy-world run).
    """
    columns = read_csv_columns(Path(run_dir) / "train.csv")
    if "gold" not in columns:
        raise ValueError(f"{run_dir}: train.csv has no 'gold' column (the gold reward exists only in the toy world)")
    kl = running_mean(columns["kl"], smooth)
    proxy = running_mean(columns["reward"], smooth)
    gold = running_mean(columns["gold"], smooth)
    return {"kl": kl, "sqrt_kl": np.sqrt(np.clip(kl, 0.0, None)), "proxy": proxy - proxy[0], "gold": gold - gold[0]}


def plot_overoptimisation(runs, path, smooth=5, x="sqrt_kl", title="Reward over-optimisation"):
    """Plot gold (solid) and proxy (dashed) reward, as changes since the start, against KL.

    ``runs``: ``{label: run_dir}`` (e.g. ``{"β=0.005": ..., "β=0.05": ...}``; one colour per run)
    or a single run directory. ``x``: ``"sqrt_kl"`` (Gao et al.'s d = sqrt(KL)) or ``"kl"``.
    Writes a PNG; returns its path.
    """
    if not isinstance(runs, dict):
        runs = {"ppo": runs}
    fig, ax = subplots(figsize=(6.4, 4.2))
    for index, (label, run_dir) in enumerate(runs.items()):
        curves = overoptimisation_curves(run_dir, smooth)
        color = f"C{index}"
        ax.plot(curves[x], curves["gold"], color=color, linestyle="-", marker="o", markersize=3, label=f"{label}: gold")
        ax.plot(curves[x], curves["proxy"], color=color, linestyle="--", label=f"{label}: proxy (RM)")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("sqrt(KL(π‖π_ref)) per response" if x == "sqrt_kl" else "KL(π‖π_ref) per response (nats)")
    ax.set_ylabel("reward change since the start")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
