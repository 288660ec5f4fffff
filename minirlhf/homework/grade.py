"""Grade homework submissions: ``python -m minirlhf grade PATH [PATH ...]`` or ``--all DIR``.

A submission is a folder laid out like ``exercises/``. Each exercise (``exercises.py``) is scored
by its checks (``checks/<exercise>.py``): ``points = max_points · passed / checks``, rounded to
one decimal; the total is the sum. Every failing check is listed with what differs, and the
exercise's hints come in stages (``--explain`` once or twice shows more, the formula last).

How it runs (``judge.py``): one fresh worker process per (submission, exercise), in a temporary
folder outside this tree, sandboxed where the platform allows (``isolation.py``), with a CPU-time
budget (``--timeout``) and a wall-clock watchdog; it hands back plain tensors and JSON, and this
process, which never imports a submission, judges them. ``--in-process`` (``grade_in_process``) is
the students' debugging path instead: the same checks, points and messages, run in this process on
the folder's files, with each error's traceback and ``breakpoint()`` working; no sandbox, no time
limit, no grade. It needs only the installed package, so it works from the handout.

    python -m minirlhf grade my_homework                     # the student's view: table + hints
    python -m minirlhf grade my_homework --exercise gae      # one exercise
    python -m minirlhf grade my_homework --in-process        # debugging: in this process, with tracebacks
    python -m minirlhf grade --all submissions --out grades  # grades/<student>.json + grades.csv
    python -m minirlhf grade submissions/alice --json        # for course tooling
"""
import argparse
import csv
import importlib
import json
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from minirlhf.errors import MinirlhfError
from minirlhf.homework import isolation
from minirlhf.homework.compare import check_in_process
from minirlhf.homework.exercises import BY_NAME, EXERCISES
from minirlhf.homework.impl import load_implementation

IN_PROCESS = "in-process"
DESCRIPTIONS = {**isolation.DESCRIPTIONS, IN_PROCESS: (
    "none: checked in this process, for debugging (no sandbox, no time limit, calls to minirlhf's own version "
    "of a graded function not blocked); your grade is what `python -m minirlhf grade` without --in-process says")}


def grade(paths, exercises=EXERCISES, timeout=60.0, jobs=1, sandbox="auto"):
    """Grade submission folders; returns ``{path: the --json object}``.

    The object is ``{"total", "max", "isolation", "exercises": [row, ...]}`` with one row per
    exercise: ``name``, ``passed`` (every check passed), ``points``, ``max_points``,
    ``checks_passed``, ``checks_total``, ``message`` (one line), ``failures`` (``[{"check",
    "messages"}]``, every failing check) and ``cpu_seconds``.
    """
    from minirlhf.homework.judge import Judge

    for path in paths:
        if not Path(path).is_dir():
            raise MinirlhfError(f"grade {path}: no such folder (a submission is a folder laid out like exercises/)")
    judge = Judge(exercises, timeout=timeout, sandbox=sandbox)
    try:
        files = {path: judge.snapshot_submission(path) for path in paths}  # read once, before any worker runs
        tasks = [(path, exercise) for path in paths for exercise in exercises]
        workers = 1 if judge.level == "none" else max(1, jobs)  # unsandboxed: one at a time, so a change is attributable

        def one(task):
            path, exercise = task
            return judge.grade_exercise(_student(path), files[path], exercise)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            outcomes = dict(zip(tasks, pool.map(one, tasks)))
    finally:
        judge.close()
    results = {}
    for path in paths:
        rows = [score(exercise, outcomes[(path, exercise)]) for exercise in exercises]
        results[path] = {"total": round(sum(r["points"] for r in rows), 1), "max": sum(ex.points for ex in exercises),
                         "isolation": judge.level, "exercises": rows}
    return results


