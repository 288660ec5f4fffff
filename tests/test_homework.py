"""The homework machinery, in-process: generator, handout, registry, check specs, loader, delegation
blocking, transfer and comparison; the find-the-bug and integration exercises' checks.

The grader end to end (worker processes, sandbox, cheating and careless submissions) is in
``tests/test_grading.py``.
"""
import importlib
import json
import re
from pathlib import Path

import pytest
import torch

from exercise_checks import exercise_tests
from minirlhf.homework import build, transfer
from minirlhf.homework.build import MarkerError, marked_regions, render
from minirlhf.homework.compare import compare
from minirlhf.homework.delegation import DelegationError, blocked_source
from minirlhf.homework.compare import run_in_process
from minirlhf.homework.exercises import BY_NAME, EXERCISES, exercise_of
from minirlhf.homework.impl import load_implementation

REPO = Path(__file__).resolve().parents[1]

test_exercise_find_the_bug_shift = exercise_tests("find_the_bug_shift")
test_exercise_find_the_bug_end_token = exercise_tests("find_the_bug_end_token")
test_exercise_find_the_bug_kl = exercise_tests("find_the_bug_kl")
test_exercise_dpo_step = exercise_tests("dpo_step")
test_exercise_grpo_step = exercise_tests("grpo_step")


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


def test_every_exercise_function_has_an_exercise_with_checks_points_and_hints():
    stubs = set()
    for text in build.generate().values():
        stubs |= set(re.findall(r'raise NotImplementedError\("(\w+): see', text))
    assert all(exercise_of(name) for name in stubs), [name for name in stubs if not exercise_of(name)]
    assert sum(ex.points for ex in EXERCISES) == 100
    assert [ex.chapter for ex in EXERCISES] == sorted(ex.chapter for ex in EXERCISES)  # the student path
    readme = (REPO / "exercises" / "README.md").read_text(encoding="utf-8")
    for exercise in EXERCISES:
        checks = exercise.checks()
        assert len(checks) >= 3 and len({c.name for c in checks}) == len(checks), exercise.name
        assert len(exercise.hints) == 3, exercise.name
        assert f"| `{exercise.name}` |" in readme, f"{exercise.name} is missing from exercises/README.md"
        reference = importlib.import_module(exercise.reference)
        assert all(callable(getattr(reference, f)) for f in exercise.blocked), exercise.name


@pytest.mark.parametrize("name", ["find_the_bug_shift", "find_the_bug_kl", "find_the_bug_end_token"])
def test_shipped_find_the_bug_fails_every_check(name):
    exercise = BY_NAME[name]
    buggy = load_implementation(REPO / "exercises").find_the_bug
    for check in exercise.checks():
        with pytest.raises(AssertionError):
            run_in_process(check, buggy, importlib.import_module(exercise.reference))


def test_untouched_exercises_fail_every_check_with_not_implemented():
    untouched = load_implementation(REPO / "exercises")
    for exercise in EXERCISES:
        if exercise.name.startswith("find_the_bug"):
            continue  # those ship runnable, with a bug
        for check in exercise.checks():
            with pytest.raises(AssertionError, match="NotImplementedError" if not check.raises else "expected"):
                run_in_process(check, untouched, importlib.import_module(exercise.reference))


def test_handout_has_the_exercises_and_notebooks_and_no_solutions(tmp_path, capsys):
    assert build.main(["--handout", str(tmp_path / "handout")]) == 0
    files = {p.relative_to(tmp_path / "handout").as_posix() for p in (tmp_path / "handout").rglob("*") if p.is_file()}
    assert {"exercises/README.md", "exercises/QUESTIONS.md", "exercises/core/gae.py", "exercises/homework/steps.py",
            "exercises/find_the_bug/shift.py", "notebooks/01_lm_as_policy.ipynb",
            "notebooks/tensor_memory.py"} <= files  # the notebooks' memory meter travels with them
    assert not any(f.startswith("solutions") or f.endswith("ANSWERS.md") for f in files)
    gae = (tmp_path / "handout" / "exercises" / "core" / "gae.py").read_text()
    assert "NotImplementedError" in gae and "next_advantage" not in gae  # no solution body
    for notebook in (tmp_path / "handout" / "notebooks").glob("*.ipynb"):
        cells = json.loads(notebook.read_text())["cells"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c["cell_type"] == "code")
    with pytest.raises(Exception, match="not empty"):
        build.write_handout(tmp_path / "handout")


def test_blocked_source_keeps_signature_and_docstring_and_raises_delegation_error():
    source = (REPO / "minirlhf" / "core" / "dpo_losses.py").read_text()
    blocked = blocked_source(source, ("dpo_loss",), "dpo")
    namespace = {}
    exec(compile(blocked, "dpo_losses.py", "exec"), namespace)
    assert "chosen_logratios" not in blocked and '"""Direct Preference Optimization' in blocked
    logps = [torch.randn(3) for _ in range(4)]
    with pytest.raises(DelegationError, match="reference dpo_loss.*'dpo'.*write your own"):
        namespace["dpo_loss"](*logps)
    assert namespace["simpo_loss"](logps[0], logps[1])[0].shape == (3,)  # the rest still works


def test_transfer_round_trips_plain_data_and_refuses_anything_else(tmp_path):
    values = {"t": torch.arange(6).view(2, 3), "half": torch.ones(2, dtype=torch.bfloat16), "flag": True,
              "nested": {"w": torch.zeros(1)}, "none": None, "text": "x", "numbers": [1, 2.5]}
    transfer.save(tmp_path / "a", values)
    back = transfer.load(tmp_path / "a")
    assert torch.equal(back["t"], values["t"]) and back["half"].dtype == torch.bfloat16
    assert back["flag"] is True and torch.equal(back["nested"]["w"], torch.zeros(1)) and back["numbers"] == [1, 2.5]
    import pickle  # a pickle where the JSON should be is refused, never unpickled

    (tmp_path / "b.json").write_bytes(pickle.dumps({"x": 1}))
    (tmp_path / "b.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes())
    with pytest.raises(ValueError, match="malformed"):
        transfer.load(tmp_path / "b")
    (tmp_path / "c.json").write_text('{"__reduce__": "os.system"}')
    (tmp_path / "c.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes())
    with pytest.raises(ValueError, match="malformed"):
        transfer.load(tmp_path / "c")


def test_compare_names_the_output_the_position_and_both_values():
    expected = torch.zeros(2, 5, dtype=torch.float64)
    got = expected.clone()
    got[1, 4] = -0.6932
    message = compare("advantages", expected, got)
    assert "advantages: 1 of 10 values differ" in message and "row 1, t = 4" in message
    assert "expected 0, got −0.6932" in message
    assert "expected shape [2, 5], got [2, 1]" in compare("advantages", expected, got[:, :1])
    assert "no gradient reached x" in compare("∂L/∂x", expected, None)
    assert compare("a", expected, expected + 1e-9) is None  # within the tolerance
    assert compare("a", torch.tensor([float("inf")]), torch.tensor([float("inf")])) is None
    assert "differ" in compare("a", torch.tensor([1.0]), torch.tensor([float("nan")]))


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


