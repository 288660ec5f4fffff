"""Arguments: one dataclass per trainer, its ``--help`` read from the fields' docstrings.

Each algorithm subclasses ``TrainArgs`` and adds its own fields; a string literal right under a
field is that field's help (an *attribute docstring*). ``parse_args`` reads those with ``ast`` and
builds the command line, so the documentation lives once, next to the default.

A ``TrainArgs`` remembers which fields its caller set (``explicit_fields``): the keyword and
positional arguments it was built with, the flags given on the command line (even when equal to
the default), and fields assigned afterwards. The toy world's presets fill in only the others.

Every value is checked when it is set (``check_field``): ``--temperature 0`` or ``--group-size 1``
is refused before anything loads, with a message that says why and what to use instead.
"""
import argparse
import ast
import dataclasses
import inspect
import json
import math
import sys
import textwrap
import typing
from pathlib import Path

from minirlhf.data.atomic import write_text_atomic
from minirlhf.errors import MinirlhfError


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
    precision: typing.Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Dtype of the matmuls under autocast (weights train in float32): auto = bf16 on a GPU that has
    it, fp16 with loss scaling on one that has not (T4, V100), fp32 on the CPU. See train/precision.py."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward instead of keeping them: activation memory
    one tensor per layer, for about one more forward pass of compute. Same numbers."""
    save_fp32: bool = False
    """Save the final model in float32 (default: the base model's dtype, e.g. bf16 for Qwen2.5: half
    the disk). Checkpoints are always float32, for an exact --resume."""
    keep_dropout: bool = False
    """Keep the models' dropout. Off by default (as in TRL): RLHF compares one model's log-probs
    across forward passes (π_old vs π_θ, π_θ vs π_ref), and dropout turns those differences into
    noise. Qwen2/Llama have no dropout; GPT-2-style models do."""
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
        for field in dataclasses.fields(self):
            check_field(field.name, getattr(self, field.name))
        object.__setattr__(self, "_constructed", True)

    def __setattr__(self, name, value):
        if self.__dict__.get("_constructed"):  # assigned after construction: set explicitly too
            check_field(name, value)
            self._explicit.add(name)
        object.__setattr__(self, name, value)

    @property
    def explicit_fields(self):
        """The fields the caller set (constructor, command line, or assignment), as a frozenset."""
        return frozenset(self.__dict__.get("_explicit", ()))


@dataclasses.dataclass
class PolicyTrainArgs(TrainArgs):
    """Arguments of the trainers that train a policy (all but the reward model's)."""

    lora_rank: int = 0
    """Train LoRA adapters of this rank instead of all weights (0 = full fine-tuning). The base weights
    stay frozen in the compute dtype and π_ref is the base model itself (adapters off): one copy."""
    lora_alpha: float = 32.0
    """LoRA's α: the update is (α / rank)·B·A."""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """Comma-separated names of the linear layers that get adapters (Qwen2/Llama attention and MLP)."""
    fused_head: bool = False
    """Compute the policy's log-probs through the LM head in chunks, never building the [B, T, V]
    logits (models/forward.fused_response_logprobs); one process only."""


# name -> (is the value acceptable?, what is expected). Fields not listed take any value of their type.
FIELD_RULES = {
    "temperature": (lambda v: v > 0, (
        "must be > 0: the PPO/GRPO/RLOO ratio and the KL are log-probs of the distribution the samples "
        "were drawn from, and greedy decoding (0) has none (online DPO would sample identical, tied "
        "pairs). Sample with --temperature 1.0 (or e.g. 0.7 for less varied responses); for greedy "
        "responses of a trained policy use `python -m minirlhf generate --temperature 0`")),
    "group_size": (lambda v: v >= 2, "must be at least 2: a response's baseline is the other responses to its prompt"),
    "samples_per_prompt": (lambda v: v >= 2, "must be at least 2: a pair is the judge's best and worst sample"),
    "batch_size": (lambda v: v >= 1, "must be at least 1"),
    "max_new_tokens": (lambda v: v >= 1, "must be at least 1"),
    "max_len": (lambda v: v >= 2, "must be at least 2 (a prompt token and a response token)"),
    "epochs": (lambda v: v > 0, "must be > 0"),
    "steps": (lambda v: v >= 0, "must be >= 0"),
    "lr": (lambda v: v >= 0, "must be >= 0"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "eval_fraction": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    **{name: (lambda v: v >= 0, "must be >= 0") for name in (
        "micro_batch_size", "minibatch_size", "eval_every", "save_every", "stop_at_step", "max_grad_norm",
        "weight_decay", "beta", "lora_rank")},
    "lora_alpha": (lambda v: v > 0, "must be > 0"),
    "ppo_epochs": (lambda v: v >= 1, "must be at least 1"),
}


def check_field(name, value):
    """Raise ``MinirlhfError`` naming the flag when ``value`` is not acceptable for field ``name``:
    NaN/inf for any float field, or a value outside ``FIELD_RULES``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    flag = f"--{name.replace('_', '-')}"
    if isinstance(value, float) and not math.isfinite(value):
        raise MinirlhfError(f"{flag} {value}: must be a finite number")
    accept, expected = FIELD_RULES.get(name, (None, None))
    if accept is not None and not accept(value):
        raise MinirlhfError(f"{flag} {value}: {expected}")


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
                     "save_every", "gradient_checkpointing", "save_fp32")


def save_args(args, out, algo=None):
    """Write the run's arguments (and ``"algorithm": algo``) to ``out/args.json``: what ``--resume``
    checks against."""
    record = {**({"algorithm": algo} if algo else {}), **dataclasses.asdict(args)}
    write_text_atomic(Path(out) / "args.json", json.dumps(record, indent=2) + "\n")


def saved_args(out):
    """The ``args.json`` of run directory ``out`` as a dict, or None when it is missing or unreadable
    (with a warning: a run can still resume, but not be checked against it)."""
    path = Path(out) / "args.json"
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        print(f"warning: {path} is unreadable ({err}); the arguments of the run cannot be compared", file=sys.stderr)
        return None
    return record if isinstance(record, dict) else None


def check_resumed_args(args, algo):
    """On ``--resume``: refuse a run of another algorithm (``algo`` differs from ``args.json``'s), and
    warn about arguments that differ from the interrupted run's (the continuation is exact only
    with the same ones)."""
    before, now = saved_args(args.out), dataclasses.asdict(args)
    if before is None:
        return
    if before.get("algorithm", algo) != algo:
        raise MinirlhfError(f"--resume: {args.out} holds a {before['algorithm']} run, not {algo}; resume it with "
                            f"the command that started it, or choose another --out")
    changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in now.items() if k not in RESUME_MAY_CHANGE and before.get(k) != v]
    if changed:
        print(f"warning: --resume with different arguments than the interrupted run ({'; '.join(changed)}); "
              "the continuation will not match an uninterrupted run", file=sys.stderr)
