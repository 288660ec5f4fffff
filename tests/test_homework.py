"""The homework machinery: the generator stays in sync, the grader grades, find-the-bug has bugs.

Three kinds of test live here:
- the find-the-bug exercises' property checks (marked, so they grade ``--impl PATH``);
- the generator (``minirlhf/homework/build.py``) and the loader (``impl.py``), in-process;
- the grader end to end, in one class of three submissions graded at once: ``solutions/`` gets
  full marks, untouched ``exercises/`` gets zero, and a submission with planted faults (a wrong
  value, a wrong shape, a syntax error, a crash, an endless loop in a function and at import time)
  loses exactly those exercises' points. It starts the grader's worker subprocesses (~10 s each),
  so it is the only test that does.
"""
import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from minirlhf.homework import build, grade
from minirlhf.homework.build import MarkerError, marked_regions, render
from minirlhf.homework.impl import load_implementation

REPO = Path(__file__).resolve().parents[1]


def _fmt(t):
    return [round(v, 4) for v in t.double().flatten().tolist()]


# ----------------------------------------------------------------------------- find the bug
# Each check is a property the correct function has and the shipped buggy one lacks.


def check_response_logprobs(response_logprobs):
    """log π(y|x) equals a brute-force loop over the positions where response_mask is 1."""
    g = torch.Generator().manual_seed(0)
    batch, length, vocab = 3, 7, 11
    logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64)
    input_ids = torch.randint(vocab, (batch, length), generator=g)
    response_mask = torch.tensor(
        [[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0, 0]]  # right, left, short
    )
    expected = torch.zeros(batch, dtype=torch.float64)
    for b in range(batch):
        for pos in range(1, length):
            if response_mask[b, pos]:  # the logits one step earlier predict this token
                expected[b] += torch.log_softmax(logits[b, pos - 1], dim=-1)[input_ids[b, pos]]
    got = response_logprobs(logits, input_ids, response_mask)
    assert tuple(got.shape) == (batch,), f"expected shape ({batch},), got {tuple(got.shape)}"
    assert torch.allclose(got.double(), expected, atol=1e-5), (
        f"log π(y|x) per row: expected {_fmt(expected)}, got {_fmt(got)}"
    )


def check_k3_penalty(k3_penalty):
    """k3 is ≥ 0, 0 at π = π_ref, and its expectation under π is exactly KL(π ‖ π_ref)."""
    pi = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    # One "sample" per vocabulary token; weighting by π gives the exact expectation under π.
    k3 = k3_penalty(pi.log()[None, :], ref.log()[None, :])[0]
    assert tuple(k3.shape) == (3,), f"expected shape (1, 3) for a [1, 3] input, got {tuple(k3.shape) + (1,)}"
    assert (k3 >= 0).all(), f"k3 must never be negative, got {_fmt(k3)}"
    same = k3_penalty(pi.log()[None, :], pi.log()[None, :])
    assert torch.allclose(same, torch.zeros_like(same)), f"k3 must be 0 when π = π_ref, got {_fmt(same)}"
    kl = (pi * (pi / ref).log()).sum()
    mean = (pi * k3).sum()
    assert torch.isclose(mean, kl, atol=1e-9), (
        f"E_π[k3] should be KL(π‖π_ref): expected {kl.item():.4f}, got {mean.item():.4f}"
    )


def check_end_scores(end_scores):
    """The score is read at each row's last attended token, also when pad == eos."""
    eos = 2
    input_ids = torch.tensor([[5, 6, 7, eos, eos, eos], [eos, eos, 5, 6, 7, eos], [5, 6, 7, 8, 9, eos]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    token_scores = torch.arange(18, dtype=torch.float32).view(3, 6)
    expected = token_scores[torch.arange(3), torch.tensor([3, 5, 5])]
    for pad in (0, eos):  # a tokenizer with its own pad token, and one with pad == eos
        ids = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, pad))
        got = end_scores(token_scores, ids, attention_mask, pad)
        assert torch.equal(got, expected), (
            f"pad_token_id={pad} (eos={eos}): expected the scores at columns [3, 5, 5] = {_fmt(expected)}, "
            f"got {_fmt(got)}"
        )


FIND_THE_BUG = [
    ("response_logprobs", check_response_logprobs),
    ("k3_penalty", check_k3_penalty),
    ("end_scores", check_end_scores),
]


@pytest.mark.exercise("find_the_bug_shift")
def test_find_the_bug_shift(impl):
    check_response_logprobs(impl.find_the_bug.response_logprobs)


@pytest.mark.exercise("find_the_bug_kl")
def test_find_the_bug_kl(impl):
    check_k3_penalty(impl.find_the_bug.k3_penalty)


@pytest.mark.exercise("find_the_bug_end_token")
def test_find_the_bug_end_token(impl):
    check_end_scores(impl.find_the_bug.end_scores)


@pytest.mark.parametrize("name, check", FIND_THE_BUG, ids=[name for name, _ in FIND_THE_BUG])
def test_shipped_find_the_bug_fails_its_check_and_the_solution_passes(name, check):
    buggy = getattr(load_implementation(REPO / "exercises").find_the_bug, name)
    with pytest.raises(AssertionError):
        check(buggy)
    check(getattr(load_implementation(REPO / "solutions").find_the_bug, name))


