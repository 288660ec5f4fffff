"""pytest's seam: load the exercise functions from the reference or from a folder, in-process.

A submission folder mirrors the package layout of the exercise files, e.g.
``PATH/core/dpo_losses.py``, ``PATH/core/gae.py``, ``PATH/data/templates.py``. The exercise tests
take the ``impl`` fixture (``tests/conftest.py``), which is ``load_implementation(--impl)``, and
run the grader's checks on it in the pytest process (``python -m pytest tests --impl PATH -m
exercise``): the students' debugging path, with full tracebacks and no isolation. The grader
itself (``grade.py``) never imports a submission.

Files are imported lazily, one at a time, the first time a test asks for one of their names. So
a file that does not import (a syntax error, an exception, an endless loop at import time) costs
only the exercises whose functions live in it: asking for such a name raises ``ImportError``
naming the file and the cause, every time, while names from the other files still work.

``impl.find_the_bug`` holds the functions of ``PATH/find_the_bug/*.py`` (the silent-bug
exercises); for the reference they come from ``minirlhf/homework/find_the_bug/``, the fixed versions.
"""
import ast
import importlib
import importlib.util
import re
import sys
from pathlib import Path

REFERENCE_NAMES = ("minirlhf", "reference", None, "")
PACKAGE = Path(__file__).resolve().parents[1]
FIND_THE_BUG = "find_the_bug"
SOLUTION_MARKER = "# BEGIN SOLUTION"


def load_implementation(path=None):
    """Return a namespace whose attributes are the functions defined in the files under ``path``.

    ``path`` in (None, "", "minirlhf", "reference") gives the reference: the public functions of
    the package files that hold exercises (then anything else ``minirlhf`` exports). A name the
    folder does not define raises ``AttributeError`` saying so, so a test that needs it fails for
    that exercise only.
    """
    if path in REFERENCE_NAMES:
        files = [f for f in _python_files(PACKAGE) if _has_exercises(f)]
        names = {f: "minirlhf." + ".".join(f.relative_to(PACKAGE).with_suffix("").parts) for f in files}
        fixed = sorted((PACKAGE / "homework" / FIND_THE_BUG).glob("[!_]*.py"))
        bugs = {f: f"minirlhf.homework.{FIND_THE_BUG}.{f.stem}" for f in fixed}
        return Implementation("minirlhf (reference)", names, import_by_name=True, fallback="minirlhf",
                              find_the_bug=Implementation("minirlhf (reference)", bugs, import_by_name=True))
    root = Path(path).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"--impl {path}: no such folder")
    tag = "minirlhf_impl_" + re.sub(r"\W", "_", str(root))
    files = {f: tag + "_" + "_".join(f.relative_to(root).with_suffix("").parts) for f in _python_files(root)}
    return Implementation(str(path), files, find_the_bug=_find_the_bug(root / FIND_THE_BUG, tag))


class Implementation:
    """A lazy namespace: ``impl.name`` imports the file that defines ``name`` on first use."""

    def __init__(self, label, files, import_by_name=False, fallback=None, find_the_bug=None):
        self._label, self._files, self._by_name, self._fallback = label, files, import_by_name, fallback
        self._modules = {}  # file -> module, or the ImportError it raised (re-raised on every use)
        self._where = {}  # public name -> file that defines it (the first, in sorted order)
        for file in files:
            for name in _defined_names(file):
                self._where.setdefault(name, file)
        if find_the_bug is not None:
            self.find_the_bug = find_the_bug

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        file = self._where.get(name)
        if file is None:
            if self._fallback:
                return getattr(importlib.import_module(self._fallback), name)
            raise AttributeError(
                f"{self._label} defines no function {name!r} (looked in {len(self._files)} .py file(s); "
                "keep the exercise files' names and layout, e.g. core/gae.py)"
            )
        return getattr(self._module(file), name)

    def __dir__(self):
        return sorted(self._where)

    def _module(self, file):
        if file not in self._modules:
            try:
                if self._by_name:
                    self._modules[file] = importlib.import_module(self._files[file])
                else:
                    self._modules[file] = _load_file(file, self._files[file])
            except BaseException as err:  # noqa: BLE001 - any failure, even a timeout, is the file's fault
                if isinstance(err, KeyboardInterrupt):
                    raise
                problem = ImportError(f"{_short(file)} failed to import: {type(err).__name__}: {err}")
                self._modules[file] = problem
        module = self._modules[file]
        if isinstance(module, ImportError):
            raise ImportError(str(module))
        return module

    def __repr__(self):
        return f"<implementation {self._label}: {len(self._where)} functions>"


def _python_files(root):
    return [
        f
        for f in sorted(root.rglob("*.py"))
        if not any(part.startswith(("_", ".")) or part in ("tests", FIND_THE_BUG) for part in f.relative_to(root).parts)
    ]


def _has_exercises(file):
    if file.name == "build.py":  # its docstring shows the markers
        return False
    return any(line.strip() == SOLUTION_MARKER for line in file.read_text(encoding="utf-8").splitlines())


def _find_the_bug(folder, tag):
    files = {f: f"{tag}_{FIND_THE_BUG}_{f.stem}" for f in sorted(folder.glob("*.py")) if not f.name.startswith("_")}
    return Implementation(str(folder), files)


def _defined_names(file):
    """Public top-level functions and classes of ``file``, read without running it."""
    text = file.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(text)
    except SyntaxError:  # still claim its names, so using them reports the syntax error
        return re.findall(r"^(?:async\s+)?(?:def|class)\s+([A-Za-z]\w*)", text, re.MULTILINE)
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return [node.name for node in tree.body if isinstance(node, kinds) and not node.name.startswith("_")]


def _short(file):
    parts = Path(file).parts
    return "/".join(parts[-3:]) if len(parts) > 3 else str(file)


def _load_file(file, module_name):
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module
