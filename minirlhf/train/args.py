"""Arguments: one dataclass per trainer, its ``--help`` read from the fields' docstrings.

Each algorithm subclasses ``TrainArgs`` and adds its own fields; a string literal right under a
field is that field's help (an *attribute docstring*). ``parse_args`` reads those with ``ast`` and
builds the command line, so the documentation lives once, next to the default.

A ``TrainArgs`` remembers which fields its caller set (``explicit_fields``): the keyword and
positional arguments it was built with, the flags given on the command line (even when equal to
the default), and fields assigned afterwards. The toy world's presets fill in only the others.
"""
import argparse
import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import typing
from pathlib import Path

from minirlhf.data.atomic import write_text_atomic


@dataclasses.dataclass
class TrainArgs:
    """Arguments every trainer takes. Each algorithm subclasses this and adds its own fields."""

    model: typing.Optional[str] = None
    """Hugging Face hub name or local path of the starting model (default: the toy world's; the
    toy model then also gets the trainer's TOY_PRESET for the fields not set explicitly)."""
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
    """'cuda', 'cpu', ... (default: CUDA when available; under torchrun each process's own GPU)."""
    fsdp: bool = False
    """Under torchrun: shard weights, gradients and AdamW state across the processes (FSDP2) instead
    of a whole copy on each (DDP), for models too big for one GPU. Same training either way."""
    progress: bool = True
    """Show a tqdm progress bar with live metrics."""
    tensorboard: bool = True
    """Also write TensorBoard event files to <out>/tb."""

    def __new__(cls, *args, **kwargs):
        # __new__ receives the arguments of the dataclass __init__: record what the caller set.
        self = super().__new__(cls)
        names = [field.name for field in dataclasses.fields(cls)]
        object.__setattr__(self, "_explicit", set(names[: len(args)]) | set(kwargs))
        return self

    def __post_init__(self):
        object.__setattr__(self, "_constructed", True)

    def __setattr__(self, name, value):
        if self.__dict__.get("_constructed"):  # assigned after construction: set explicitly too
            self._explicit.add(name)
        object.__setattr__(self, name, value)

    @property
    def explicit_fields(self):
        """The fields the caller set (constructor, command line, or assignment), as a frozenset."""
        return frozenset(self.__dict__.get("_explicit", ()))


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

    Each field becomes ``--field-name`` with its attribute docstring as help and its default
    shown; ``bool`` fields become ``--flag/--no-flag``; ``Literal`` fields get ``choices``;
    ``Optional[X]`` fields accept an X (default None). Only the flags given are passed to
    ``args_class`` (the others keep the dataclass default), so a ``TrainArgs`` knows which the
    user set, even to the default value.
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
        kwargs = {"default": argparse.SUPPRESS, "help": help_text or " "}
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


def apply_toy_preset(args, preset):
    """Give the fields the caller did not set (``args.explicit_fields``) the toy world's ``preset``.

    The toy policy is a ~1M-parameter model trained from scratch on short sequences: it wants a
    larger learning rate and a shorter ``max_len`` than the defaults, which suit a pretrained
    0.5B model. A field set explicitly is kept, even when it equals the dataclass default.
    """
    for name, value in preset.items():
        if name not in args.explicit_fields:
            setattr(args, name, value)


def data_limits(args):
    """``{"max_len", "max_prompt_len"}`` for the data loaders (the prompt budget defaults to half)."""
    return {"max_len": args.max_len, "max_prompt_len": args.max_prompt_len or args.max_len // 2}


# Arguments that may change between an interrupted run and its --resume without changing results.
RESUME_MAY_CHANGE = ("resume", "stop_at_step", "progress", "tensorboard", "device", "fsdp", "eval_every", "log_every",
                     "save_every")


def save_args(args, out):
    """Write the run's arguments to ``out/args.json`` (what ``--resume`` checks against)."""
    write_text_atomic(Path(out) / "args.json", json.dumps(dataclasses.asdict(args), indent=2) + "\n")


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