# ----------------------------------------------------------------------------- the generator


def test_exercises_and_solutions_are_generated_from_the_reference(capsys):
    status = build.main(["--check"])
    assert status == 0, f"run `python -m minirlhf.homework.build`:\n{capsys.readouterr().out}"


SOURCE = '''"""A module."""


def double(x):
    """2x.

    Hint: add it to itself.
    """
    # BEGIN SOLUTION
    y = x + x
    return y
    # END SOLUTION


class Box:
    def area(self, w, h):
        """w times h."""
        if w < 0:
            raise ValueError("negative")
        # BEGIN SOLUTION
        return w * h
        # END SOLUTION


def untouched():
    return 3
'''


def test_render_replaces_exactly_the_marked_bodies():
    exercise, solution = render(SOURCE, "pkg/mod.py", exercise=True), render(SOURCE, "pkg/mod.py", exercise=False)
    assert "BEGIN SOLUTION" not in exercise + solution and "END SOLUTION" not in exercise + solution
    assert exercise.startswith(build.GENERATED) and "pkg/mod.py" in exercise.splitlines()[0]
    # The solution is the source without the marker lines (after the header).
    body = [line for line in SOURCE.splitlines() if line.strip() not in (build.BEGIN, build.END)]
    assert solution.splitlines()[-len(body):] == body
    stubs, solved = {}, {}
    exec(compile(exercise, "exercise", "exec"), stubs)
    exec(compile(solution, "solution", "exec"), solved)
    assert solved["double"](4) == 8 and solved["Box"]().area(2, 3) == 6
    with pytest.raises(NotImplementedError, match="double: see the docstring"):
        stubs["double"](4)
    with pytest.raises(NotImplementedError, match="area: see the docstring"):
        stubs["Box"]().area(2, 3)
    with pytest.raises(ValueError):  # code before the region is kept
        stubs["Box"]().area(-1, 3)
    assert stubs["untouched"]() == 3 and stubs["double"].__doc__ == solved["double"].__doc__


@pytest.mark.parametrize(
    "source, problem",
    [
        ("def f():\n    # BEGIN SOLUTION\n    return 1\n", r"m\.py:2: # BEGIN SOLUTION is never closed"),
        ("def f():\n    return 1\n    # END SOLUTION\n", r"m\.py:3: # END SOLUTION without"),
        ("# BEGIN SOLUTION\nx = 1\n# END SOLUTION\n", r"m\.py:1: .* not inside a function"),
        ("def f():\n    # BEGIN SOLUTION\n    y = 1\n    # END SOLUTION\n    return y\n", r"m\.py:4: code follows"),
        ("def f():\n    # BEGIN SOLUTION\n    # BEGIN SOLUTION\n", r"m\.py:3: .* inside the region opened at line 2"),
    ],
)
def test_bad_markers_are_errors_naming_file_and_line(source, problem):
    with pytest.raises(MarkerError, match=problem):
        marked_regions(source, "m.py")


def test_every_exercise_function_is_graded_and_every_graded_test_counts():
    stubs = set()
    for text in build.generate().values():
        stubs |= set(re.findall(r'raise NotImplementedError\("(\w+): see', text))
    public = {name for name in stubs if not name.startswith("_")}
    assert public <= set(grade.ROLE_OF), f"exercise functions no grader entry covers: {public - set(grade.ROLE_OF)}"
    marked = set()
    for path in (REPO / "tests").glob("test_*.py"):
        marked |= set(re.findall(r'mark\.exercise\("(\w+)"\)', path.read_text(encoding="utf-8")))
    assert marked <= set(grade.ROLE_OF), f"tests marked for functions no exercise owns: {marked - set(grade.ROLE_OF)}"
    untested = [ex.name for ex in grade.EXERCISES if not marked & set(ex.functions)]
    assert not untested, f"exercises without a single marked test: {untested}"
    readme = (REPO / "exercises" / "README.md").read_text(encoding="utf-8")
    unlisted = [ex.name for ex in grade.EXERCISES if f"| `{ex.name}` |" not in readme]
    assert not unlisted, f"exercises missing from the table in exercises/README.md: {unlisted}"


# ----------------------------------------------------------------------------- the loader


def test_loader_imports_lazily_and_isolates_a_broken_file(tmp_path):
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "good.py").write_text("def good():\n    return 1\n")
    (tmp_path / "core" / "bad.py").write_text("def broken(:\n    return 2\n")
    (tmp_path / "core" / "raises.py").write_text("raise RuntimeError('boom')\n\ndef also_broken():\n    return 3\n")
    (tmp_path / "find_the_bug").mkdir()
    (tmp_path / "find_the_bug" / "bug.py").write_text("def good():\n    return 'not me'\n")
    impl = load_implementation(tmp_path)
    assert impl.good() == 1 and impl.find_the_bug.good() == "not me"
    with pytest.raises(ImportError, match=r"core/bad.py failed to import: SyntaxError"):
        impl.broken
    with pytest.raises(ImportError, match=r"core/raises.py failed to import: RuntimeError: boom"):
        impl.also_broken
    with pytest.raises(AttributeError, match="defines no function 'missing'"):
        impl.missing
    assert impl.good() == 1  # still fine after the failures


