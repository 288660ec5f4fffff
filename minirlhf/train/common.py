"""What every training loop shares: arguments, device, seeding, data order, checkpoints, logging.

The loops themselves (``sft.py``, ``rm.py``, ``dpo.py``, ``ppo.py``, ...) stay readable top to
bottom; this file holds only the plumbing they would otherwise each repeat:

- **Arguments.** Each algorithm has a dataclass of arguments; a string literal right under a
  field is that field's help (an *attribute docstring*). ``parse_args`` reads those with ``ast``
  and builds the ``--help``, so the documentation lives once, next to the default.
- **Device.** CUDA when available; bf16 autocast on CUDA, plain float32 on CPU.
- **Data order.** Epoch ``e`` visits the examples in ``permutation(seed, e)``, so the batch of
  optimizer step ``s`` is a pure function of ``(seed, s)``. ``--resume`` therefore only has to
  restore the step counter (plus model, optimizer, scheduler and RNG states) to continue exactly.
- **Gradient accumulation.** A batch of ``B`` examples is split into micro-batches; micro-batch
  ``k`` contributes ``w_k ∇L_k`` with ``w_k = n_k / Σ_j n_j``, where ``n_k`` counts what ``L_k``
  averages over (examples for per-example means, tokens for token means). Then
  ``Σ_k w_k ∇L_k = ∇L_big`` exactly (up to float rounding), whatever the split.
- **Checkpoints.** ``out/checkpoints/step-000120/`` holds an HF-loadable model (``save_pretrained``)
  plus ``training_state.pt`` (optimizer, scheduler, step, RNG states). It is written to a
  temporary directory, fsynced, renamed into place, and only then does the one-line pointer file
  ``out/checkpoints/latest`` switch to it (temp file + ``os.replace``, atomic). The previous
  checkpoint is kept, so a crash at any moment leaves a complete last-good checkpoint.
- **Divergence.** A NaN/inf loss or gradient norm stops the run *before* the optimizer step
  touches the weights, saves that (still finite) state as a checkpoint, and raises
  ``TrainingDiverged`` naming the step and the example ids of the batch.
- **Metrics.** One CSV per split (``out/train.csv``, ``out/eval.csv``) and TensorBoard
  (``tensorboard --logdir runs/``: tags ``train/loss``, ``train/accuracy``, ...), plus a tqdm
  bar whose postfix shows the live loss/accuracy/KL.

Layout of a run directory::

    out/args.json  out/train.csv  out/eval.csv  out/tb/  out/checkpoints/{latest,step-N/}  out/final/
"""
import ast
import argparse
import csv
import dataclasses
import inspect
import json
import math
import os
import random
import shutil
import sys
import tempfile
import textwrap
import time
import typing
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from minirlhf.errors import MinirlhfError, TrainingDiverged

# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainArgs:
    """Arguments every trainer takes. Each algorithm subclasses this and adds its own fields."""

    model: typing.Optional[str] = None
    """Hugging Face hub name or local path of the starting model (default: the toy world's; the
    toy model then also gets the trainer's TOY_PRESET for the fields left at their defaults)."""
    data: typing.Optional[str] = None
    """Training data file (JSONL/JSON; default: the toy world's file for this algorithm)."""
    template: typing.Optional[str] = None
    """Dataset template (minirlhf/data/templates.py) that maps raw records to examples, e.g.
    align_anything, pku_saferlhf, hh_rlhf, trl_standard (default: the toy world's format)."""
    out: typing.Optional[str] = None
    """Run directory: checkpoints, metrics CSV, TensorBoard logs (default: runs/<algo>-<time>)."""
    seed: int = 0
    """Random seed: model init of new heads, data order (a function of seed and epoch), sampling."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed: 0.5 stops halfway through the first)."""
    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent warming the learning rate up linearly from 0."""
    lr_schedule: typing.Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup: cosine to 0, linear to 0, or constant."""
    batch_size: int = 16
    """Examples per optimizer step (the 'big batch' that gradient accumulation reproduces)."""
    micro_batch_size: int = 0
    """Examples per forward/backward pass; gradients are accumulated over batch_size/micro_batch_size
    passes (0 = the whole batch in one pass)."""
    max_len: int = 512
    """Maximum tokens of prompt + response; longer examples are truncated (see the data report)."""
    max_prompt_len: typing.Optional[int] = None
    """Maximum prompt tokens; longer prompts lose tokens on the left, keeping their end
    (default: half of --max-len)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    eval_every: int = 0
    """Evaluate on the test split every this many optimizer steps (0 = only at the end)."""
    save_every: int = 0
    """Write a resumable checkpoint every this many optimizer steps (0 = only at the end)."""
    log_every: int = 1
    """Log training metrics (CSV, TensorBoard, progress bar) every this many optimizer steps."""
    resume: bool = False
    """Continue the run in --out from its latest checkpoint, exactly as if never interrupted."""
    stop_at_step: int = 0
    """Stop after this many optimizer steps, saving a checkpoint, without changing the schedule
    (time-boxing a run; --resume continues it). 0 = run to the end."""
    device: typing.Optional[str] = None
    """'cuda', 'cpu', ... (default: CUDA when available)."""
    progress: bool = True
    """Show a tqdm progress bar with live metrics."""
    tensorboard: bool = True
    """Also write TensorBoard event files to <out>/tb."""


def field_docs(args_class):
    """``{field name: attribute docstring}`` of a dataclass and its bases (read with ``ast``)."""
    docs = {}
    for cls in reversed(args_class.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError):  # no source (e.g. defined in an interactive session)
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def parse_args(args_class, argv=None, prog=None):
    """Build an ``argparse`` parser from a dataclass of arguments and parse ``argv``.

    Each field becomes ``--field-name`` with its attribute docstring
    as help and its default shown; ``bool`` fields become ``--flag/--no-flag``; ``Literal``
    fields get ``choices``; ``Optional[X]`` fields accept an X (default None).
    """
    docs = field_docs(args_class)
    hints = typing.get_type_hints(args_class)
    parser = argparse.ArgumentParser(prog=prog, description=(args_class.__doc__ or "").strip())
    for field in dataclasses.fields(args_class):
        kind = hints[field.name]
        option = f"--{field.name.replace('_', '-')}"
        help_text = docs.get(field.name, "")
        if field.default is not None and "default" not in help_text:
            help_text += f" (default: {field.default})"
        kwargs = {"default": field.default, "help": help_text or " "}
        if typing.get_origin(kind) is typing.Union:  # Optional[X] -> X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(kind))
            kwargs["type"] = type(kwargs["choices"][0])
        else:
            kwargs["type"] = kind
        parser.add_argument(option, dest=field.name, **kwargs)
    return args_class(**vars(parser.parse_args(argv)))


def default_out(algo):
    """``runs/<algo>-YYYYmmdd-HHMMSS``: a fresh run directory name."""
    return str(Path("runs") / f"{algo}-{time.strftime('%Y%m%d-%H%M%S')}")


# Arguments that may change between an interrupted run and its --resume without changing results.
RESUME_MAY_CHANGE = ("resume", "stop_at_step", "progress", "tensorboard", "device", "eval_every", "log_every", "save_every")


def warn_changed_args(args):
    """On ``--resume``: warn about arguments that differ from the interrupted run's ``args.json``
    (the continuation is exact only with the same ones)."""
    path = Path(args.out) / "args.json"
    if not path.exists():
        return
    before, now = json.loads(path.read_text()), dataclasses.asdict(args)
    changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in now.items() if k not in RESUME_MAY_CHANGE and before.get(k) != v]
    if changed:
        print(f"warning: --resume with different arguments than the interrupted run ({'; '.join(changed)}); "
              "the continuation will not match an uninterrupted run", file=sys.stderr)


def save_args(args, out):
    """Write the run's arguments to ``out/args.json`` (what ``--resume`` checks against)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    _write_text_atomic(Path(out) / "args.json", json.dumps(dataclasses.asdict(args), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Device, precision, seeding
# ---------------------------------------------------------------------------------------------


