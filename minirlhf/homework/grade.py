"""Grade homework submissions: ``python -m minirlhf grade PATH [PATH ...]``.

A submission is a folder laid out like ``exercises/`` (``core/gae.py``, ``data/templates.py``,
``find_the_bug/...``). Each exercise in ``EXERCISES`` owns the tests marked
``@pytest.mark.exercise("<function>")`` for its functions; it earns its points when all of them
pass against the submission (``pytest --impl PATH``), and zero otherwise, with the first failing
check (expected vs got, from the test) and a hint.

How a submission is run. One worker subprocess (``python -m minirlhf.homework.grade --worker``)
runs pytest once over all exercise tests with a small plugin (``_GradePlugin``) that streams one
JSON line per test to a file: one interpreter start (~3-4 s of imports) for the whole grade, not
one per exercise. Isolation comes from three layers:

- the loader (``impl.py``) imports the submission's files lazily, one by one, so a file that does
  not import fails only the exercises whose functions it holds;
- inside the worker every test body runs under an interval timer that raises when its exercise
  has used its ``--timeout`` budget of CPU time (an endless Python loop is interrupted there);
- the parent watches the stream: if the worker hangs in C code or dies (segfault, ``os._exit``),
  it is killed, the exercise it was on scores zero with that message, and a fresh worker grades
  the exercises not yet graded.

Instructors: ``python -m minirlhf grade submissions/* --out grades/`` (or ``--all submissions``)
grades every folder, prints one line per student, and writes ``grades/<name>.json`` (the
``--json`` object) and ``grades/grades.csv`` (one row per student, one column per exercise).
"""
import argparse
import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from minirlhf.errors import MinirlhfError

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
SETUP_TIMEOUT = 120.0  # seconds a test's fixtures may take to build (they are not the student's code)


@dataclass(frozen=True)
class Exercise:
    name: str
    points: int
    functions: tuple  # the names in @pytest.mark.exercise(...) that this exercise's tests carry
    hint: str


EXERCISES = (
    Exercise("logprobs", 10, ("shift_for_next_token", "gather_logprobs", "sequence_logprobs"),
             "logits at position t predict input_ids[t+1]: drop the last logit and the first label/mask "
             "column; log p(label) = logit[label] - logsumexp(logits); sum over the response mask."),
    Exercise("masked", 6, ("masked_mean", "masked_whiten"),
             "divide by the number of valid elements (at least 1); whiten with the mean/variance of the "
             "valid elements only and write 0 where the mask is 0."),
    Exercise("aggregation", 5, ("aggregate_token_losses",),
             "sequence mean: mean over each row's valid tokens, then over rows; token mean: one mean over "
             "all valid tokens of the batch; fixed length: sum / (B * max_len)."),
    Exercise("bradley_terry", 8, ("bradley_terry_loss", "kwise_bradley_terry_loss"),
             "-log sigma(r_c - r_r - m) is softplus(r_r - r_c + m) (use F.logsigmoid, never log(sigmoid)); "
             "the K-wise loss averages over all C(K,2) ordered pairs of one prompt."),
    Exercise("dpo", 10, ("dpo_loss",),
             "h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)); sigmoid loss is "
             "-log sigma(beta h); the implicit rewards are beta * (log pi - log pi_ref), detached."),
    Exercise("simpo", 5, ("simpo_loss",),
             "SimPO has no reference model: -log sigma(beta * (avg log pi(y_w) - avg log pi(y_l)) - gamma), "
             "with length-averaged log-probs."),
    Exercise("kl", 8, ("kl_penalty", "kl_shaped_rewards"),
             "with d = log pi - log pi_ref: k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d (expm1); the shaped "
             "reward is -beta * kl_t at every response token plus the score at the LAST valid token."),
    Exercise("gae", 10, ("gae_advantages",),
             "loop t backwards: delta = r_t + gamma V_next - V_t, A_t = delta + gamma lam A_next; V and A "
             "after the last valid token are 0; skip masked positions, carrying V_next and A_next."),
    Exercise("ppo", 10, ("clipped_surrogate", "ppo_policy_loss", "ppo_value_loss"),
             "ratio = exp(logp - old_logp); loss = -min(ratio A, clip(ratio, 1-eps, 1+eps) A); value loss "
             "= 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), both aggregated over the mask."),
    Exercise("grpo", 8, ("group_advantages", "rloo_advantages", "grpo_loss"),
             "view rewards as [num_groups, G]; GRPO: (r - mean) / (std + eps) per group (scale=None: no "
             "division); RLOO: r_i - (sum - r_i) / (G - 1)."),
    Exercise("template", 5, ("homework_template",),
             "read the label with choice_field(record, 'preferred', ('a', 'b')) and the texts with "
             "text_field; chosen is the output the label names, rejected the other one."),
    Exercise("rm_end_score", 5, ("end_token_index",),
             "the score is read at the LAST token with attention_mask == 1 of each row, wherever the "
             "padding is (left or right): not at attention_mask.sum() - 1, not at the first pad."),
    Exercise("find_the_bug_shift", 3, ("find_the_bug_shift",),
             "which logit predicts which token? Compare against log_softmax(logits)[:, :-1] gathered at "
             "input_ids[:, 1:]."),
    Exercise("find_the_bug_kl", 3, ("find_the_bug_kl",),
             "k3 = (rho - 1) - log rho is unbiased only for the right rho: on a 3-token distribution, "
             "compare sum_y pi(y) k3(y) with KL(pi || pi_ref)."),
    Exercise("find_the_bug_end_token", 4, ("find_the_bug_end_token",),
             "try a right-padded batch whose tokenizer has pad_token_id == eos_token_id."),
)
ROLE_OF = {function: ex.name for ex in EXERCISES for function in ex.functions}


