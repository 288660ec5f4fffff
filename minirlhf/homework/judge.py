"""The trusted side of grading: the submission computes, this process judges.

For every (submission, exercise) pair ``Judge.grade_exercise``:

1. writes a fresh temporary folder (``worker.py`` describes it): a copy of minirlhf with the
   exercise's reference bodies blocked (``delegation.py``), the submission's one file for this
   exercise, and the checks' inputs, built here once per exercise;
2. starts one fresh worker process there, in the sandbox (``isolation.py``) with its limits;
3. reads back only plain tensors and JSON (``transfer.py``), computes the expected outputs itself
   (brute force, analytic gradients, or the reference on the same inputs, cached) and compares
   (``compare.py``); the submission is never imported here;
4. scores the exercise by its checks.

Everything the judge uses is read before any worker starts: the package (checks, references) is
imported and its source snapshotted at start; each submission's files are snapshotted too, so a
submission cannot change what a later exercise or a later student is graded on. Without a
sandbox the judge also re-hashes its own tree after each exercise and restores it if a submission
wrote into it (that exercise then scores 0).
"""
import importlib
import json
import shutil
import time
import tempfile
import threading
from pathlib import Path

import minirlhf
from minirlhf.homework import isolation, transfer
from minirlhf.homework.compare import judge as judge_check
from minirlhf.homework.delegation import blocked_source
from minirlhf.homework.execute import clone

PACKAGE = Path(minirlhf.__file__).resolve().parent
REPO = PACKAGE.parent
GUARDED = ("tests", "exercises", "solutions", "notebooks")  # the grader's tree, besides the package
RESTARTS = 1  # a worker that dies mid-exercise is restarted once for the checks it did not reach


class Judge:
    def __init__(self, exercises, timeout=60.0, sandbox="auto", scratch=None):
        self.exercises, self.timeout = exercises, float(timeout)
        self.level = isolation.choose(sandbox)
        self.scratch = Path(scratch or tempfile.mkdtemp(prefix="minirlhf-grade-"))
        self._lock = threading.Lock()
        self._inputs, self._blocked, self._memo = {}, {}, {}
        self.started = time.time()
        self.package_files = _snapshot(PACKAGE)
        self.guarded = {name: _snapshot(REPO / name) for name in GUARDED if (REPO / name).is_dir()}
        self.hidden = _hidden_paths()
        for exercise in exercises:  # import every check module and reference now, before any worker runs
            exercise.checks()
            importlib.import_module(exercise.reference)

    def snapshot_submission(self, root):
        """``{exercise file: bytes or None}`` of a submission folder, read once, before grading."""
        root = Path(root)
        files = {}
        for exercise in self.exercises:
            path = root / exercise.file
            files[exercise.file] = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        return files

    def grade_exercise(self, label, files, exercise):
        """``{"checks": [(name, passed, failures)], "cpu_seconds", "note"}`` for one exercise."""
        checks = exercise.checks()
        source = files.get(exercise.file)
        if source is None:
            message = f"{exercise.file} is missing (keep the file names and the layout of exercises/)"
            return {"checks": [(c.name, False, [message]) for c in checks], "cpu_seconds": 0.0, "note": None}
        records, first, cpu, note = {}, 0, 0.0, None
        for attempt in range(RESTARTS + 1):
            workdir = self._prepare(label, exercise, source, first, attempt, self.timeout - cpu)
            code, used, stopped = isolation.run(isolation.command(self.level, workdir, self.hidden,
                                                                  isolation.worker_argv(workdir)),
                                                workdir, self.timeout - cpu, workdir / "worker.log")
            got, import_failure = _read_results(workdir, first, len(checks))
            records.update(got)
            cpu += sum(r.get("cpu_seconds", 0.0) for r in got.values())
            if self.level == "none":
                note = note or self._restore_tree()
            if import_failure is not None:
                records.update({k: import_failure for k in range(first, len(checks))})
                break
            if transfer.exists(workdir / "results" / "done") or len(records) == len(checks):
                break
            # The process ended without finishing: blame the check it was on, then maybe go on.
            reason = stopped or isolation.exit_reason(code)
            crashed = next(k for k in range(len(checks)) if k not in records)
            records[crashed] = {"status": "crashed", "error": {
                "message": f"the process running this check died ({reason}){_log_tail(workdir)}"}}
            timed_out = stopped or "SIGXCPU" in reason or cpu >= self.timeout
            if timed_out or attempt == RESTARTS or crashed + 1 == len(checks):
                for k in range(crashed + 1, len(checks)):
                    records[k] = {"status": "skipped", "error": {"message": "not run: the exercise's process died earlier"}}
                break
            first = crashed + 1
        reference = importlib.import_module(exercise.reference)
        results = []
        for k, check in enumerate(checks):
            record = records.get(k) or {"status": "skipped", "error": {"message": _skipped_reason(records, k)}}
            failures = judge_check(check, self._check_inputs(exercise, k), record, reference, self._memo)
            results.append((check.name, not failures and note is None, failures or ([note] if note else [])))
        return {"checks": results, "cpu_seconds": round(cpu, 2), "note": note}

    # ------------------------------------------------------------------ preparing a worker

    def _prepare(self, label, exercise, source, first, attempt, budget):
        workdir = Path(tempfile.mkdtemp(prefix=f"{_safe(label)}-{exercise.name}-{attempt}-", dir=self.scratch))
        for rel, data in self._blocked_package(exercise).items():
            target = workdir / "minirlhf" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        target = workdir / "submission" / exercise.file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source)
        (workdir / "inputs").mkdir()
        for name, data in self._serialized_inputs(exercise).items():
            (workdir / "inputs" / name).write_bytes(data)
        (workdir / "results").mkdir()
        transfer_spec = {"exercise": exercise.name, "first": first, "budget": max(budget, 0.01)}
        (workdir / "spec.json").write_text(json.dumps(transfer_spec), encoding="utf-8")
        return workdir

    def _blocked_package(self, exercise):
        with self._lock:
            if exercise.name not in self._blocked:
                files = dict(self.package_files)
                for module, names in ((exercise.reference, exercise.blocked), *exercise.elsewhere):
                    module_file = module.split(".", 1)[1].replace(".", "/") + ".py"
                    files[module_file] = blocked_source(files[module_file].decode("utf-8"), names,
                                                        exercise.name).encode("utf-8")
                self._blocked[exercise.name] = files
            return self._blocked[exercise.name]

    def _serialized_inputs(self, exercise):
        """The inputs of every check of ``exercise`` as files (built and written once)."""
        with self._lock:
            key = ("files", exercise.name)
            if key not in self._inputs:
                folder = self.scratch / "inputs" / exercise.name
                folder.mkdir(parents=True, exist_ok=True)
                for k, check in enumerate(exercise.checks()):
                    transfer.save(folder / str(k), self._build_inputs(exercise, k, check))
                self._inputs[key] = {p.name: p.read_bytes() for p in folder.iterdir()}
            return self._inputs[key]

    def _check_inputs(self, exercise, k):
        with self._lock:
            return clone(self._build_inputs(exercise, k, exercise.checks()[k]))

    def _build_inputs(self, exercise, k, check):
        key = (exercise.name, k)
        if key not in self._inputs:
            self._inputs[key] = check.inputs()
        return self._inputs[key]

    # ------------------------------------------------------------------ the grader's own files

    def _restore_tree(self):
        """Without a sandbox: put back any file of the grader's tree a submission changed."""
        changed = _restore(PACKAGE, self.package_files, self.started)
        for name, files in self.guarded.items():
            changed += [f"{name}/{p}" for p in _restore(REPO / name, files, self.started)]
        if changed:
            shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
            return f"the submission changed the grader's files ({shown}): restored; this exercise scores 0"
        return None

    def close(self):
        shutil.rmtree(self.scratch, ignore_errors=True)