def select_device(device=None):
    """``torch.device(device)``, or CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Trained weights (and the reference) are loaded in float32 whatever the checkpoint stores (Qwen2.5
# ships bf16): AdamW updates of size lr·1e-3 vanish when rounded to bf16's 8 mantissa bits. On
# CUDA the matmuls still run in bf16 through ``autocast``.
TRAIN_DTYPE = torch.float32


def autocast(device):
    """bf16 autocast on CUDA (weights stay float32, matmuls run in bf16); a no-op on CPU.

    Log-probs and losses are computed in float32 by the core functions either way.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """All RNG states, to store in a checkpoint."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what ``rng_state`` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def data_limits(args):
    """``{"max_len", "max_prompt_len"}`` for the data loaders (the prompt budget defaults to half)."""
    return {"max_len": args.max_len, "max_prompt_len": args.max_prompt_len or args.max_len // 2}


def to_device(batch, device):
    """Move every tensor of a batch dict to ``device`` (other values are left alone)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Data order: the batch of step s is a function of (seed, s) only
# ---------------------------------------------------------------------------------------------


def epoch_permutation(num_examples, seed, epoch):
    """The order in which epoch ``epoch`` visits ``num_examples`` examples: a permutation that
    depends only on ``(seed, epoch)`` (its own generator, untouched by any other randomness).
    Negative "epochs" serve one-off draws: -1 the held-out test split, -2 KTO's mismatched pairs."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**62)
    return torch.randperm(num_examples, generator=generator).tolist()


class BatchSchedule:
    """Which examples each optimizer step uses.

    Epoch ``e`` is ``epoch_permutation(n, seed, e)`` cut into ``steps_per_epoch = n // batch_size``
    batches (the remainder is dropped so every step sees ``batch_size`` examples; it is a different
    remainder each epoch). ``total_steps = ceil(epochs * steps_per_epoch)``.
    """

    def __init__(self, num_examples, batch_size, epochs, seed):
        if num_examples < batch_size:
            raise MinirlhfError(
                f"the training set has {num_examples} examples, fewer than --batch-size {batch_size}"
            )
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.steps_per_epoch = num_examples // batch_size
        self.total_steps = max(1, math.ceil(epochs * self.steps_per_epoch))

    def batch(self, step):
        """Example indices of optimizer step ``step`` (0-based), a list of ``batch_size`` ints."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = epoch_permutation(self.num_examples, self.seed, epoch)
        return order[position * self.batch_size : (position + 1) * self.batch_size]


def micro_batches(indices, micro_batch_size):
    """Split one batch's example indices into consecutive micro-batches (0 = no split)."""
    size = micro_batch_size if micro_batch_size > 0 else len(indices)
    return [indices[i : i + size] for i in range(0, len(indices), size)]


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------


def make_optimizer(params, lr, weight_decay=0.0):
    """AdamW over the parameters that require grad."""
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay)


def make_scheduler(optimizer, total_steps, warmup_ratio=0.0, schedule="cosine"):
    """Linear warmup over ``round(warmup_ratio * total_steps)`` steps, then cosine/linear decay
    to 0 or constant. Step it once per optimizer step."""
    warmup = round(warmup_ratio * total_steps)

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# One optimizer step: accumulate, guard, clip, step
# ---------------------------------------------------------------------------------------------


class DivergenceGuard:
    """Stops a run at the first NaN/inf, after saving the last good state.

    ``save_last_good()`` is called before raising; the trainer passes a function that writes a
    checkpoint of the current model/optimizer (the weights are still finite because the check
    runs before ``optimizer.step``) and returns its path.
    """

    def __init__(self, save_last_good):
        self.save_last_good = save_last_good

    def check(self, value, what, step, example_ids):
        """Raise ``TrainingDiverged`` if the scalar ``value`` is NaN or inf."""
        value = float(value.detach()) if torch.is_tensor(value) else float(value)
        if math.isfinite(value):
            return
        path = self.save_last_good()
        raise TrainingDiverged(
            f"{what} is {value} at optimizer step {step} (0-based); batch example ids "
            f"{list(example_ids)}. The last good state (before this step) is saved in {path}; "
            f"inspect those examples, lower --lr, or continue with --resume."
        )


