"""The grader end to end: fresh sandboxed worker processes, cheating and careless submissions.

Each submission is a folder built in ``tmp_path`` from ``solutions/`` and ``exercises/`` plus a few
planted lines. These are the tests that start worker processes (~3 s of CPU each), so they grade
only the exercises they are about, with a short ``--timeout``.
"""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minirlhf.errors import MinirlhfError
from minirlhf.homework import build, grade, isolation
from minirlhf.homework.exercises import BY_NAME

REPO = Path(__file__).resolve().parents[1]
SLEEPER = "4242.5"  # the planted child process sleeps this long: find it by its argument


def submission(root, name, files=None, solved=(), untouched=(), append=None):
    """A folder ``root/name`` with the solved and untouched copies of the given files, and text
    appended to (or written as) others: ``append={"core/gae.py": "..."}``."""
    folder = root / name
    for rel in solved:
        _copy(REPO / "solutions" / rel, folder / rel)
    for rel in untouched:
        _copy(REPO / "exercises" / rel, folder / rel)
    for rel, text in (append or {}).items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    for rel, text in (files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text, encoding="utf-8")
    return folder


def _copy(source, target):
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)


def rows(result):
    return {row["name"]: row for row in result["exercises"]}


def grade_json(capsys, *argv):
    capsys.readouterr()
    assert grade.main([*argv, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    return {line.get("submission"): line for line in lines} if len(lines) > 1 else lines[0]


# Planted faults, each in its own exercise: file -> text appended to the solved file.
CARELESS = {
    "core/gae.py": "\n\ndef gae_advantages(*args, **kwargs):\n    while True:\n        pass\n",
    "core/dpo_losses.py": "\n\ndef simpo_loss(*args, **kwargs):\n    import os\n    os._exit(3)\n",
    "core/logprobs.py": "\n_solved = sequence_logprobs\n\n\ndef sequence_logprobs(*args, **kwargs):\n"
                        "    import ctypes\n    ctypes.string_at(0)\n",
    "core/kl.py": f"\nimport subprocess as _subprocess\n_subprocess.Popen(['sleep', '{SLEEPER}'])\n",
    "models/reward_model.py": "\nwhile True:\n    pass\n",
    "data/templates.py": "\n\ndef homework_template(record:\n    return None\n",
    # 12 GiB of address space, never touched: only the worker's memory limit stops it.
    "core/aggregation.py": "\n\ndef aggregate_token_losses(*args, **kwargs):\n"
                           "    __import__('torch').empty(3 * 2**30)\n    raise ValueError('no memory limit')\n",
    # An honest leftover, and a masked_mean that only forgets the all-masked row.
    "core/masked.py": "\ntorch.set_default_dtype(torch.float64)\n\n\ndef masked_mean(x, mask, dim=None):\n"
                      "    kept = torch.where(mask.bool(), x, torch.zeros_like(x))\n"
                      "    count = torch.where(mask.bool(), 1.0, 0.0).to(x.dtype)\n"
                      "    return kept.sum() / count.sum() if dim is None else kept.sum(dim) / count.sum(dim)\n",
}


def test_a_class_solutions_full_marks_careless_faults_cost_only_their_exercise(tmp_path, capsys):
    root = tmp_path / "class"
    shutil.copytree(REPO / "solutions", root / "reference", ignore=shutil.ignore_patterns("*.md"))
    submission(root, "careless", solved=[*CARELESS, "core/grpo.py"], append=CARELESS)
    out = tmp_path / "grades"

    assert grade.main(["--all", str(root), "--out", str(out), "--timeout", "4", "--jobs", "2"]) == 0
    level = isolation.choose()
    assert f"isolation: {isolation.DESCRIPTIONS[level]}" in capsys.readouterr().out

    reference = json.loads((out / "reference.json").read_text())
    failed = {row["name"]: row["failures"] for row in reference["exercises"] if not row["passed"]}
    assert not failed, failed
    assert reference["total"] == reference["max"] == 100 and reference["isolation"] == level

    careless = rows(json.loads((out / "careless.json").read_text()))
    assert careless["grpo"]["passed"] and careless["dpo"]["passed"]  # next to a leftover and a dying simpo
    assert careless["kl"]["passed"]  # its planted child is no grading matter...
    assert not any(SLEEPER in _cmdline(pid) for pid in _pids())  # ...and it did not survive the exercise
    for name, message in [("gae", "timed out"), ("simpo", "exit status 3"), ("rm_end_score", "failed to import"),
                          ("template", "SyntaxError"), ("aggregation", "allocate")]:
        assert careless[name]["points"] == 0 and message in json.dumps(careless[name]["failures"]), careless[name]
    logprobs = careless["logprobs"]  # shift and gather pass; sequence_logprobs segfaults
    assert 0 < logprobs["points"] < logprobs["max_points"] and "SIGSEGV" in json.dumps(logprobs["failures"])
    masked = careless["masked"]  # partial credit: only the all-masked cases fail
    assert masked["checks_total"] - masked["checks_passed"] == 2 and masked["points"] == round(5 * 11 / 13, 1)
    missing = careless["find_the_bug_kl"]
    assert missing["points"] == 0 and "missing" in missing["failures"][0]["messages"][0]

    with open(out / "grades.csv", newline="") as f:
        table = {row["submission"]: row for row in csv.DictReader(f)}
    assert table["reference"]["total"] == "100.0" and float(table["careless"]["masked"]) == masked["points"]


def test_untouched_exercises_score_zero_with_not_implemented(tmp_path):
    names = ("gae", "dpo_step", "find_the_bug_kl")
    folder = submission(tmp_path, "untouched", untouched=[BY_NAME[n].file for n in names])
    result = grade.grade([str(folder)], tuple(BY_NAME[n] for n in names), timeout=20)[str(folder)]
    assert result["total"] == 0
    for name in ("gae", "dpo_step"):
        assert "NotImplementedError" in rows(result)[name]["message"], rows(result)[name]


# A wrong dpo_loss (every loss × 1.5) and a GAE that bootstraps across padding: what they earn alone.
WRONG = {
    "core/dpo_losses.py": "\n_dpo_loss = dpo_loss\n\n\ndef dpo_loss(*args, **kwargs):\n"
                          "    losses, chosen, rejected = _dpo_loss(*args, **kwargs)\n    return 1.5 * losses, chosen, rejected\n"
                          "\n\ndef simpo_loss(*args, **kwargs):\n    raise NotImplementedError('simpo_loss')\n",
    "core/gae.py": "\n\ndef gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95):\n"
                   "    import torch\n    advantages = torch.zeros_like(values)\n    last = 0.0\n"
                   "    for t in reversed(range(values.shape[1])):\n"
                   "        nxt = values[:, t + 1] if t + 1 < values.shape[1] else 0.0\n"
                   "        last = rewards[:, t] + gamma * nxt - values[:, t] + gamma * lam * last\n"
                   "        advantages[:, t] = last\n"
                   "    advantages = advantages * mask\n    return advantages, (advantages + values) * mask\n",
}
# Cheats (a) and (b): find the grader's objects in memory and make failures pass; patch the checks.
PRELUDE = '''
import gc as _gc, sys as _sys, torch as _torch
try:
    import pytest as _pytest
    _pytest.approx = lambda expected, *a, **k: expected
except ImportError:
    pass
_torch.testing.assert_close = lambda *a, **k: None
_torch.allclose = lambda *a, **k: True
_torch.equal = lambda *a, **k: True
for _name, _module in list(_sys.modules.items()):
    if _name.startswith("minirlhf.homework"):
        for _attr in ("judge", "compare", "execute", "run_in_process"):
            if hasattr(_module, _attr):
                setattr(_module, _attr, lambda *a, **k: {"status": "ok", "outputs": {}})
for _obj in _gc.get_objects():
    if isinstance(_obj, dict) and _obj.get("status") in ("error", "timeout"):
        _obj["status"] = "ok"
'''
DELEGATE = {
    "core/dpo_losses.py": "\n\ndef dpo_loss(*args, **kwargs):\n    import minirlhf\n    return minirlhf.dpo_loss(*args, **kwargs)\n"
                          "\n\ndef simpo_loss(*args, **kwargs):\n    from minirlhf.core.dpo_losses import simpo_loss as ref\n"
                          "    return ref(*args, **kwargs)\n",
    "core/gae.py": "\n\ndef gae_advantages(*args, **kwargs):\n    import importlib\n"
                   "    return importlib.import_module('minirlhf.core.gae').gae_advantages(*args, **kwargs)\n",
}


def test_cheats_score_only_what_their_code_earns_and_delegation_scores_zero(tmp_path, capsys):
    root = tmp_path / "class"
    solved, stub = ["core/dpo_losses.py", "core/gae.py"], ["core/kl.py"]
    submission(root, "honest", solved=solved, untouched=stub, append=WRONG)
    submission(root, "cheater", solved=solved, untouched=stub, append={
        **{k: PRELUDE + v for k, v in WRONG.items()}, "core/kl.py": PRELUDE})
    submission(root, "delegator", untouched=[*solved, *stub], append=DELEGATE)
    results = grade_json(capsys, "--all", str(root), "--timeout", "10", "--jobs", "2",
                         "--exercise", "dpo", "--exercise", "simpo", "--exercise", "gae", "--exercise", "kl")
    honest, cheater, delegator = (rows(results[name]) for name in ("honest", "cheater", "delegator"))
    assert 0 < honest["dpo"]["points"] < 8 and honest["gae"]["points"] < 8  # the wrong code earns some
    for name in ("dpo", "simpo", "gae", "kl"):
        assert cheater[name]["points"] == honest[name]["points"], (name, cheater[name]["message"])
        assert cheater[name]["checks_passed"] == honest[name]["checks_passed"]
    assert cheater["kl"]["points"] == cheater["simpo"]["points"] == 0  # never implemented
    for name in ("dpo", "simpo", "gae"):
        assert delegator[name]["points"] == 0, delegator[name]
        assert "DelegationError" in delegator[name]["message"] and "write your own" in delegator[name]["message"]


VANDAL = '''
from pathlib import Path as _Path
import minirlhf as _m
_targets = [_Path({repo!r}) / "tests" / "test_pwned.py", _Path({repo!r}) / "minirlhf" / "homework" / "checks" / "gae.py",
            _Path({victim!r}) / "core" / "gae.py"]
_written = 0
for _target in _targets:
    try:
        with open(_target, "a") as _f:
            _f.write("\\nCHECKS = []\\ndef gae_advantages(*a, **k):\\n    raise SystemExit(1)\\n")
        _written += 1
    except OSError:
        pass
_Path({report!r}).write_text(str(_written)) if _written else None
'''


@pytest.mark.parametrize("level", isolation.LEVELS)
def test_a_submission_cannot_change_the_grader_or_the_next_student(tmp_path, capsys, level):
    if not isolation.available(level):
        pytest.skip(f"{level} is not available here")
    guarded = {p: p.read_bytes() for p in [*(REPO / "tests").glob("*.py"), *(REPO / "minirlhf").rglob("*.py")]}
    root, report = tmp_path / "class", tmp_path / "written.txt"
    victim = submission(root, "victim", solved=["core/gae.py"])
    vandal = submission(root, "vandal", solved=["core/masked.py"],
                        append={"core/masked.py": VANDAL.format(repo=str(REPO), victim=str(victim), report=str(report))})
    try:
        results = grade_json(capsys, "--all", str(root), "--timeout", "10", "--sandbox", level,
                             "--exercise", "masked", "--exercise", "gae")
    finally:  # whatever happened, leave the tree as it was
        for path, data in guarded.items():
            if path.read_bytes() != data:
                path.write_bytes(data)
        (REPO / "tests" / "test_pwned.py").unlink(missing_ok=True)
    assert rows(results["victim"])["gae"]["passed"], rows(results["victim"])["gae"]  # graded as handed in
    changed = [str(p) for p, data in guarded.items() if p.read_bytes() != data]
    assert not changed and not (REPO / "tests" / "test_pwned.py").exists()
    masked = rows(results["vandal"])["masked"]
    if level == "none":  # the writes happened; the grader put its files back and gave 0
        assert masked["points"] == 0 and "changed the grader's files" in json.dumps(masked["failures"])
    else:  # the sandbox refused every write: the code earns its points
        assert masked["passed"] and not report.exists()
    assert results["vandal"]["isolation"] == level
    assert vandal.is_dir()


def test_grading_an_empty_class_says_there_is_nothing_to_grade(tmp_path):
    (tmp_path / "class").mkdir()
    with pytest.raises(MinirlhfError, match="holds no submissions"):
        grade.main(["--all", str(tmp_path / "class")])


def test_the_table_lists_every_failure_with_staged_hints(monkeypatch, capsys, tmp_path):
    def fake_grade(paths, exercises, timeout, jobs, sandbox):
        outcome = {"checks": [("case one", False, ["advantages: 1 of 4 values differ; worst at row 1, t = 2"]),
                              ("case two", True, []), ("case three", False, ["raised ValueError: bad"])],
                   "cpu_seconds": 0.1}
        result_rows = [grade.score(ex, outcome) for ex in exercises]
        return {p: {"total": sum(r["points"] for r in result_rows), "max": 8, "isolation": "none",
                    "exercises": result_rows} for p in paths}

    monkeypatch.setattr(grade, "grade", fake_grade)
    assert grade.main([str(tmp_path), "--exercise", "gae"]) == 0
    table = capsys.readouterr().out
    assert "gae" in table and "2.7 / 8" in table and "1/3  checks" in table
    assert "✗ case one" in table and "✗ case three" in table and "row 1, t = 2" in table
    assert "hint: loop t backwards" in table and "formula:" not in table
    assert grade.main([str(tmp_path), "--exercise", "gae", "--explain", "--explain"]) == 0
    assert "formula: δ_t" in capsys.readouterr().out
    assert grade.main([str(tmp_path), "--exercise", "gae", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["exercises"][0]
    assert list(row) == ["name", "passed", "points", "max_points", "checks_passed", "checks_total", "message",
                         "failures", "cpu_seconds"]


def test_the_handout_checks_itself_in_process(tmp_path):
    # A student has the handout and the installed package, no tests/: `grade --in-process`, run from
    # the handout folder, checks a solved exercise and shows an untouched one's NotImplementedError
    # with the traceback into the student's file.
    handout = tmp_path / "handout"
    build.write_handout(handout)
    shutil.copytree(handout / "exercises", handout / "my_homework")
    shutil.copy(REPO / "solutions" / "core" / "gae.py", handout / "my_homework" / "core" / "gae.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))
    argv = [sys.executable, "-m", "minirlhf", "grade", "my_homework", "--in-process", "--exercise", "gae",
            "--exercise", "masked"]
    run = subprocess.run(argv, cwd=handout, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert not any((handout / name).exists() for name in ("tests", "solutions", "minirlhf"))
    gae, masked = BY_NAME["gae"], BY_NAME["masked"]
    n_gae, n_masked = len(gae.checks()), len(masked.checks())
    assert re.search(rf"gae\s+{gae.points}\.0 / {gae.points}\s+{n_gae}/{n_gae}\s+checks\s+pass", run.stdout), run.stdout
    assert re.search(rf"masked\s+0\.0 / {masked.points}\s+0/{n_masked}\s+checks\s+FAIL", run.stdout), run.stdout
    assert "Traceback (most recent call last)" in run.stdout and "my_homework/core/masked.py" in run.stdout
    assert "NotImplementedError: masked_mean: see the docstring's formula and hint" in run.stdout
    with pytest.raises(SystemExit):  # debugging is for one folder; a class is graded in the sandbox
        grade.main(["--all", str(handout), "--in-process"])


def _pids():
    return [p.name for p in Path("/proc").glob("[0-9]*")]


def _cmdline(pid):
    try:
        return (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""



def test_integration_steps_cannot_delegate_to_the_trainers(tmp_path):
    # dpo_step / grpo_step compute what the trainers' loss functions compute: the worker's copy of
    # minirlhf has those bodies replaced too, while the rest of the trainers stays importable.
    from minirlhf.homework.judge import Judge

    judge = Judge((BY_NAME["dpo_step"], BY_NAME["grpo_step"]), sandbox="none", scratch=tmp_path)
    for exercise, module, name in (("dpo_step", "train/dpo.py", "pairwise_preference_loss"),
                                   ("grpo_step", "train/grpo.py", "grpo_step_loss")):
        source = judge._blocked_package(BY_NAME[exercise])[module].decode("utf-8")
        body = source.split(f"def {name}(", 1)[1].split("\ndef ", 1)[0]
        assert f"DelegationError({name!r}, {exercise!r})" in body
        assert "def train_" in source  # only the named functions lose their bodies
        compile(source, module, "exec")