def test_reference_implementation_exposes_every_exercise_function():
    impl = load_implementation("minirlhf")
    for ex in grade.EXERCISES:
        if not ex.name.startswith("find_the_bug"):
            assert any(hasattr(impl, f) for f in ex.functions), f"{ex.name}: none of {ex.functions} in the reference"


# ----------------------------------------------------------------------------- the grader, end to end


def test_cli_prints_the_json_schema_and_a_table_with_hints(monkeypatch, capsys, tmp_path):
    def fake_grade(path, timeout, exercises, verbose):
        rows = [{"name": ex.name, "passed": ex.name != "gae", "points": 0 if ex.name == "gae" else ex.points,
                 "max_points": ex.points, "message": "boom" if ex.name == "gae" else "all checks passed"}
                for ex in exercises]
        return {"total": sum(r["points"] for r in rows), "max": sum(ex.points for ex in exercises), "exercises": rows}

    monkeypatch.setattr(grade, "grade", fake_grade)
    assert grade.main([str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["total", "max", "exercises"]
    assert all(list(row) == ["name", "passed", "points", "max_points", "message"] for row in result["exercises"])
    assert grade.main([str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"gae +0 / 10 +FAIL", table) and "boom" in table and "hint: loop t backwards" in table
    assert re.search(r"total +90 / 100", table)


# Planted faults, each in a copy of solutions/: exercise name -> (file, text appended, message).
PLANTED = {
    "dpo": ("core/dpo_losses.py",  # a wrong value: every loss scaled
            "\n_dpo_loss = dpo_loss\n\n\ndef dpo_loss(*args, **kwargs):\n"
            "    losses, chosen, rejected = _dpo_loss(*args, **kwargs)\n    return 1.5 * losses, chosen, rejected\n",
            None),
    "grpo": ("core/grpo.py",  # a wrong shape: [B, 1] instead of [B]
             "\n_group_advantages = group_advantages\n\n\ndef group_advantages(*args, **kwargs):\n"
             "    return _group_advantages(*args, **kwargs)[:, None]\n",
             None),
    "simpo": ("core/dpo_losses.py",  # the process dies: the grader restarts it for the rest
              "\n\ndef simpo_loss(*args, **kwargs):\n    import os\n    os._exit(3)\n", "died (exit status 3)"),
    "gae": ("core/gae.py", "\n\ndef gae_advantages(*args, **kwargs):\n    while True:\n        pass\n", "timed out"),
    "template": ("data/templates.py", "\n\ndef homework_template(record:\n    return None\n", "SyntaxError"),
    "rm_end_score": ("models/reward_model.py", "\nwhile True:\n    pass\n", "failed to import: ExerciseTimeout"),
}


def test_grading_a_class_solutions_full_untouched_zero_planted_faults_cost_exactly_their_points(tmp_path):
    submissions = tmp_path / "submissions"
    shutil.copytree(REPO / "solutions", submissions / "reference", ignore=shutil.ignore_patterns("*.md"))
    shutil.copytree(REPO / "exercises", submissions / "untouched", ignore=shutil.ignore_patterns("*.md"))
    shutil.copytree(REPO / "solutions", submissions / "broken", ignore=shutil.ignore_patterns("*.md"))
    for file, text, _ in PLANTED.values():
        with open(submissions / "broken" / file, "a", encoding="utf-8") as f:
            f.write(text)
    out = tmp_path / "grades"

    assert grade.main(["--all", str(submissions), "--out", str(out), "--timeout", "4", "--jobs", "3"]) == 0

    reference = json.loads((out / "reference.json").read_text())
    failed = {row["name"]: row["message"] for row in reference["exercises"] if not row["passed"]}
    assert not failed, failed
    assert reference["total"] == reference["max"] == sum(ex.points for ex in grade.EXERCISES) == 100

    untouched = json.loads((out / "untouched.json").read_text())
    assert untouched["total"] == 0 and not any(row["passed"] for row in untouched["exercises"])
    for row in untouched["exercises"]:
        if not row["name"].startswith("find_the_bug"):  # those ship runnable, with a bug
            assert "NotImplementedError" in row["message"], row

    broken = json.loads((out / "broken.json").read_text())
    rows = {row["name"]: row for row in broken["exercises"]}
    assert {name for name, row in rows.items() if not row["passed"]} == set(PLANTED)
    assert broken["total"] == broken["max"] - sum(rows[name]["max_points"] for name in PLANTED)
    for name, (_, _, message) in PLANTED.items():
        assert rows[name]["points"] == 0 and rows[name]["message"]
        if message:
            assert message in rows[name]["message"], rows[name]

    with open(out / "grades.csv", newline="") as f:
        table = {row["submission"]: row for row in csv.DictReader(f)}
    assert table["broken"]["total"] == str(broken["total"]) and table["untouched"]["total"] == "0"