def accumulate_gradients(micro, loss_fn, weights, *, device, guard, step):
    """Backpropagate ``Σ_k w_k L_k`` over micro-batches, one backward each; return metrics.

    ``micro`` is a list of ``(example_ids, batch)``; ``loss_fn(batch) -> (loss, metrics)`` with a
    scalar ``loss`` and a dict of scalar metrics. ``weights[k] = n_k / Σ_j n_j`` where ``n_k``
    counts what ``L_k`` is a mean over (examples, or tokens for a token-mean loss), so the summed
    gradient equals the gradient of the one big-batch loss. Returned metrics are the
    ``w``-weighted sums of each micro-batch's metrics (= their big-batch values for means), plus
    ``loss``. The forward runs under ``autocast(device)``; a non-finite micro-batch loss stops the
    run through ``guard`` before anything is backpropagated.
    """
    totals = {}
    for (ids, batch), weight in zip(micro, weights):
        with autocast(device):
            loss, metrics = loss_fn(batch)
        guard.check(loss, "the loss", step, ids)
        (loss * weight).backward()
        for name, value in {"loss": loss.detach(), **metrics}.items():
            totals[name] = totals.get(name, 0.0) + weight * float(value)
    return totals


def optimizer_step(model, optimizer, scheduler, max_grad_norm, *, guard, step, example_ids):
    """Clip the gradient norm, check it is finite, step optimizer and schedule, zero the grads.

    Returns ``{"grad_norm": ‖g‖ before clipping, "lr": learning rate used}``.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    clip_to = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_to))
    guard.check(grad_norm, "the gradient norm", step, example_ids)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": grad_norm, "lr": lr}


# ---------------------------------------------------------------------------------------------
# Atomic files and checkpoints
# ---------------------------------------------------------------------------------------------


def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def _write_text_atomic(path, text):
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=f".{path.name}.") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def torch_save_atomic(obj, path):
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace``: ``path`` is
    either the old file or the complete new one, never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix=f".{path.name}.") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)
    return path


def write_dir_atomic(final, write):
    """Create directory ``final`` by calling ``write(tmp_dir)`` and renaming when complete.

    The files are fsynced before the rename, so ``final`` either does not exist or is complete.
    An existing ``final`` is replaced (it is moved aside first and deleted after the rename).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        write(tmp)
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_model(model, tokenizer, path):
    """Write an HF-loadable model (``save_pretrained``) and its tokenizer atomically to ``path``."""

    def write(tmp):
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_dir_atomic(path, write)


def save_checkpoint(out, step, model, tokenizer, optimizer, scheduler, extra=None, keep=2):
    """Write a resumable checkpoint ``out/checkpoints/step-{step:06d}`` and point ``latest`` at it.

    Contents: the model and tokenizer (``save_pretrained``, loadable by plain transformers or
    ``RewardModel.from_pretrained``) and ``training_state.pt`` = optimizer, scheduler, ``step`` (the
    number of optimizer steps done), RNG states and ``extra`` (anything else the trainer needs,
    e.g. a KL controller's value). Older checkpoints beyond the newest ``keep`` are deleted only
    after the new one is complete. Returns the checkpoint path.
    """
    root = Path(out) / "checkpoints"
    path = root / f"step-{step:06d}"

    def write(tmp):
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "extra": extra or {},
        }
        torch.save(state, tmp / "training_state.pt")

    write_dir_atomic(path, write)
    _write_text_atomic(root / "latest", path.name + "\n")
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        if old.name != path.name:
            shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(out):
    """Path of the checkpoint ``out/checkpoints/latest`` points at, or None when there is none."""
    pointer = Path(out) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "training_state.pt").exists() else None


