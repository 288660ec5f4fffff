"""Checking a checkpoint before ``--resume`` trusts it, and reading its training state safely.

``checkpoint_problem`` says what makes a checkpoint directory unusable (a file missing, a truncated
safetensors file, a JSON file cut short, a training state that does not load), cheapest check
first; ``checkpoints.find_checkpoint`` falls back past the damaged ones. ``load_state`` reads a
``training_state.pt`` without running code where it can.
"""
import json
import pickle
from pathlib import Path

import numpy as np
import torch


def checkpoint_problem(path):
    """What makes checkpoint directory ``path`` unusable for ``--resume``, or None when it is complete.

    Checks, cheapest first: ``training_state.pt`` and model weights present; every JSON file
    (config, tokenizer, shard index) parses; every ``*.safetensors`` file is as long as its header
    says and every shard the index names is there; ``training_state.pt`` loads (memory-mapped: its
    tensors are not read).
    """
    path = Path(path)
    if not (path / "training_state.pt").is_file():
        return "training_state.pt is missing"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no model weights (*.safetensors)"
    for file in sorted(path.glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            return f"{file.name} is not valid JSON ({err})"
    index = path / "model.safetensors.index.json"
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else []:
        if not (path / shard).is_file():
            return f"{shard}, named in {index.name}, is missing"
    for file in weights:
        problem = safetensors_problem(file)
        if problem is not None:
            return f"{file.name}: {problem}"
    try:
        load_state(path / "training_state.pt", mmap=True)
    except Exception as err:  # a damaged zip/pickle raises anything from OSError to UnicodeDecodeError
        return f"training_state.pt does not load ({type(err).__name__}: {str(err)[:100]})"
    return None


def safetensors_problem(path):
    """Why ``path`` is not a complete safetensors file, or None: the 8-byte header length, the JSON
    header, and the file size ``8 + header + end of the last tensor``."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes, no header)"
        header_size = int.from_bytes(head, "little")
        if 8 + header_size > size:
            return f"truncated ({size} bytes, the header alone needs {8 + header_size})"
        try:
            header = json.loads(f.read(header_size))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            return f"unreadable header ({err})"
    if 8 + header_size + end != size:
        return f"{size} bytes where its header describes {8 + header_size + end}"
    return None


# Besides tensors and Python builtins, a training state holds NumPy's RNG state.
SAFE_GLOBALS = [np.ndarray, np.dtype, np.empty(0).__reduce__()[0], type(np.dtype(np.uint32))]


def load_state(path, mmap=False):
    """``torch.load`` a training state on the CPU, with ``weights_only=True`` (no code runs while
    it loads) when the state holds only tensors, builtins and NumPy's RNG state; states with
    other objects (a trainer's ``extra``) load as trusted pickles: they are this run's own files."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err) and "Weights only" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