# ----------------------------------------------------------------------------- the parent side


def grade(path, timeout=60.0, exercises=EXERCISES, verbose=False):
    """Grade one submission folder; returns the ``--json`` object.

    ``{"total", "max", "exercises": [{"name", "passed", "points", "max_points", "message"}]}``.
    """
    root = Path(path)
    if not root.is_dir():
        raise MinirlhfError(f"grade {path}: no such folder (a submission is a folder laid out like exercises/)")
    outcomes = {}  # exercise name -> (passed, message)
    pending = [ex.name for ex in exercises]
    with tempfile.TemporaryDirectory(prefix="minirlhf-grade-") as tmp:
        for attempt in range(len(pending) + 1):
            if not pending:
                break
            events = _run_worker(root.resolve(), pending, timeout, Path(tmp) / f"events{attempt}.jsonl", verbose)
            graded = _score_events(events, pending, outcomes)
            if not graded:  # no progress: blame all that is left rather than loop
                crash = events[-1].get("message", "the grading process failed") if events else "no result"
                for name in pending:
                    outcomes[name] = (False, crash)
            pending = [name for name in pending if name not in outcomes]
    rows = [
        {
            "name": ex.name,
            "passed": outcomes[ex.name][0],
            "points": ex.points if outcomes[ex.name][0] else 0,
            "max_points": ex.points,
            "message": outcomes[ex.name][1],
        }
        for ex in exercises
    ]
    return {"total": sum(r["points"] for r in rows), "max": sum(ex.points for ex in exercises), "exercises": rows}


