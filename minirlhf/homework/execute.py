"""Run one check's call on a submission and turn what it returns (or raises) into plain data.

The same code runs in the grader's worker process (``worker.py``) and in the in-process paths
(``grade --in-process`` and pytest's ``compare.run_in_process``: the students' debugging paths), so
a check means the same in all of them.
"""
import traceback

import torch

TRACEBACK_FRAMES = 30  # a runaway recursion's traceback is cut to its last frames


class ExerciseTimeout(BaseException):
    """The exercise used up its CPU-time budget. A ``BaseException``, so that a submission's
    ``except Exception`` cannot swallow it."""


def execute(check, f, x, origin=None):
    """``{"status": "ok", "outputs": ...}`` or ``{"status": "error", "error": {...}}``.

    ``origin(path) -> str | None`` names a traceback frame that lies in the submission (e.g.
    ``core/gae.py:31``), so an error says where the student's code raised it.
    """
    try:
        outputs = check.run(f, x)
    except ExerciseTimeout:
        raise
    except BaseException as err:  # noqa: BLE001 - SystemExit and friends are the submission's failure too
        if isinstance(err, KeyboardInterrupt):
            raise
        return {"status": "error", "error": describe(err, origin)}
    return {"status": "ok", "outputs": plain(outputs)}


def describe(err, origin=None):
    """An exception as data: its type and base types (for ``raises``), message, where, and the
    traceback from the check's call down (this module's frame left out; the last ``TRACEBACK_FRAMES``
    frames), which the in-process paths print."""
    frames = [frame for frame in traceback.extract_tb(err.__traceback__) if frame.filename != __file__]
    where = None
    if origin is not None:
        for frame in reversed(frames):
            label = origin(frame.filename)
            if label:
                where = f"{label}:{frame.lineno}"
                break
    message = _cut(str(err))
    shown = traceback.format_list(frames[-TRACEBACK_FRAMES:])
    return {
        "type": type(err).__name__,
        "types": [cls.__name__ for cls in type(err).__mro__],
        "message": message,
        "where": where,
        "traceback": "Traceback (most recent call last):\n" + "".join(shown) + f"{type(err).__name__}: {message}",
    }


def _cut(text, limit=2000):
    return text if len(text) < limit else text[:limit] + " ..."


def plain(value):
    """Tensors detached and copied; dicts, lists and JSON scalars kept; anything else described."""
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str, type(None))) for v in value):
        return list(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:  # a numpy array or scalar: the same numbers as a tensor
        import numpy

        if isinstance(value, (numpy.ndarray, numpy.generic)):
            return torch.as_tensor(numpy.asarray(value))
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return {"__type__": type(value).__name__, "__repr__": repr(value)[:200]}


def clone(x):
    """A copy of the inputs that a call may mutate (``requires_grad_``, in-place ops)."""
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clone(v) for v in x]
    return x
