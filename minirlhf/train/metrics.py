"""Metrics: one CSV per split, TensorBoard, and a progress bar with the live loss.

``out/train.csv`` gets a row per logged optimizer step, ``out/eval.csv`` a row per evaluation;
TensorBoard (``tensorboard --logdir runs/``) gets the same numbers as ``train/loss``,
``eval/accuracy``, ...; the tqdm bar's postfix shows the live loss/accuracy/KL. A trainer opens a
``TrainingLog`` around its loop and calls ``log.train(done, metrics)`` after every step. Under
torchrun every rank calls it with the metrics of its share of the batch; their mean over the ranks
is what rank 0, alone, logs.
"""
import csv
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minirlhf.data.atomic import atomic_file
from minirlhf.errors import MinirlhfError
from minirlhf.train.distributed import is_main, mean_over_ranks

# The metrics a progress bar shows, in this order, when a trainer logs them.
POSTFIX_KEYS = ("loss", "accuracy", "margin", "kl", "reward", "entropy")


class MetricsLogger:
    """Logs scalar metrics per step to ``out/<split>.csv`` and TensorBoard ``<split>/<name>``.

    ``log(step, metrics, split="train")``: one CSV row (columns grow as new metric names
    appear) and one TensorBoard scalar per metric; a step logged twice in a row keeps the second
    row. ``step`` counts optimizer steps done. When
    resuming after ``start_step`` steps, rows and events the interrupted run logged after its
    checkpoint (steps ``> start_step``) are dropped, so the curves have no duplicates; so is a
    last line that a crash cut short (``read_complete_rows``).
    """

    def __init__(self, out, start_step=0, tensorboard=True):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows = {}  # split -> list of row dicts
        for path in self.out.glob("*.csv"):
            rows = read_complete_rows(path)
            if rows is None:
                continue  # not a metrics file of ours
            self.rows[path.stem] = [r for r in rows if float(r["step"]) <= start_step]
            self._rewrite(path.stem)
        self.writer = None
        if tensorboard:
            # Imported only when asked for: TensorBoard's import costs seconds and pulls in
            # packages a run with --no-tensorboard never needs.
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=start_step + 1 if start_step else None)

    def _rewrite(self, split):
        rows = self.rows[split]
        columns = ["step"] + sorted({k for r in rows for k in r} - {"step"})
        with atomic_file(self.out / f"{split}.csv", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        return columns

    def log(self, step, metrics, split="train"):
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        rows = self.rows.setdefault(split, [])
        path = self.out / f"{split}.csv"
        old_columns = list(rows[0].keys()) if rows else None
        replaced = bool(rows) and float(rows[-1]["step"]) == step  # logged again (a resumed run's evaluation)
        if replaced:
            rows[-1] = row
        else:
            rows.append(row)
        if not replaced and old_columns is not None and set(row) <= set(old_columns) and path.exists():
            with open(path, "a", newline="") as f:  # same columns: append one line
                columns = ["step"] + sorted(set(old_columns) - {"step"})
                csv.DictWriter(f, fieldnames=columns).writerow(row)
        else:
            self._rewrite(split)
        if self.writer is not None:
            for name, value in row.items():
                if name != "step":
                    self.writer.add_scalar(f"{split}/{name}", value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def read_complete_rows(path):
    """The rows of a metrics CSV as dicts of strings, without a last line that a crash cut short
    (every complete row ends with a newline) or rows whose step is not a number; None when the
    file has no ``step`` column (not a metrics file)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines = lines[:-1]
    reader = csv.DictReader(lines)
    if "step" not in (reader.fieldnames or []):
        return None
    return [row for row in reader if None not in row.values() and _is_number(row["step"])]


def _is_number(text):
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def read_metrics(out, split="train"):
    """The rows of ``out/<split>.csv`` as dicts of floats (for plots and tests)."""
    with open(Path(out) / f"{split}.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def postfix(metrics):
    """The live metrics a progress bar shows (see ``POSTFIX_KEYS``), formatted compactly."""
    return {k: f"{metrics[k]:.4g}" for k in POSTFIX_KEYS if k in metrics}


class TrainingLog:
    """The metrics of one run: CSVs and TensorBoard (``MetricsLogger``) plus a progress bar.

    ``with TrainingLog(args, start, total, last, desc) as log:`` around the loop; ``start`` steps
    are done (resuming), the bar counts to ``total``, the run stops after ``last`` (a resumed run
    whose ``start`` lies beyond ``total`` or ``last`` is refused with a clear error).
    ``log.train(done, metrics)`` after each step writes every ``--log-every`` steps (and the
    last one) and advances the bar; ``log.eval(done, metrics)`` writes ``eval.csv``. Under torchrun
    only rank 0 writes and shows a bar; ``train`` logs the mean of the ranks' metrics (each rank's
    share of the step weighs the same), ``eval`` rank 0's (every rank evaluates the whole test split).
    """

    def __init__(self, args, start, total, last, desc):
        if start > total:
            raise MinirlhfError(f"--resume: the checkpoint has {start} steps done, but this run has {total} in all "
                                "(--steps or --epochs changed?); resume with the original settings, or start a new "
                                "run in another --out")
        if start > last:
            raise MinirlhfError(f"--stop-at-step {args.stop_at_step}: the resumed run already has {start} steps done; "
                                "give a later step, or 0 to run to the end")
        self.every, self.last = max(1, args.log_every), last
        self.logger = MetricsLogger(args.out, start, tensorboard=args.tensorboard) if is_main() else None
        self.bar = tqdm(total=total, initial=start, desc=desc, disable=not (args.progress and is_main()),
                        dynamic_ncols=True)

    def train(self, done, metrics):
        if done % self.every == 0 or done == self.last:
            metrics = mean_over_ranks(as_numbers(metrics))  # every rank takes part; rank 0 writes
            if self.logger is not None:
                self.logger.log(done, metrics)
            self.bar.set_postfix(postfix(metrics), refresh=False)
        self.bar.update(1)

    def eval(self, done, metrics):
        if self.logger is not None:
            self.logger.log(done, as_numbers(metrics), split="eval")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        if self.logger is not None:
            self.logger.close()


def as_numbers(metrics):
    """``metrics`` with every tensor value read back as a Python float, all in one host sync (the
    trainers accumulate their metrics as tensors on the device: see ``optim.py``)."""
    tensors = {k: v.detach().double().reshape(()) for k, v in metrics.items() if torch.is_tensor(v)}
    if not tensors:
        return dict(metrics)
    device = next((v.device for v in tensors.values() if v.device.type != "cpu"), torch.device("cpu"))
    values = torch.stack([v.to(device) for v in tensors.values()]).tolist()
    return {**metrics, **dict(zip(tensors, values))}


def eval_due(args, done, start, total):
    """Whether to evaluate after ``done`` steps: every ``--eval-every`` steps (from step 0 of a
    new run), and once at the end when the periodic ones do not land on it (with
    ``--eval-every 0``: only at the end). The trainers checkpoint before they evaluate, so a
    resumed run evaluates again at ``start`` when it is due (the interrupted run may have stopped in
    between; the same weights give the same row, which replaces the old one)."""
    periodic = args.eval_every > 0 and done % args.eval_every == 0
    final = done == total and (args.eval_every <= 0 or total % args.eval_every != 0)
    return periodic or final


def average(metrics_list):
    """The mean of each metric over a list of metric dicts (e.g. the optimizer steps of one iteration)."""
    return {k: sum(m[k] for m in metrics_list) / len(metrics_list) for k in metrics_list[0]}


def response_metrics(rollout):
    """Length statistics of a rollout: mean response length (tokens) and fraction ended by EOS."""
    return {
        "response_length": float(rollout["response_length"].float().mean()),
        "ended_fraction": float(rollout["ended"].float().mean()),
    }