def _run_worker(root, names, timeout, events_file, verbose):
    """Run one worker on ``names``; return its events, plus a final one if it had to be stopped."""
    spec = {"impl": str(root), "exercises": names, "timeout": timeout, "events": str(events_file)}
    command = [sys.executable, "-m", "minirlhf.homework.grade", "--worker", json.dumps(spec)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    events_file.touch()
    log = sys.stderr if verbose else subprocess.DEVNULL  # never stdout: it may be carrying --json
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
    # The in-process timer stops Python code once it has used its CPU budget; this wall-clock
    # watchdog only catches what that cannot (a hang in native code, a sleep, a dead lock) or a
    # worker that never gets to its tests. It is generous: on a busy machine wall time runs ahead
    # of CPU time.
    grace = 30.0 + 2.0 * timeout
    deadline = time.time() + 120.0 + timeout  # interpreter start, imports, collection
    first_call = {}  # exercise -> when its first test body started
    current, stopped, seen = None, None, 0
    while process.poll() is None:
        time.sleep(0.05)
        events = _read_events(events_file)
        for event in events[seen:]:
            kind = event["event"]
            if kind == "setup":
                current, deadline = event["exercise"], event["time"] + max(SETUP_TIMEOUT, timeout) + grace
            elif kind == "call":
                current = event["exercise"]
                deadline = first_call.setdefault(current, event["time"]) + timeout + grace
            elif kind in ("collected", "result", "exercise_done"):
                deadline = event["time"] + 120.0  # between tests: nothing slow should happen
                if kind == "exercise_done":
                    current = None  # a crash from here on is not this exercise's fault
        seen = len(events)
        if time.time() > deadline:
            stopped = (f"timed out: {current} ran past its {timeout:g} s budget and could not be interrupted"
                       if current else "the grading process did not reach the tests (a hang while importing?)")
            process.kill()
            process.wait()
            break
    events = _read_events(events_file)
    if not any(e["event"] == "finished" for e in events):
        message = stopped or f"the grading process died (exit status {process.returncode}) while running this exercise"
        events.append({"event": "crashed", "exercise": current, "message": message})
    return events


def _read_events(events_file):
    events = []
    with open(events_file, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):  # a line still being written is read next time
                events.append(json.loads(line))
    return events


def _score_events(events, pending, outcomes):
    """Fold one worker's events into ``outcomes``; return the names it settled."""
    error = next((e["message"] for e in events if e["event"] == "error"), None)
    if error:  # the tests themselves are broken: that is no student's fault, so give no grade
        raise MinirlhfError(f"the grader could not run the exercise tests:\n{error}")
    collected = next((e["counts"] for e in events if e["event"] == "collected"), None)
    if collected is None:
        return []
    failures, finished = {}, set()
    for event in events:
        if event["event"] == "result" and event["outcome"] == "failed":
            failures.setdefault(event["exercise"], event["message"])
        elif event["event"] == "exercise_done":
            finished.add(event["exercise"])
        elif event["event"] == "crashed" and event["exercise"] is not None:
            failures.setdefault(event["exercise"], event["message"])
            finished.add(event["exercise"])
    settled = []
    for name in pending:
        if collected.get(name, 0) == 0:
            outcomes[name] = (False, f"no tests marked @pytest.mark.exercise for {name!r} were found (grader setup)")
        elif name in finished:
            ran = any(e["event"] == "result" and e["exercise"] == name and e["outcome"] == "passed" for e in events)
            if name in failures:
                outcomes[name] = (False, failures[name])
            elif ran:
                outcomes[name] = (True, "all checks passed")
            else:
                outcomes[name] = (False, "every test of this exercise was skipped")
        else:
            continue
        settled.append(name)
    return settled


# ----------------------------------------------------------------------------- the worker side


class ExerciseTimeout(Exception):
    """Raised inside a test when its exercise has used up its time budget."""


class _GradePlugin:
    """Streams one JSON line per test event; enforces each exercise's CPU-time budget."""

    def __init__(self, spec):
        self.names = spec["exercises"]
        self.timeout = float(spec["timeout"])
        self.events = open(spec["events"], "a", encoding="utf-8")
        self.impl_root = spec["impl"]
        self.used = {}  # exercise -> seconds used so far
        self.left = {}  # exercise -> tests not yet reported

    def emit(self, **event):
        self.events.write(json.dumps(dict(event, time=time.time())) + "\n")
        self.events.flush()

    def pytest_collection_modifyitems(self, session, config, items):
        order = {name: i for i, name in enumerate(self.names)}
        keep, drop = [], []
        for item in items:
            name = _exercise_of(item)
            (keep if name in order else drop).append(item)
        keep.sort(key=lambda item: order[_exercise_of(item)])  # stable: file order within an exercise
        items[:] = keep
        if drop:
            config.hook.pytest_deselected(items=drop)
        for item in keep:
            self.left[_exercise_of(item)] = self.left.get(_exercise_of(item), 0) + 1
        self.emit(event="collected", counts=dict(self.left))

    def pytest_collectreport(self, report):
        if report.failed:
            self.emit(event="error", message=str(report.longrepr)[-3000:])

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item):
        # Fixtures (tiny models, tokenizers) are the grader's, not the student's: their own limit.
        name = _exercise_of(item)
        self.emit(event="setup", exercise=name, test=item.nodeid)
        with _alarm(max(SETUP_TIMEOUT, self.timeout), f"timed out: setting up {item.name} took too long"):
            return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        name = _exercise_of(item)
        self.emit(event="call", exercise=name, test=item.nodeid)
        left = self.timeout - self.used.get(name, 0.0)
        message = f"timed out: {name} used its {self.timeout:g} s budget of CPU time (an endless loop?)"
        if left <= 0:
            raise ExerciseTimeout(message)
        start = time.process_time()
        try:
            with _alarm(left, message, cpu=True):
                return (yield)
        finally:
            self.used[name] = self.used.get(name, 0.0) + time.process_time() - start

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        name = _exercise_of(item)
        if report.failed:
            message = _failure_message(item, call, self.impl_root)
            self.emit(event="result", exercise=name, test=item.nodeid, outcome="failed", message=message)
        elif report.when == "call" or report.skipped:
            outcome = "skipped" if report.skipped else "passed"
            self.emit(event="result", exercise=name, test=item.nodeid, outcome=outcome, message="")
        if report.when == "teardown":
            self.left[name] -= 1
            if self.left[name] == 0:
                self.emit(event="exercise_done", exercise=name, cpu_seconds=round(self.used.get(name, 0.0), 3))
        return report

    def pytest_sessionfinish(self, session, exitstatus):
        self.emit(event="finished", status=int(exitstatus))


