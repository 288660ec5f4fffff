"""The submission's process: run one exercise's checks on the student's file, write the outputs.

Started by the grader (``grade.py``) in a fresh temporary folder, one process per exercise::

    WORKDIR/minirlhf/        a copy of the package, the exercise's reference bodies blocked
    WORKDIR/submission/...   the one file of the submission this exercise needs
    WORKDIR/inputs/K.*       check K's inputs (safetensors + JSON), written by the grader
    WORKDIR/spec.json        exercise name, first check to run, CPU budget
    WORKDIR/results/         the only writable place: K.* (outputs or the error of check K),
                             import.* (the file did not import)

It runs each check's call (``execute``) and saves what came out; it compares nothing and scores
nothing. The grader reads the results as data and judges them in its own process. The CPU budget
(``--timeout``) starts before the submission's file is imported: an endless loop, at import or in
a call, is interrupted by a SIGPROF timer (and the process killed at its RLIMIT_CPU if a C call
does not return).
"""
import faulthandler
import importlib
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path


def main(workdir):
    workdir = Path(workdir)
    if os.environ.get("MINIRLHF_WORKER_LIMITS"):
        from minirlhf.homework.isolation import apply_limits

        apply_limits(json.loads(os.environ["MINIRLHF_WORKER_LIMITS"]))
    faulthandler.enable()  # a segfault leaves its traceback in the log the grader shows
    import torch

    torch.set_num_threads(1)
    from minirlhf.homework import transfer
    from minirlhf.homework.execute import ExerciseTimeout, describe, execute
    from minirlhf.homework.exercises import BY_NAME

    package = Path(importlib.import_module("minirlhf").__file__).resolve().parent
    if package.parent != workdir.resolve():  # never grade against another copy of minirlhf
        raise SystemExit(f"worker: minirlhf was imported from {package}, not from {workdir}")
    spec = json.loads((workdir / "spec.json").read_text(encoding="utf-8"))
    exercise = BY_NAME[spec["exercise"]]
    checks = exercise.checks()
    importlib.import_module(exercise.reference)  # warm imports (the blocked copy): not the student's time
    results = workdir / "results"
    submission = workdir / "submission"

    def origin(filename):
        try:
            return Path(filename).resolve().relative_to(submission.resolve()).as_posix()
        except ValueError:
            return None

    def ring(signum, frame):
        raise ExerciseTimeout(f"timed out: {exercise.name} used its {spec['budget']:g} s budget of CPU time "
                              "(an endless loop?)")

    signal.signal(signal.SIGPROF, ring)
    signal.setitimer(signal.ITIMER_PROF, max(spec["budget"], 0.01))
    start = time.process_time()
    try:
        namespace = Submission(_load(submission / exercise.file), exercise)
    except ExerciseTimeout as err:
        error = describe(err)
        error["message"] = f"{exercise.file} failed to import: {error['message']} at import time"
        transfer.save(results / "import", {"status": "timeout", "error": error})
        return
    except BaseException as err:  # noqa: BLE001 - whatever the file does at import is its failure
        error = describe(err, origin)
        error["message"] = f"{exercise.file} failed to import: {error['type']}: {error['message']}"
        error["type"] = "ImportError"
        transfer.save(results / "import", {"status": "error", "error": error})
        return
    for k in range(spec["first"], len(checks)):
        x = transfer.load(workdir / "inputs" / str(k))
        before = time.process_time()
        try:
            record = execute(checks[k], namespace, x, origin)
        except ExerciseTimeout as err:
            record = {"status": "timeout", "error": describe(err)}
        record["cpu_seconds"] = time.process_time() - before
        transfer.save(results / str(k), record)
        if record["status"] == "timeout":
            break
    signal.setitimer(signal.ITIMER_PROF, 0)
    transfer.save(results / "done", {"cpu_seconds": time.process_time() - start})


class Submission:
    """The student's functions by name; a missing one is an AttributeError that says where to put it."""

    def __init__(self, module, exercise):
        self._module, self._exercise = module, exercise

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(self._module, name)
        except AttributeError:
            raise AttributeError(f"{self._exercise.file} defines no function {name!r} (keep the names and the layout "
                                 "of exercises/)") from None


def _load(path):
    name = "submission_" + "_".join(path.with_suffix("").parts[-2:])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":  # pragma: no cover - started by the grader with the workdir first on sys.path
    main(os.path.abspath(sys.argv[1]))
