"""The run directory: start or resume a run, resumable checkpoints, the final model.

Layout of a run directory::

    out/args.json  out/train.csv  out/eval.csv  out/tb/  out/checkpoints/{latest,step-N/}  out/final/

``out/checkpoints/step-000120/`` holds an HF-loadable model (``save_pretrained``; with LoRA only the
adapters, in PEFT's layout) plus ``training_state.pt`` (optimizer, scheduler, step, RNG states, the
fp16 loss scaler, and what else the trainer needs). ``out/final/`` is written in the base model's
dtype (``--save-fp32`` keeps float32); with LoRA it is the merged model, plus ``final/adapter/``.
It is written to a temporary directory, fsynced, renamed into place, and only then does the
one-line pointer file ``out/checkpoints/latest`` switch to it. The previous checkpoint is kept, so
a crash at any moment leaves a complete last-good checkpoint to ``--resume`` from.

**Resuming trusts nothing unchecked.** A checkpoint can still be damaged after the fact (a full
disk, a truncated copy between machines, a file deleted by hand): ``--resume`` validates it
first (``checkpoint_problem``: files present, safetensors headers parse and match the file sizes,
``training_state.pt`` loads) and falls back to the newest complete checkpoint with a warning that
names the damaged one. Starting a run also removes the temporaries a killed process left behind
(``remove_stale_temporaries``), refuses an ``--out`` that holds another run (or is a file), and
starts clean — saying so — in one whose previous run stopped before its first checkpoint.

Under torchrun every rank calls these functions together (they gather what rank 0 writes: FSDP's
shards, each rank's RNG state); rank 0 alone writes, and every rank reads on ``--resume`` (a
multi-node run needs ``--out`` on a filesystem all nodes share).
"""
import sys
import time
from pathlib import Path

import torch

from minirlhf.data.atomic import remove_dir, remove_stale_temporaries, write_dir_atomic, write_text_atomic
from minirlhf.errors import MinirlhfError
from minirlhf.models.lora import lora_modules, save_adapter, save_merged
from minirlhf.models.policy import checkpoint_dtype
from minirlhf.train.args import check_resumed_args, save_args
from minirlhf.train.checkpoint_check import checkpoint_problem, load_state
from minirlhf.train.distributed import barrier, broadcast, gather_objects, init_distributed, is_main, rank
from minirlhf.train.parallel import full_optimizer_state, full_state_dict, load_optimizer_state
from minirlhf.train.runtime import quiet_transformers, rng_state, seed_everything, set_rng_state


# What a run writes into its directory besides args.json, checkpoints/, final/ and PPO's critic/.
RUN_LOGS = ("train.csv", "eval.csv", "tb", "reference_logps.pt")
RUN_FILES = RUN_LOGS + ("args.json", "final", "critic")


def prepare_run(args, algo):
    """Start (or resume) the run in ``args.out``; returns the checkpoint to resume from, or None.

    Joins torchrun's process group (if torchrun started us), fills ``args.out`` (default
    ``runs/<algo>-<time>``), removes stale temporaries, finds the checkpoint (``--resume``), writes
    ``args.json`` (with ``algo``) and seeds everything, rank r with ``seed + r`` (so the ranks sample
    different responses). Call it first in every ``train_<algo>``: on ``--resume`` the trainer then
    loads its model from the returned directory.
    """
    quiet_transformers()
    init_distributed(args.device)
    if args.out is None:  # rank 0's clock names the run
        args.out = broadcast(str(Path("runs") / f"{algo}-{time.strftime('%Y%m%d-%H%M%S')}"))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MinirlhfError(f"--out {out} is a file; give a directory for the run (e.g. --out runs/{algo})")
    if is_main():  # a run directory has one writer: older versions' untagged temporaries are stale too
        remove_stale_temporaries(out, untagged=lambda name: name in RUN_FILES)
        remove_stale_temporaries(out / "checkpoints", untagged=lambda name: name == "latest" or name.startswith("step-"))
    barrier()  # every rank looks for the checkpoint in the tidied directory
    checkpoint = resume_checkpoint(args)
    if checkpoint is not None:
        check_resumed_args(args, algo)
    if is_main():
        save_args(args, args.out, algo)
    barrier()  # every rank has looked for a checkpoint before rank 0 writes one
    seed_everything(args.seed + rank())
    return checkpoint


def resume_checkpoint(args):
    """For ``--resume``: the newest complete checkpoint (raises a clear error if none), with a
    warning for each newer one that is damaged.

    Without ``--resume`` returns None and refuses a run directory that already holds a run
    (checkpoints or ``final/``): pass ``--resume`` or a new ``--out``. A directory whose run
    stopped before its first checkpoint has nothing to resume: its logs are removed, with a
    warning, so that the new run's metrics never mix with the old ones.
    """
    out = Path(args.out)
    if args.resume:
        path, problems = find_checkpoint(out)
        if path is None:
            found = "; ".join(f"{p.name}: {why}" for p, why in problems) or "none"
            raise MinirlhfError(f"--resume: no complete checkpoint in {out / 'checkpoints'} (found: {found})")
        for bad, problem in problems:
            print(f"warning: checkpoint {bad} is damaged ({problem}); resuming from {path.name}", file=sys.stderr)
        return path
    held = checkpoint_dirs(out) + [p for p in [out / "final"] if p.exists()]
    if held:
        raise MinirlhfError(f"{out} already holds a run ({held[-1].name}); pass --resume to continue it "
                            f"or choose another --out")
    leftovers = [out / name for name in RUN_LOGS if (out / name).exists()]
    if leftovers and is_main():
        print(f"warning: {out} holds the logs of a run that stopped before its first checkpoint (nothing to "
              f"resume); starting over, replacing {', '.join(p.name for p in leftovers)}", file=sys.stderr)
        for leftover in leftovers:
            remove_dir(leftover)
    return None