@contextlib.contextmanager
def _alarm(seconds, message, cpu=False):
    """Raise ``ExerciseTimeout(message)`` in this thread once the block has used ``seconds``.

    ``cpu=True`` counts the process's CPU time (``ITIMER_PROF``) instead of wall-clock time, so a
    budget means the same on a busy machine as on an idle one; an endless loop burns CPU and is
    caught either way (a process that sleeps forever is the parent's watchdog's job).
    """
    timer, signum = (signal.ITIMER_PROF, signal.SIGPROF) if cpu else (signal.ITIMER_REAL, signal.SIGALRM)

    def ring(signum, frame):
        raise ExerciseTimeout(message)

    previous = signal.signal(signum, ring)
    signal.setitimer(timer, seconds)
    try:
        yield
    finally:
        signal.setitimer(timer, 0)
        signal.signal(signum, previous)


def _exercise_of(item):
    marker = item.get_closest_marker("exercise")
    function = marker.args[0] if marker and marker.args else None
    return ROLE_OF.get(function)


def _failure_message(item, call, impl_root):
    """``test name: the error`` (a few lines), and where in the submission it was raised."""
    test = item.nodeid.split("::", 1)[-1]
    excinfo = call.excinfo
    if excinfo is None:
        return f"{test}: failed"
    lines = [line[:200] for line in excinfo.exconly().strip().splitlines() if line.strip()]
    if len(lines) > 1 and not lines[0].startswith("AssertionError: assert "):
        # A test's own message says what was expected; drop pytest's "assert ... where ..." echo.
        cut = next((i for i, line in enumerate(lines) if line.startswith("assert ")), len(lines))
        lines = lines[:cut]
    text = "\n".join(lines[:6] + (["..."] if len(lines) > 6 else []))
    where = ""
    for entry in reversed(excinfo.traceback):
        path = str(entry.path)
        if path.startswith(impl_root + os.sep):
            where = f" [at {Path(path).relative_to(impl_root)}:{entry.lineno + 1}]"
            break
    return f"{test}: {text}{where}"


def _worker(spec_json):
    spec = json.loads(spec_json)
    files = sorted(str(f) for f in TESTS.glob("test_*.py") if "mark.exercise" in f.read_text(encoding="utf-8"))
    args = [*files, "--impl", spec["impl"], "-m", "exercise", "-q", "--no-header", "-p", "no:cacheprovider",
            "-o", "addopts=", "--rootdir", str(REPO), "-W", "ignore::DeprecationWarning"]
    plugin = _GradePlugin(spec)
    status = pytest.main(args, plugins=[plugin])
    if status in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.USAGE_ERROR):
        plugin.emit(event="error", message=f"pytest exited with status {int(status)} ({status.name})")
    return 0


