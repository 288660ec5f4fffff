"""Atomic writes: a file or a directory is either the old one or the complete new one.

Everything minirlhf writes that a crash could leave half-done goes through here: checkpoints,
``args.json`` and the metrics CSVs of a run, DPO's cached reference log-probs, the toy world's
cache, JSONL outputs, reports and plots. The recipe is always the same: write under a temporary
name in the target's own directory, flush and ``fsync``, then rename onto the target (a rename
within one file system is atomic). It lives in ``data/``, the lowest layer that writes files.
"""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path, mode="w", **open_kwargs):
    """``with atomic_file(path) as f:`` writes ``f`` to a temporary file beside ``path``; when the
    block ends it is fsynced and renamed onto ``path``. If the block raises, the temporary file is
    deleted and ``path`` keeps its old content. Creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with open(handle, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_file(path, encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def write_jsonl_atomic(path, records):
    """Write ``records`` as JSON lines (UTF-8, non-ASCII kept as is) to ``path`` atomically."""
    with atomic_file(path, encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return Path(path)


def write_dir_atomic(final, write, keep_existing=False):
    """Create directory ``final`` by calling ``write(tmp_dir)``, then renaming ``tmp_dir`` into place.

    Every file is fsynced before the rename, so ``final`` either does not exist or is complete.
    An existing ``final`` is replaced (moved aside first, deleted after the rename); with
    ``keep_existing=True`` it is kept instead and the new one discarded (a cache that another
    process finished first). If ``write`` raises, nothing is left behind. Returns ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        write(tmp)
        _fsync_tree(tmp)
        if keep_existing:
            try:
                os.rename(tmp, final)  # fails when another process created `final` meanwhile
            except OSError:
                if not final.exists():
                    raise
            return final
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there when we did not rename it
    return final


def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
