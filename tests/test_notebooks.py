"""The notebooks are tests: execute every ``notebooks/*.ipynb`` top to bottom, check how it is stored, and check
that both notebook tables (README.md, notebooks/README.md) list it.

Each chapter's ``# CHECK`` cells assert that the code matches the math, so a notebook that runs
to the end has passed its checks. Every notebook is its own test (``-k 05_policy``), executed by
nbclient in a fresh ``python3`` kernel with the working directory ``notebooks/``, offline
(``HF_HUB_OFFLINE=1``) and headless (``MPLBACKEND=Agg``). The repository root is put on the
kernel's ``PYTHONPATH``, so the notebooks import this checkout's ``minirlhf`` whether or not it is
pip-installed.

Notebooks are stored without outputs, execution counts and execution timestamps, so that a diff
shows only what a person wrote; ``test_notebook_is_stored_clean`` enforces it and its message
gives the command that strips them (``STRIP_COMMAND``, also in ``notebooks/README.md``).
"""
import os
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "python3"
CELL_TIMEOUT_S = 300  # per cell: a hung cell fails its notebook instead of the whole run
MIN_CHECK_CELLS = 3  # every chapter ties math to code in at least this many asserting cells
STRIP_COMMAND = (
    "jupyter nbconvert --clear-output --ClearMetadataPreprocessor.enabled=True "
    "--ClearMetadataPreprocessor.clear_notebook_metadata=False --inplace notebooks/*.ipynb"
)


def _notebook_id(path):
    return path.stem


def test_notebooks_present():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_notebook_id)
def test_notebook_is_stored_clean(path):
    """Stored stripped (no outputs, no execution counts), with the python3 kernel, and a real chapter:
    at least ``MIN_CHECK_CELLS`` asserting code cells and an Exercises pointer."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    strip = f"strip it with `{STRIP_COMMAND}`"
    for index, cell in enumerate(notebook.cells):
        assert "execution" not in cell.metadata, f"{path.name}: cell {index} stores execution timestamps; {strip}"
        if cell.cell_type != "code":
            continue
        assert not cell.outputs, f"{path.name}: code cell {index} is stored with outputs; {strip}"
        assert cell.execution_count is None, f"{path.name}: code cell {index} has an execution count; {strip}"
    kernelspec = notebook.metadata.get("kernelspec", {})
    assert kernelspec.get("name") == KERNEL, f"{path.name}: kernelspec is {kernelspec!r}, expected name {KERNEL!r}"
    checks = [c for c in notebook.cells if c.cell_type == "code" and "assert " in c.source]
    assert len(checks) >= MIN_CHECK_CELLS, (
        f"{path.name}: {len(checks)} code cells assert something; a chapter needs at least {MIN_CHECK_CELLS}"
    )
    assert any(c.cell_type == "markdown" and "## Exercises" in c.source for c in notebook.cells), (
        f"{path.name}: no '## Exercises' section pointing to the matching homework exercise"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_notebook_id)
def test_notebook_is_listed_in_both_tables(path):
    """A chapter a newcomer cannot find does not exist: each notebook has a row in the README's notebook table and in
    notebooks/README.md's, linking to it."""
    for readme, link in ((REPO / "README.md", f"(notebooks/{path.name})"), (NOTEBOOK_DIR / "README.md", f"({path.name})")):
        rows = [line for line in readme.read_text().splitlines() if line.startswith("|") and link in line]
        assert len(rows) == 1, f"{readme.relative_to(REPO)}: expected one table row linking {link}, found {len(rows)}"


@pytest.fixture(scope="session")
def python3_kernel():
    """Fail with an actionable message when Jupyter has no python3 kernel to run the notebooks."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
        return KERNEL
    except NoSuchKernel:
        pass  # fail outside the handler: the message is the whole story, no chained traceback
    pytest.fail(
        f"Jupyter has no {KERNEL!r} kernel, so the notebooks cannot run. Install ipykernel "
        "(`pip install ipykernel`; it is in requirements.txt) or register this interpreter's kernel "
        "with `python -m ipykernel install --user`.",
        pytrace=False,
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_notebook_id)
def test_notebook_runs(path, python3_kernel):
    """Run every cell of the notebook; any failing ``assert`` (or error) fails the test with its traceback."""
    notebook = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    client = NotebookClient(
        notebook,
        kernel_name=python3_kernel,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # the kernel's working directory
    )
    start = time.perf_counter()
    try:
        client.execute(env=env)
        failure = None
    except (CellExecutionError, CellTimeoutError) as error:
        failure = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # the kernel's traceback is ANSI-coloured
    if failure:
        pytest.fail(f"{path.name} failed:\n{failure}", pytrace=False)
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