def grade_in_process(path, exercises=EXERCISES):
    """``grade``'s object for one folder, with every check run in this process (the students'
    debugging path): each failure that raised also carries ``"traceback"``, from the check's call
    down to the line of the submission that raised. Not isolated: one exercise's side effects
    (``torch.set_default_dtype``) reach the next, an endless loop runs until Ctrl-C, and a function
    that calls minirlhf's own version passes here (``grade`` scores it 0)."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise MinirlhfError(f"grade {path}: no such folder (a submission is a folder laid out like exercises/)")
    implementation = load_implementation(root)

    def origin(filename):
        try:
            return Path(filename).resolve().relative_to(root).as_posix()
        except ValueError:
            return None

    rows = []
    for exercise in exercises:
        functions = implementation.find_the_bug if exercise.file.startswith("find_the_bug/") else implementation
        reference = importlib.import_module(exercise.reference)
        start, checks, traces = time.process_time(), [], []
        for check in exercise.checks():
            failures, trace = check_in_process(check, functions, reference, origin)
            checks.append((check.name, not failures, failures))
            if failures:
                traces.append(trace)
        row = score(exercise, {"checks": checks, "cpu_seconds": round(time.process_time() - start, 2)})
        for failure, trace in zip(row["failures"], traces):
            if trace:
                failure["traceback"] = trace
        rows.append(row)
    return {"total": round(sum(r["points"] for r in rows), 1), "max": sum(ex.points for ex in exercises),
            "isolation": IN_PROCESS, "exercises": rows}


def score(exercise, outcome):
    """One exercise's row: points pro rata of the checks passed, and every failure."""
    checks = outcome["checks"]
    passed = sum(1 for _, ok, _ in checks if ok)
    failures = [{"check": name, "messages": messages} for name, ok, messages in checks if not ok]
    return {
        "name": exercise.name, "passed": passed == len(checks),
        "points": round(exercise.points * passed / len(checks), 1), "max_points": exercise.points,
        "checks_passed": passed, "checks_total": len(checks), "message": _summary(passed, len(checks), failures),
        "failures": failures, "cpu_seconds": outcome["cpu_seconds"],
    }


def _summary(passed, total, failures):
    if not failures:
        return f"all {total} checks passed"
    firsts = {f["messages"][0].splitlines()[0] if f["messages"] else "" for f in failures}
    if len(failures) > 1 and len(firsts) == 1:
        return f"{passed}/{total} checks passed; every failing check: {firsts.pop()}"
    first = failures[0]
    return f"{passed}/{total} checks passed; first failure: {first['check']}: {first['messages'][0].splitlines()[0]}"


def _failure_details(result):
    """``--in-process``'s account of the failures, as pytest would show it: each failing check in full
    (every message, the check's hint, the traceback of what it raised). Checks that raised the very
    same error (e.g. a NotImplementedError: not written yet) show the first of them."""
    lines = []
    for row in result["exercises"]:
        shown = {}  # the last line of a traceback ("NotImplementedError: ...") -> how many more raised it
        for failure in row["failures"]:
            error = failure.get("traceback", "").rsplit("\n", 1)[-1]
            if error and error in shown:
                shown[error] += 1
                continue
            shown[error] = 0
            lines += [f" {row['name']}: {failure['check']} ".center(110, "_"), *failure["messages"]]
            hint = _check_hint(row["name"], failure["check"])
            lines += [f"hint: {hint}"] if hint else []
            lines += [failure["traceback"], ""] if error else [""]
        repeats = [f"({more} more check{'s' if more > 1 else ''} of {row['name']} raised {error[:200]})"
                   for error, more in shown.items() if more]
        lines += repeats + ([""] if repeats else [])
    return lines


def format_table(result, label, explain=0):
    """The student's report: points per exercise, every failing check, and staged hints (in-process:
    each failure in full first, then the table)."""
    width = max(len(row["name"]) for row in result["exercises"])
    indent = " " * 6
    in_process = result["isolation"] == IN_PROCESS
    lines = [f"{'Checking' if in_process else 'Grading'} {label}", f"isolation: {DESCRIPTIONS[result['isolation']]}", ""]
    if in_process:
        lines += _failure_details(result)
    for row in result["exercises"]:
        status = "pass" if row["passed"] else "FAIL"
        lines.append(f"  {row['name']:<{width}}  {row['points']:>5.1f} / {row['max_points']:<3} "
                     f"{row['checks_passed']:>2}/{row['checks_total']:<2} checks  {status}")
        common = _summary(row["checks_passed"], row["checks_total"], row["failures"])
        if not in_process and row["failures"] and "every failing check" in common:
            lines += textwrap.wrap(common.split("; ", 1)[1], 110, initial_indent=indent, subsequent_indent=indent + "  ")
        elif not in_process:  # in-process, every failure is shown in full above the table
            for failure in row["failures"]:
                lines += textwrap.wrap(f"✗ {failure['check']}", 110, initial_indent=indent, subsequent_indent=indent + "  ")
                for message in failure["messages"][:4]:
                    lines += [indent + "    " + line for line in message.splitlines()[:6]]
                hint = _check_hint(row["name"], failure["check"])
                if hint:
                    lines.append(f"{indent}    hint: {hint}")
        if row["failures"]:
            for stage, hint in enumerate(BY_NAME[row["name"]].hints[: 1 + explain]):
                label_ = ("hint", "more", "formula")[stage]
                lines += textwrap.wrap(f"{label_}: {hint}", 110, initial_indent=indent, subsequent_indent=indent + "  ")
    lines += ["", f"  {'total':<{width}}  {result['total']:>5.1f} / {result['max']}"]
    if explain < 2 and any(row["failures"] for row in result["exercises"]):
        lines.append("  (--explain shows more of each hint; --explain --explain shows the formula)")
    return "\n".join(lines)


