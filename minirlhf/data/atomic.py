"""Atomic writes: a file or a directory is either the old one or the complete new one.

Everything minirlhf writes that a crash could leave half-done goes through here: checkpoints,
``args.json`` and the metrics CSVs of a run, DPO's cached reference log-probs, the toy world's
cache, JSONL outputs, reports and plots. The recipe is always the same: write under a temporary
name in the target's own directory, flush and ``fsync``, then rename onto the target (a rename
within one file system is atomic). It lives in ``data/``, the lowest layer that writes files.

A process killed mid-write (``kill -9``, out of memory, a pre-empted job) cannot clean up, so every
temporary name says who made it: ``.NAME.tmp-HOST-PID-XXXXXXXX`` (and ``.NAME.old-HOST-PID-XXXXXXXX``
for a directory moved aside while it is replaced). ``remove_stale_temporaries`` deletes the ones
whose process is gone — each writer does it for its own target, and a run does it for its whole
directory when it starts — and never touches those of a live process.
"""
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

# .NAME.tmp-HOST-PID-RANDOM: the random part has no "-", so the last two fields are PID and RANDOM.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+$")
# What versions before the PID in the name wrote: .NAME.tmp-RANDOM (mkdtemp/mkstemp) or .NAME.old-PID.
_UNTAGGED_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp-[a-z0-9_]+|old-\d+)$")


def _temporary_prefix(name, kind="tmp"):
    return f".{name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def _process_is_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(directory, name=None, untagged=None):
    """Delete the temporaries that killed writers left in ``directory``; returns their names.

    A temporary is stale when it was made on this host by a process that is no longer alive.
    ``untagged(target)`` → True also counts ``target``'s temporaries without a process id (from
    older versions; only for a directory with one writer, such as a run directory). ``name``
    limits this to one target's temporaries. A directory moved aside for a replacement
    (``.NAME.old-…``) is moved back when ``NAME`` is missing — the crash fell between the two
    renames — and deleted otherwise.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        match = _TEMPORARY.match(entry.name)
        if match is not None:
            if match["host"] != socket.gethostname() or _process_is_alive(int(match["pid"])):
                continue
            target, is_old = match["name"], match["kind"] == "old"
        elif untagged is not None and (untagged_match := _UNTAGGED_TEMPORARY.match(entry.name)):
            target, is_old = untagged_match["name"], ".old-" in entry.name
            if not untagged(target):
                continue
        else:
            continue
        if name is not None and target != name:
            continue
        if is_old and not (directory / target).exists():
            os.replace(entry, directory / target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


@contextlib.contextmanager
def atomic_file(path, mode="w", **open_kwargs):
    """``with atomic_file(path) as f:`` writes ``f`` to a temporary file beside ``path``; when the
    block ends it is fsynced and renamed onto ``path``. If the block raises, the temporary file is
    deleted and ``path`` keeps its old content. Creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path.name))
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
    process finished first). If ``write`` raises, nothing is left behind; if the process is killed,
    the next writer of ``final`` removes what it left (``remove_stale_temporaries``). Returns ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_temporary_prefix(final.name)))
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
            old = final.parent / (_temporary_prefix(final.name, "old") + secrets.token_hex(4))
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there when we did not rename it
    return final


def remove_dir(path):
    """Delete the file or directory ``path`` so that a crash midway leaves nothing half-deleted under
    its name: it is first renamed to a temporary name (one atomic step), then deleted."""
    path = Path(path)
    doomed = path.parent / (_temporary_prefix(path.name) + secrets.token_hex(4))
    try:
        os.replace(path, doomed)
    except FileNotFoundError:  # already gone (another process removed it first)
        return
    if doomed.is_dir() and not doomed.is_symlink():
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        doomed.unlink()


def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