def last_step(args, total_steps):
    """The step the run stops after: ``total_steps``, or ``--stop-at-step`` when that comes first."""
    return min(total_steps, args.stop_at_step) if args.stop_at_step > 0 else total_steps


def checkpoint_due(args, done, start, last):
    """Whether to checkpoint after ``done`` steps: every ``--save-every`` steps, and at the last."""
    return (done > start and args.save_every > 0 and done % args.save_every == 0) or done == last


def save_checkpoint(out, step, model, tokenizer, optimizer, scheduler, extra=None, keep=2, scaler=None):
    """Write a resumable checkpoint ``out/checkpoints/step-{step:06d}`` and point ``latest`` at it.

    Contents: the model and tokenizer (``save_pretrained``, loadable by plain transformers or
    ``RewardModel.from_pretrained``) and ``training_state.pt`` = optimizer, scheduler, ``step`` (the
    number of optimizer steps done), RNG states and ``extra`` (anything else the trainer needs,
    e.g. PPO's critic and KL coefficient), and ``scaler``'s state (fp16). A model with LoRA adapters
    is saved as its adapters alone (the base weights are ``--model``'s). Older checkpoints beyond the newest ``keep`` are deleted
    only after the new one is complete. Returns the checkpoint path. Under torchrun every rank calls
    it; the RNG states of all ranks are stored (``rng_per_rank``).
    """
    root = Path(out) / "checkpoints"
    path = root / f"step-{step:06d}"
    adapted = bool(lora_modules(model))
    weights = None if adapted else full_state_dict(model)
    optimizer_state, rngs = full_optimizer_state(optimizer), gather_objects(rng_state())

    def write(tmp):
        if adapted:
            save_adapter(model, tmp)
        else:
            model.save_pretrained(tmp, state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        state = {
            "step": step,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": rngs[0],
            "extra": extra or {},
            **({"scaler": scaler.state_dict()} if scaler is not None else {}),
        }
        if len(rngs) > 1:
            state["rng_per_rank"] = rngs
        torch.save(state, tmp / "training_state.pt")

    if is_main():
        write_dir_atomic(path, write)
        write_text_atomic(root / "latest", path.name + "\n")
        for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
            if old.name != path.name:
                remove_dir(old)
    barrier()
    return path


def latest_checkpoint(out):
    """The newest complete checkpoint in ``out/checkpoints``, or None (``find_checkpoint``)."""
    return find_checkpoint(out)[0]


def find_checkpoint(out):
    """``(path, problems)``: the newest complete checkpoint in ``out/checkpoints`` (or None), and
    ``[(path, what is wrong)]`` for the newer ones that failed ``checkpoint_problem``.

    Newest = the highest step. The ``latest`` pointer names it after every completed save; a
    crash between writing a checkpoint and moving the pointer leaves a newer, complete one,
    which is then the one to resume from.
    """
    problems = []
    for path in reversed(checkpoint_dirs(out)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, problems
        problems.append((path, problem))
    return None, problems


def checkpoint_dirs(out):
    """The ``out/checkpoints/step-N`` directories, oldest (smallest N) first."""
    paths = [p for p in (Path(out) / "checkpoints").glob("step-*") if p.name[5:].isdigit() and p.is_dir()]
    return sorted(paths, key=lambda p: int(p.name[5:]))


def load_training_state(path, optimizer, scheduler, scaler=None):
    """Restore optimizer, scheduler, RNG and (fp16) ``scaler`` states from checkpoint ``path``; return
    the state dict (``state["step"]`` optimizer steps are done, ``state["extra"]`` is what the
    trainer saved). A scaler the checkpoint has no state for (a run started in another precision)
    starts afresh.

    The model weights are loaded by the trainer itself, from the same directory, with its usual
    loader (``from_pretrained``), *before* building the optimizer. Under torchrun rank r restores
    rank r's RNG state; a rank the interrupted run did not have keeps its fresh seed.
    """
    state = load_state(Path(path) / "training_state.pt")
    load_optimizer_state(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    rngs = state.get("rng_per_rank", [state["rng"]])
    if rank() < len(rngs):
        set_rng_state(rngs[rank()])
    return state


def save_model(model, tokenizer, path, dtype=None):
    """Write an HF-loadable model (``save_pretrained``) and its tokenizer atomically to ``path``, in
    ``dtype`` (default: as it is) (rank 0 writes, every rank returns ``path``). A model with LoRA
    adapters is written merged (``W + ΔW``), its adapters beside it in ``path/adapter``."""
    adapted = bool(lora_modules(model))
    weights = None if adapted else full_state_dict(model)

    def write(tmp):
        save_merged(model, tmp, tokenizer, dtype, state=weights)
        if adapted:
            save_adapter(model, tmp / "adapter")

    if is_main():
        write_dir_atomic(path, write)
    barrier()
    return Path(path)


def final_path(args, model, tokenizer, done, total_steps):
    """What ``train_<algo>`` returns: ``out/final`` (the model, written atomically) once all
    ``total_steps`` are done, else the latest checkpoint (stopped early at ``--stop-at-step``). The
    final model is saved in ``--model``'s dtype unless ``--save-fp32``."""
    if done < total_steps:
        return latest_checkpoint(args.out)
    dtype = None if args.save_fp32 or not args.model else checkpoint_dtype(args.model)
    return save_model(model, tokenizer, Path(args.out) / "final", dtype)