def _check_hint(exercise, check_name):
    return next((c.hint for c in BY_NAME[exercise].checks() if c.name == check_name), "")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m minirlhf grade", description="Grade homework submission folders (laid out like exercises/).",
        epilog="examples: python -m minirlhf grade my_homework; python -m minirlhf grade --all submissions --out grades")
    parser.add_argument("paths", nargs="*", metavar="PATH", help="submission folder(s)")
    parser.add_argument("--all", metavar="DIR", help="grade every folder inside DIR (one per student)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (one object per line for several)")
    parser.add_argument("--out", metavar="DIR", help="write DIR/<submission>.json for each and DIR/grades.csv")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="CPU seconds each exercise may use, summed over its checks (default 60)")
    parser.add_argument("--jobs", type=int, default=1, help="run this many exercise processes at once (default 1)")
    parser.add_argument("--exercise", action="append", metavar="NAME",
                        help="grade only this exercise (repeatable): " + ", ".join(ex.name for ex in EXERCISES))
    parser.add_argument("--explain", action="count", default=0,
                        help="show more of each failing exercise's hint (twice: the formula)")
    parser.add_argument("--sandbox", choices=("auto", *isolation.LEVELS), default="auto",
                        help="isolation of the submissions' processes (default: the best available)")
    parser.add_argument("--in-process", action="store_true",
                        help="debug one folder: run the same checks in this process, with full tracebacks "
                             "(breakpoint() works; no sandbox, no time limit: not a grade)")
    args = parser.parse_args(argv)

    paths = list(args.paths)
    if args.all:
        folder = Path(args.all)
        if not folder.is_dir():
            raise MinirlhfError(f"--all {args.all}: no such folder")
        found = sorted(str(p) for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise MinirlhfError(f"--all {args.all}: the folder holds no submissions (expected one folder per "
                                "student, each laid out like exercises/)")
        paths += found
    if not paths:
        parser.error("give a submission folder (PATH) or --all DIR")
    chosen = EXERCISES
    if args.exercise:
        unknown = sorted(set(args.exercise) - set(BY_NAME))
        if unknown:
            raise MinirlhfError(f"--exercise {', '.join(unknown)}: no such exercise; known: "
                                + ", ".join(ex.name for ex in EXERCISES))
        chosen = tuple(ex for ex in EXERCISES if ex.name in args.exercise)
    if args.in_process:
        if len(paths) != 1 or args.out:
            parser.error("--in-process checks one folder, for debugging; grade a class without it")
        result = grade_in_process(paths[0], chosen)
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        else:
            print(format_table(result, paths[0], args.explain))
        return 0
    names = [_student(path) for path in paths]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:  # the folder name is the student's name in --out and in the summary
        raise MinirlhfError(f"several submission folders are named {', '.join(clashes)}; give them distinct names")
    try:
        results = grade(paths, chosen, timeout=args.timeout, jobs=args.jobs, sandbox=args.sandbox)
    except RuntimeError as err:
        raise MinirlhfError(str(err)) from None
    if args.out:
        _write_grades(Path(args.out), results, chosen)
    level = next(iter(results.values()))["isolation"]
    if not args.json and len(paths) > 1:
        print(f"isolation: {DESCRIPTIONS[level]}")
    for path, result in results.items():
        if args.json:
            print(json.dumps(result if len(paths) == 1 else dict(submission=_student(path), **result), ensure_ascii=False))
        elif len(paths) == 1:
            print(format_table(result, path, args.explain))
        else:
            print(f"{_student(path):<30} {result['total']:>6.1f} / {result['max']}")
    return 0


def _student(path):
    return Path(path).resolve().name


def _write_grades(out, results, exercises):
    out.mkdir(parents=True, exist_ok=True)
    for path, result in results.items():
        (out / f"{_student(path)}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
    with open(out / "grades.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["submission", "total", "max", "isolation", *(ex.name for ex in exercises)])
        for path, result in results.items():
            writer.writerow([_student(path), result["total"], result["max"], result["isolation"],
                             *(row["points"] for row in result["exercises"])])


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MinirlhfError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