def _read_results(workdir, first, count):
    results, got = workdir / "results", {}
    if transfer.exists(results / "import"):
        try:
            record = _sanitized(transfer.load(results / "import"))
        except ValueError as err:
            record = {"status": "error", "error": {"type": "Error", "message": f"unreadable result: {err}"}}
        return got, record
    for k in range(first, count):
        if not transfer.exists(results / str(k)):
            break
        try:
            got[k] = _sanitized(transfer.load(results / str(k)))
        except ValueError as err:
            got[k] = {"status": "error", "error": {"type": "Error", "message": f"unreadable result: {err}"}}
    return got, None


def _sanitized(record):
    """A worker's record as the judge reads it: the expected keys and types, or "malformed"."""
    malformed = {"status": "error", "error": {"type": "Error", "message": "malformed result"}}
    if not isinstance(record, dict) or record.get("status") not in ("ok", "error", "timeout"):
        return malformed
    error = record.get("error")
    if record["status"] != "ok":
        if not isinstance(error, dict):
            return malformed
        types = error.get("types") if isinstance(error.get("types"), list) else []
        record["error"] = {"type": str(error.get("type", "Error"))[:100],
                           "message": str(error.get("message", ""))[:2000],
                           "where": str(error["where"])[:200] if error.get("where") else None,
                           "types": [str(t)[:100] for t in types[:50]]}
    elif not isinstance(record.get("outputs"), dict):
        return malformed
    cpu = record.get("cpu_seconds")
    record["cpu_seconds"] = max(0.0, float(cpu)) if isinstance(cpu, (int, float)) and not isinstance(cpu, bool) else 0.0
    return record


def _skipped_reason(records, k):
    if any(r.get("status") == "timeout" for r in records.values()):
        return "not run: the exercise's CPU-time budget was used up by an earlier check"
    return "not run"


def _log_tail(workdir, lines=4):
    try:
        text = (workdir / "worker.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    keep = [line for line in text if "submission" in line or "Fatal" in line or "Error" in line][-lines:]
    return ("; log: " + " | ".join(line.strip()[:160] for line in keep)) if keep else ""


def _snapshot(root):
    """``{relative path: bytes}`` of the regular files under ``root`` (no caches)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")}


def _restore(root, files, since):
    """Rewrite changed files, recreate deleted ones, remove files added since ``since``; returns
    the paths fixed."""
    fixed = []
    for rel, data in files.items():
        path = root / rel
        if path.is_symlink() or not path.is_file() or path.read_bytes() != data:
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            fixed.append(rel)
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel in files or "__pycache__" in path.parts or rel.endswith(".pyc"):
            continue
        if (path.is_symlink() or path.is_file()) and path.lstat().st_mtime >= since:
            path.unlink()
            fixed.append(rel)
    return fixed


def _hidden_paths():
    """Folders the sandbox hides: every minirlhf a worker could import by path, and solutions/."""
    import subprocess
    import sys

    paths = {PACKAGE}
    probe = subprocess.run([sys.executable, "-I", "-c", "import importlib.util as u; s = u.find_spec('minirlhf'); "
                            "print(s.origin if s else '')"], capture_output=True, text=True, cwd="/")
    if probe.stdout.strip():
        paths.add(Path(probe.stdout.strip()).resolve().parent)
    for root in {p.parent for p in paths}:
        if (root / "solutions").is_dir():
            paths.add(root / "solutions")
    return sorted(paths)


def _safe(label):
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(label))[:40] or "submission"