# ----------------------------------------------------------------------------- output and CLI


def format_table(result, label):
    """The human-readable report: one line per exercise, and for a failure its message and hint."""
    width = max(len(row["name"]) for row in result["exercises"])
    indent = " " * (width + 6)
    hints = {ex.name: ex.hint for ex in EXERCISES}
    lines = [f"Grading {label}", ""]
    for row in result["exercises"]:
        status = "pass" if row["passed"] else "FAIL"
        lines.append(f"  {row['name']:<{width}}  {row['points']:>3} / {row['max_points']:<3} {status}")
        if not row["passed"]:
            lines += [indent + line for line in row["message"].splitlines()]
            lines += textwrap.wrap(f"hint: {hints[row['name']]}", 100, initial_indent=indent,
                                   subsequent_indent=indent + "      ")
    lines += ["", f"  {'total':<{width}}  {result['total']:>3} / {result['max']}"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m minirlhf grade",
        description="Grade homework submission folders (laid out like exercises/).",
        epilog="examples: python -m minirlhf grade my_homework; "
        "python -m minirlhf grade --all submissions --out grades",
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="submission folder(s)")
    parser.add_argument("--all", metavar="DIR", help="grade every folder inside DIR (one per student)")
    parser.add_argument("--json", action="store_true",
                        help="print the result as JSON (one object per line for several)")
    parser.add_argument("--out", metavar="DIR", help="write DIR/<submission>.json for each and DIR/grades.csv")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="CPU seconds each exercise may use, summed over its tests (default 60)")
    parser.add_argument("--jobs", type=int, default=1, help="grade this many submissions at once (default 1)")
    parser.add_argument("--exercise", action="append", metavar="NAME",
                        help="grade only this exercise (repeatable): " + ", ".join(ex.name for ex in EXERCISES))
    parser.add_argument("--verbose", action="store_true", help="show the test run's own output")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker)

    paths = list(args.paths)
    if args.all:
        folder = Path(args.all)
        if not folder.is_dir():
            raise MinirlhfError(f"--all {args.all}: no such folder")
        paths += sorted(str(p) for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not paths:
        parser.error("give a submission folder (PATH) or --all DIR")
    chosen = EXERCISES
    if args.exercise:
        unknown = sorted(set(args.exercise) - {ex.name for ex in EXERCISES})
        if unknown:
            raise MinirlhfError(f"--exercise {', '.join(unknown)}: no such exercise; known: "
                                + ", ".join(ex.name for ex in EXERCISES))
        chosen = tuple(ex for ex in EXERCISES if ex.name in args.exercise)
    for path in paths:
        if not Path(path).is_dir():
            raise MinirlhfError(f"grade {path}: no such folder (a submission is a folder laid out like exercises/)")
    names = [_student(path) for path in paths]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:  # the folder name is the student's name in --out and in the summary
        raise MinirlhfError(f"several submission folders are named {', '.join(clashes)}; give them distinct names")

    def one(path):
        return grade(path, timeout=args.timeout, exercises=chosen, verbose=args.verbose)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = dict(zip(paths, pool.map(one, paths)))

    if args.out:
        _write_grades(Path(args.out), results, chosen)
    for path, result in results.items():
        if args.json:
            print(json.dumps(result if len(paths) == 1 else dict(submission=_student(path), **result)))
        elif len(paths) == 1:
            print(format_table(result, path))
        else:
            print(f"{_student(path):<30} {result['total']:>4} / {result['max']}")
    return 0


def _student(path):
    return Path(path).resolve().name


def _write_grades(out, results, exercises):
    out.mkdir(parents=True, exist_ok=True)
    for path, result in results.items():
        (out / f"{_student(path)}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    with open(out / "grades.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["submission", "total", "max", *(ex.name for ex in exercises)])
        for path, result in results.items():
            points = [row["points"] for row in result["exercises"]]
            writer.writerow([_student(path), result["total"], result["max"], *points])


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MinirlhfError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
