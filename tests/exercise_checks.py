"""The homework exercises' checks as pytest tests: ``test_exercise_gae = exercise_tests("gae")``.

Each check of ``minirlhf/homework/checks/<exercise>.py`` becomes one test, marked
``exercise("<exercise>")`` (and ``exercise_<exercise>``, see ``conftest.py``), run in-process on
the ``impl`` fixture: the reference by default, a student's folder with ``--impl PATH``. The
messages are the grader's.
"""
import importlib
import re

import pytest

from minirlhf.homework.compare import run_in_process
from minirlhf.homework.exercises import BY_NAME


def exercise_tests(name):
    exercise = BY_NAME[name]
    checks = exercise.checks()
    ids = [re.sub(r"[^\w]+", "-", check.name.encode("ascii", "ignore").decode()).strip("-")[:60] for check in checks]

    @pytest.mark.exercise(name)
    @pytest.mark.parametrize("index", range(len(checks)), ids=ids)
    def test(impl, index):
        functions = impl.find_the_bug if exercise.file.startswith("find_the_bug/") else impl
        run_in_process(checks[index], functions, importlib.import_module(exercise.reference))

    test.__name__ = f"test_exercise_{name}"
    return test