def load_training_state(path, optimizer, scheduler):
    """Restore optimizer, scheduler and RNG states from checkpoint ``path``; return the state dict
    (``state["step"]`` optimizer steps are done, ``state["extra"]`` is what the trainer saved).

    The model weights are loaded by the trainer itself, from the same directory, with its usual
    loader (``from_pretrained``), *before* building the optimizer.
    """
    state = torch.load(Path(path) / "training_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def resume_checkpoint(args):
    """For ``--resume``: the checkpoint to continue from (raises a clear error if none).

    Without ``--resume`` returns None and refuses to overwrite a run directory that already has
    checkpoints (pass ``--resume`` or a new ``--out``).
    """
    path = latest_checkpoint(args.out)
    if args.resume:
        if path is None:
            raise MinirlhfError(f"--resume: no checkpoint found in {Path(args.out) / 'checkpoints'}")
        return path
    if path is not None:
        raise MinirlhfError(
            f"{args.out} already holds a run (checkpoint {path.name}); pass --resume to continue it "
            f"or choose another --out"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Metrics: CSV + TensorBoard + tqdm postfix
# ---------------------------------------------------------------------------------------------

# The metrics a progress bar shows, in this order, when a trainer logs them.
POSTFIX_KEYS = ("loss", "accuracy", "margin", "kl", "reward", "entropy")


class MetricsLogger:
    """Logs scalar metrics per step to ``out/<split>.csv`` and TensorBoard ``<split>/<name>``.

    ``log(step, metrics, split="train")``: one CSV row (columns grow as new metric names
    appear) and one TensorBoard scalar per metric. ``step`` counts optimizer steps done. When
    resuming after ``start_step`` steps, rows and events the interrupted run logged after its
    checkpoint (steps ``> start_step``) are dropped, so the curves have no duplicates.
    """

    def __init__(self, out, start_step=0, tensorboard=True):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows = {}  # split -> list of row dicts
        for path in self.out.glob("*.csv"):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if "step" not in (reader.fieldnames or []):
                    continue  # not a metrics file of ours
                kept = [r for r in reader if int(float(r["step"])) <= start_step]
            self.rows[path.stem] = kept
            self._rewrite(path.stem)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=start_step + 1 if start_step else None)

    def _rewrite(self, split):
        rows = self.rows[split]
        columns = ["step"] + sorted({k for r in rows for k in r} - {"step"})
        text_path = self.out / f"{split}.csv"
        with tempfile.NamedTemporaryFile("w", newline="", dir=self.out, delete=False) as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(f.name, text_path)
        return columns

    def log(self, step, metrics, split="train"):
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        rows = self.rows.setdefault(split, [])
        path = self.out / f"{split}.csv"
        old_columns = list(rows[0].keys()) if rows else None
        rows.append(row)
        if old_columns is not None and set(row) <= set(old_columns) and path.exists():
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


def read_metrics(out, split="train"):
    """The rows of ``out/<split>.csv`` as dicts of floats (for plots and tests)."""
    with open(Path(out) / f"{split}.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def progress_bar(total, initial=0, desc=None, enabled=True):
    """A tqdm bar over optimizer steps (a no-op object when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


def postfix(metrics):
    """The live metrics a progress bar shows (see ``POSTFIX_KEYS``), formatted compactly."""
    return {k: f"{metrics[k]:.4g}" for k in POSTFIX_KEYS if k in metrics}


# ---------------------------------------------------------------------------------------------
# Toy-world defaults
# ---------------------------------------------------------------------------------------------


def apply_toy_preset(args, preset):
    """Give the fields still at their dataclass default the toy world's ``preset`` values.

    The toy policy is a ~1M-parameter model trained from scratch on short sequences: it wants a
    larger learning rate and a shorter ``max_len`` than the defaults, which suit a pretrained
    0.5B model. Fields the user set explicitly are kept.
    """
    defaults = {field.name: field.default for field in dataclasses.fields(args)}
    for name, value in preset.items():
        if getattr(args, name) == defaults[name]:
            setattr(args, name, value)


def toy_world(seed=0, sft=True):
    """The embedded toy world (built and cached on first use), for the trainers' defaults.

    ``sft=False`` skips building its SFT policy (what the SFT trainer itself needs).
    """
    from minirlhf.toy.world import load_world

    return load_world(seed=seed, sft=sft)


# ---------------------------------------------------------------------------------------------
# Starting a run, and the loop the offline trainers (SFT, RM, DPO family) share
# ---------------------------------------------------------------------------------------------


def quiet_transformers():
    """Turn off transformers' own progress bars ("Loading weights"): ours is the one to watch."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def prepare_run(args, algo):
    """Fill ``args.out`` (default ``runs/<algo>-<time>``), find the checkpoint to resume from,
    write ``args.json`` and seed everything. Returns the checkpoint path or None.

    Call it first in every ``train_<algo>``: on ``--resume`` the trainer then loads its model
    from the returned directory instead of ``args.model``.
    """
    quiet_transformers()
    if args.out is None:
        args.out = default_out(algo)
    checkpoint = resume_checkpoint(args)
    if checkpoint is not None:
        warn_changed_args(args)
    save_args(args, args.out)
    seed_everything(args.seed)
    return checkpoint


def run_steps(args, *, model, tokenizer, optimizer, scheduler, schedule, start_step, device,
              make_micro_batches, loss_fn, evaluate=None, desc=None):
    """The optimizer-step loop shared by the offline trainers; returns the last eval metrics.

    For each step ``s`` from ``start_step`` (steps already done) to ``schedule.total_steps``
    (or ``args.stop_at_step``):

    1. ``indices = schedule.batch(s)`` — a function of ``(seed, s)`` only, so resuming is exact;
    2. ``micro, weights = make_micro_batches(indices)`` — ``micro`` is a list of
       ``(example_ids, batch)``, ``weights`` their shares of the big batch (see
       ``accumulate_gradients``);
    3. accumulate ``Σ_k w_k ∇L_k`` with ``loss_fn(batch) -> (loss, metrics)``, clip, step;
    4. log (CSV/TensorBoard/tqdm), evaluate every ``args.eval_every`` steps (and before the first
       step) with ``evaluate() -> metrics`` (model in eval mode, no grad), checkpoint every
       ``args.save_every`` steps. Without ``eval_every`` the evaluation runs once, at the end.

    A checkpoint is always written when the loop ends (finished or stopped at ``stop_at_step``),
    and by the divergence guard before it raises ``TrainingDiverged``.
    """
    total = schedule.total_steps
    last = min(total, args.stop_at_step) if args.stop_at_step > 0 else total
    logger = MetricsLogger(args.out, start_step, tensorboard=args.tensorboard)
    steps_done = start_step

    def checkpoint():
        return save_checkpoint(args.out, steps_done, model, tokenizer, optimizer, scheduler)

    guard = DivergenceGuard(checkpoint)
    bar = progress_bar(total, initial=start_step, desc=desc, enabled=args.progress)
    eval_metrics, saved_at = {}, None

    def run_eval():
        model.eval()
        with torch.no_grad(), autocast(device):
            metrics = evaluate()
        logger.log(steps_done, metrics, split="eval")
        return metrics

    try:
        if evaluate is not None and args.eval_every > 0 and start_step == 0:
            eval_metrics = run_eval()  # the starting point of the eval curves
        for step in range(start_step, last):
            model.train()
            indices = schedule.batch(step)
            micro, weights = make_micro_batches(indices)
            metrics = accumulate_gradients(micro, loss_fn, weights, device=device, guard=guard, step=step)
            metrics.update(optimizer_step(model, optimizer, scheduler, args.max_grad_norm,
                                          guard=guard, step=step, example_ids=indices))
            steps_done = step + 1
            metrics["epoch"] = steps_done / schedule.steps_per_epoch
            if steps_done % max(1, args.log_every) == 0 or steps_done == last:
                logger.log(steps_done, metrics)
                bar.set_postfix(postfix(metrics), refresh=False)
            bar.update(1)
            if evaluate is not None and args.eval_every > 0 and steps_done % args.eval_every == 0:
                eval_metrics = run_eval()
            if args.save_every > 0 and steps_done % args.save_every == 0:
                saved_at = checkpoint()
        if evaluate is not None and last == total and (args.eval_every <= 0 or total % args.eval_every):
            eval_metrics = run_eval()
        if saved_at is None or steps_done % args.save_every:
            checkpoint()
    finally:
        bar.close()
        logger.close()
    return eval_metrics


def finish_run(args, model, tokenizer, schedule):
    """The path ``train_<algo>`` returns: ``out/final`` (written atomically) when the run reached
    its last step, else the latest checkpoint (the run was stopped at ``--stop-at-step``)."""
    if args.stop_at_step > 0 and args.stop_at_step < schedule.total_steps:
        return latest_checkpoint(args.out)
    return save_model(model, tokenizer, Path(args.out) / "final")
