"""The plots of the course reports, as PNG files: training curves, score histograms, box plots,
per-prompt differences, length distributions, and line plots (gold vs proxy reward against KL).

Every function takes plain numbers (lists / 1-D arrays / tensors), writes one PNG to ``path`` and
returns the path, so the eval commands, the pipeline report and a notebook share them. Figures are
built with ``matplotlib.figure.Figure`` rather than pyplot: no GUI backend is involved (headless
runs need none) and a notebook's own ``%matplotlib inline`` setting is left alone.
"""
import csv
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from minirlhf.data.atomic import atomic_file


def _array(values):
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=float).ravel()


def save_figure(fig, path):
    """Write ``fig`` to ``path`` (the format from its suffix) atomically; returns ``path``."""
    path = Path(path)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:  # never a half-written image
        fig.savefig(f, format=path.suffix[1:].lower() or "png", dpi=110)
    return path


def subplots(*args, **kwargs):
    """``(figure, axes)`` like ``pyplot.subplots``, on a plain ``Figure`` (no backend, no global state)."""
    figsize = kwargs.pop("figsize", None)
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _common_bins(groups, bins):
    values = np.concatenate([_array(v) for v in groups.values()] or [np.zeros(1)])
    low, high = (values.min(), values.max()) if values.size else (0.0, 1.0)
    if low == high:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, bins + 1)


def _histograms_on(ax, groups, bins, xlabel, title):
    edges = _common_bins(groups, bins)
    for name, values in groups.items():
        values = _array(values)
        ax.hist(values, bins=edges, alpha=0.5, label=f"{name} (mean {values.mean():.3g}, n={values.size})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(fontsize=8)


def histograms(groups, path, title="", xlabel="score", bins=40):
    """Overlaid histograms on shared bins, e.g. ``{"chosen": scores, "rejected": scores}``."""
    fig, ax = subplots(figsize=(6, 4))
    _histograms_on(ax, groups, bins, xlabel, title)
    return save_figure(fig, path)


def histogram_panels(panels, path, xlabel="score", bins=40):
    """Side-by-side overlaid histograms, one panel per entry of ``{panel title: groups}`` — e.g.
    chosen vs rejected scores before and after reward-model training (as in the seeds)."""
    fig, axes = subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, groups) in zip(axes[0], panels.items()):
        _histograms_on(ax, groups, bins, xlabel, title)
    return save_figure(fig, path)


def boxplots(groups, path, title="", ylabel="score"):
    """One box per group (median, quartiles, outliers), e.g. base vs tuned scores."""
    fig, ax = subplots(figsize=(1.8 + 1.4 * len(groups), 4))
    ax.boxplot([_array(v) for v in groups.values()])
    ax.set_xticks(range(1, len(groups) + 1), list(groups))
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return save_figure(fig, path)


def difference_histogram(differences, path, title="", xlabel="tuned − base score", bins=40):
    """Histogram of per-prompt differences with a line at 0; the title gets the win rate."""
    differences = _array(differences)
    wins = (differences > 0).mean() + 0.5 * (differences == 0).mean() if differences.size else float("nan")
    fig, ax = subplots(figsize=(6, 4))
    ax.hist(differences, bins=bins, color="tab:green", alpha=0.7)
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("prompts")
    ax.set_title(f"{title} (win rate {wins:.1%}, mean {differences.mean():+.3g})".strip())
    return save_figure(fig, path)


def lines(series, path, xlabel, ylabel, title=""):
    """Line plot of ``{name: (xs, ys)}`` — e.g. gold and proxy reward against KL(π‖π_ref)."""
    fig, ax = subplots(figsize=(6, 4))
    for name, (xs, ys) in series.items():
        ax.plot(_array(xs), _array(ys), marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def read_csv_columns(path):
    """``{column: np.array}`` of a metrics CSV (``train.csv`` / ``eval.csv`` of a run); empty
    cells become NaN."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = rows[0].keys() if rows else []
    return {c: np.array([float(r[c]) if r[c] != "" else np.nan for r in rows]) for c in columns}


# What to draw for each trainer's run directory (see ``training_curves``): the seeds' curves.
CURVES = {
    "sft": ["loss", "lr"],
    "rm": ["loss", "accuracy", ("chosen_reward", "rejected_reward"), "margin"],
    "dpo": ["loss", "accuracy", ("chosen_reward", "rejected_reward"), ("logps_chosen", "logps_rejected"), "margin"],
    "kto": ["loss", "accuracy", ("reward_desirable", "reward_undesirable"), "kl"],
}


def training_curves(run_dir, metrics, path, title=""):
    """One panel per metric name against the optimizer step, train (and eval when logged) —
    the TensorBoard curves of a run as a PNG (loss, accuracy, rewards...).

    ``metrics``: names, or tuples of names to draw in one panel (e.g. ``("chosen_reward",
    "rejected_reward")``). Names missing from the CSVs are left out.
    """
    run_dir = Path(run_dir)
    splits = {s: read_csv_columns(run_dir / f"{s}.csv") for s in ("train", "eval") if (run_dir / f"{s}.csv").exists()}
    panels = [(m,) if isinstance(m, str) else tuple(m) for m in metrics]
    panels = [p for p in panels if any(n in cols for cols in splits.values() for n in p)]
    fig, axes = subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.4), squeeze=False)
    for ax, names in zip(axes[0], panels):
        for split, columns in splits.items():
            for name in names:
                if name in columns:
                    style = {"marker": "o", "markersize": 3} if split == "eval" else {"linewidth": 1}
                    ax.plot(columns["step"], columns[name], label=f"{split} {name}", **style)
        ax.set_xlabel("optimizer step")
        ax.set_title(" / ".join(names))
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
