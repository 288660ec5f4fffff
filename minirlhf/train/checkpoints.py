"""The run directory: start or resume a run, resumable checkpoints, the final model.

Layout of a run directory::

    out/args.json  out/train.csv  out/eval.csv  out/tb/  out/checkpoints/{latest,step-N/}  out/final/

``out/checkpoints/step-000120/`` holds an HF-loadable model (``save_pretrained``) plus
``training_state.pt`` (optimizer, scheduler, step, RNG states, and what else the trainer needs).
It is written to a temporary directory, fsynced, renamed into place, and only then does the
one-line pointer file ``out/checkpoints/latest`` switch to it. The previous checkpoint is kept, so
a crash at any moment leaves a complete last-good checkpoint to ``--resume`` from.

Under torchrun every rank calls these functions together (they gather what rank 0 writes: FSDP's
shards, each rank's RNG state); rank 0 alone writes, and every rank reads on ``--resume`` (a
multi-node run needs ``--out`` on a filesystem all nodes share).
"""
import shutil
import time
from pathlib import Path

import torch

from minirlhf.data.atomic import write_dir_atomic, write_text_atomic
from minirlhf.errors import MinirlhfError
from minirlhf.train.args import save_args, warn_changed_args
from minirlhf.train.distributed import barrier, broadcast, gather_objects, init_distributed, is_main, rank
from minirlhf.train.parallel import full_optimizer_state, full_state_dict, load_optimizer_state
from minirlhf.train.runtime import quiet_transformers, rng_state, seed_everything, set_rng_state


def prepare_run(args, algo):
    """Start (or resume) the run in ``args.out``; returns the checkpoint to resume from, or None.

    Joins torchrun's process group (if torchrun started us), fills ``args.out`` (default
    ``runs/<algo>-<time>``), finds the checkpoint (``--resume``), writes ``args.json`` and seeds
    everything, rank r with ``seed + r`` (so the ranks sample different responses). Call it first in
    every ``train_<algo>``: on ``--resume`` the trainer then loads its model from the returned directory.
    """
    quiet_transformers()
    init_distributed(args.device)
    if args.out is None:  # rank 0's clock names the run
        args.out = broadcast(str(Path("runs") / f"{algo}-{time.strftime('%Y%m%d-%H%M%S')}"))
    checkpoint = resume_checkpoint(args)
    if is_main():
        if checkpoint is not None:
            warn_changed_args(args)
        save_args(args, args.out)
    barrier()  # every rank has looked for a checkpoint before rank 0 writes one
    seed_everything(args.seed + rank())
    return checkpoint


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


def last_step(args, total_steps):
    """The step the run stops after: ``total_steps``, or ``--stop-at-step`` when that comes first."""
    return min(total_steps, args.stop_at_step) if args.stop_at_step > 0 else total_steps


def checkpoint_due(args, done, start, last):
    """Whether to checkpoint after ``done`` steps: every ``--save-every`` steps, and at the last."""
    return (done > start and args.save_every > 0 and done % args.save_every == 0) or done == last


def save_checkpoint(out, step, model, tokenizer, optimizer, scheduler, extra=None, keep=2):
    """Write a resumable checkpoint ``out/checkpoints/step-{step:06d}`` and point ``latest`` at it.

    Contents: the model and tokenizer (``save_pretrained``, loadable by plain transformers or
    ``RewardModel.from_pretrained``) and ``training_state.pt`` = optimizer, scheduler, ``step`` (the
    number of optimizer steps done), RNG states and ``extra`` (anything else the trainer needs,
    e.g. PPO's critic and KL coefficient). Older checkpoints beyond the newest ``keep`` are deleted
    only after the new one is complete. Returns the checkpoint path. Under torchrun every rank calls
    it; the RNG states of all ranks are stored (``rng_per_rank``).
    """
    root = Path(out) / "checkpoints"
    path = root / f"step-{step:06d}"
    weights, optimizer_state, rngs = full_state_dict(model), full_optimizer_state(optimizer), gather_objects(rng_state())

    def write(tmp):
        model.save_pretrained(tmp, state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        state = {
            "step": step,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": rngs[0],
            "extra": extra or {},
        }
        if len(rngs) > 1:
            state["rng_per_rank"] = rngs
        torch.save(state, tmp / "training_state.pt")

    if is_main():
        write_dir_atomic(path, write)
        write_text_atomic(root / "latest", path.name + "\n")
        for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
            if old.name != path.name:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
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
    loader (``from_pretrained``), *before* building the optimizer. Under torchrun rank r restores
    rank r's RNG state; a rank the interrupted run did not have keeps its fresh seed.
    """
    state = torch.load(Path(path) / "training_state.pt", map_location="cpu", weights_only=False)
    load_optimizer_state(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rngs = state.get("rng_per_rank", [state["rng"]])
    if rank() < len(rngs):
        set_rng_state(rngs[rank()])
    return state


def save_model(model, tokenizer, path):
    """Write an HF-loadable model (``save_pretrained``) and its tokenizer atomically to ``path``
    (rank 0 writes, every rank returns ``path``)."""
    weights = full_state_dict(model)

    def write(tmp):
        model.save_pretrained(tmp, state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    if is_main():
        write_dir_atomic(path, write)
    barrier()
    return Path(path)


def final_path(args, model, tokenizer, done, total_steps):
    """What ``train_<algo>`` returns: ``out/final`` (the model, written atomically) once all
    ``total_steps`` are done, else the latest checkpoint (stopped early at ``--stop-at-step``)."""
    if done < total_steps:
        return latest_checkpoint(args.out)
    return save_model(model, tokenizer, Path(args.out) / "final")
