"""What crosses between the grader and a submission's process: plain tensors and JSON, nothing else.

``save(stem, values)`` writes ``stem.safetensors`` (every tensor) and then ``stem.json`` (the rest,
with references to the tensors), each atomically, so a reader that sees the JSON sees a complete
pair. ``load`` parses both with the safetensors and json parsers: nothing is unpickled, so a file
written by a submission can hold only numbers and strings, never code. Values: tensors, None,
bools, numbers, strings, and lists and dicts of them (``minirlhf.homework.execute.plain``).
"""
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MAX_BYTES = 256 * 2**20  # a result file larger than this is refused, not read


def save(stem, values):
    stem = Path(stem)
    tensors = {}
    encoded = _encode(values, tensors)
    _atomic(stem.with_suffix(".safetensors"), lambda path: save_file(tensors, str(path)))
    _atomic(stem.with_suffix(".json"), lambda path: path.write_text(json.dumps(encoded), encoding="utf-8"))


def load(stem):
    """The values saved at ``stem``; raises ValueError for a missing, oversized or malformed pair."""
    stem = Path(stem)
    pieces = {}
    for suffix in (".json", ".safetensors"):
        path = stem.with_suffix(suffix)
        if not path.is_file() or path.is_symlink():
            raise ValueError(f"{path.name}: missing")
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"{path.name}: {path.stat().st_size} bytes, over the {MAX_BYTES} allowed")
        pieces[suffix] = path
    try:
        encoded = json.loads(pieces[".json"].read_text(encoding="utf-8"))
        tensors = load_file(str(pieces[".safetensors"]))
        return _decode(encoded, tensors)
    except (ValueError, KeyError, TypeError, RecursionError, OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{stem.name}: malformed ({type(err).__name__}: {err})") from None
    except Exception as err:  # safetensors' own parse errors
        raise ValueError(f"{stem.name}: malformed ({type(err).__name__}: {err})") from None


def exists(stem):
    return Path(stem).with_suffix(".json").is_file()


def _encode(value, tensors):
    if torch.is_tensor(value):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": {str(k): _encode(v, tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot transfer a {type(value).__name__}")


def _decode(value, tensors):
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__dict__"} and isinstance(value["__dict__"], dict):
            return {k: _decode(v, tensors) for k, v in value["__dict__"].items()}
        raise ValueError("unexpected object")
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"unexpected {type(value).__name__}")


def _atomic(path, write):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)
