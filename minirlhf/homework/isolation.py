"""Where and how a submission's process runs: a sandbox when the platform has one, limits always.

Isolation levels, best first (``grade --sandbox auto`` takes the first that works here):

- ``bwrap`` (bubblewrap, Debian/Ubuntu package ``bubblewrap``): the whole filesystem read-only,
  a private ``/tmp``, no network, own PID namespace (everything the submission spawned dies with
  it), the real minirlhf package and ``solutions/`` hidden, only ``results/`` writable.
- ``unshare`` (util-linux, user namespaces): the same through ``unshare --user --mount --net
  --pid`` and a read-only remount of ``/``.
- ``none``: no sandbox. The submission runs with the grader's rights; the grader still copies it
  out of its folder, starts it in a temporary folder, blocks delegation, limits its time, kills
  its process group and any process carrying its marker, and checks (and restores) its own files
  after each exercise, but a malicious submission could read or write elsewhere meanwhile.

Limits at every level: RLIMIT_CPU (the exercise's budget plus an allowance for starting Python and
torch), RLIMIT_AS (address space, so a runaway allocation fails in the worker instead of taking the
grading machine's memory), RLIMIT_FSIZE, no core files, a new session (process group), and a wall-clock watchdog.
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

LEVELS = ("bwrap", "unshare", "none")
DESCRIPTIONS = {
    "bwrap": "bubblewrap sandbox: read-only filesystem, private /tmp, no network, own PID namespace",
    "unshare": "user-namespace sandbox (unshare): read-only filesystem, no network, own PID namespace",
    "none": "NO SANDBOX (neither bwrap nor unshare works here): the submission runs with your rights; "
            "time limits, a fresh process per exercise and a check of the grader's files still apply",
}
STARTUP_CPU = 30.0  # CPU seconds for starting Python, torch (and transformers) before the budget starts
WALL_ALLOWANCE = 60.0  # wall seconds on top of 3x the budget before the watchdog kills a process
MAX_FILE_BYTES = 512 * 2**20
MAX_ADDRESS_BYTES = 8 * 2**30  # torch reserves ~2 GiB of address space; an exercise needs well under 1 GiB
BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from minirlhf.homework.worker import main; main(sys.argv[1])"
_WORKING = {}


def available(level):
    """Whether ``level`` can start a process here (tried once, then remembered)."""
    if level == "none":
        return True
    if level not in _WORKING:
        probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"minirlhf-probe-{uuid.uuid4().hex}"
        probe.mkdir()
        try:
            argv = command(level, probe, [], ["/bin/sh", "-c", "true"])
            _WORKING[level] = shutil.which(argv[0]) is not None and subprocess.run(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            _WORKING[level] = False
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    return _WORKING[level]


def choose(requested="auto"):
    """The isolation level to use: ``requested``, or the best available for "auto"."""
    if requested != "auto":
        if not available(requested):
            raise RuntimeError(f"--sandbox {requested}: not available here")
        return requested
    return next(level for level in LEVELS if available(level))


def command(level, workdir, hidden, argv):
    """``argv`` wrapped in the sandbox of ``level``: ``workdir`` visible (read-only but
    ``workdir/results``), each folder in ``hidden`` replaced by an empty one."""
    workdir, results = str(workdir), str(Path(workdir) / "results")
    if level == "bwrap":
        wrapped = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        for path in hidden:
            wrapped += ["--tmpfs", str(path)]
        wrapped += ["--ro-bind", workdir, workdir]
        if Path(results).is_dir():
            wrapped += ["--bind", results, results]
        return wrapped + ["--unshare-all", "--die-with-parent", "--new-session", "--chdir", workdir, "--", *argv]
    if level == "unshare":
        mounts = [f"mount -t tmpfs none {_quote(path)}" for path in hidden]
        if Path(results).is_dir():
            mounts.append(f"mount --bind {_quote(results)} {_quote(results)}")
        mounts.append("mount -o remount,bind,ro /")
        script = " && ".join(mounts) + f' && cd {_quote(workdir)} && exec "$@"'
        return ["unshare", "--user", "--map-root-user", "--mount", "--net", "--pid", "--fork", "--kill-child",
                "--", "/bin/sh", "-c", script, "sh", *argv]
    return list(argv)


def worker_argv(workdir):
    return [sys.executable, "-I", "-B", "-X", "faulthandler", "-c", BOOT, str(workdir)]


def run(argv, workdir, cpu_seconds, log_path):
    """Run ``argv`` under the limits; returns ``(returncode, cpu_seconds_used, stopped_reason or None)``.

    The process starts in a new session; when it ends (or the watchdog fires) its whole process
    group is killed, and so is any process whose environment carries this run's marker.
    """
    marker = f"MINIRLHF_WORKER_{uuid.uuid4().hex}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(Path(workdir) / "results"),
        "TMPDIR": str(Path(workdir) / "results"), "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(Path(workdir) / "results"),
        "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0", marker: "1",
    }
    limits = {"cpu": int(cpu_seconds + STARTUP_CPU) + 1, "as": MAX_ADDRESS_BYTES, "fsize": MAX_FILE_BYTES, "core": 0}
    if shutil.which("prlimit"):  # set in the child before exec (preexec_fn is unsafe with --jobs threads)
        argv = ["prlimit", *(f"--{name}={value}" for name, value in limits.items()), "--", *argv]
    env["MINIRLHF_WORKER_LIMITS"] = json.dumps(limits)  # the worker also sets them on itself, first thing
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   start_new_session=True)
    deadline = time.monotonic() + WALL_ALLOWANCE + 3 * cpu_seconds
    stopped, status, usage = None, None, None
    while status is None:
        pid, raw, rusage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            status, usage = raw, rusage
            break
        if time.monotonic() > deadline:
            stopped = f"stopped by the watchdog after {WALL_ALLOWANCE + 3 * cpu_seconds:.0f} s of wall-clock time"
            _kill_group(process.pid)
        time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    _kill_group(process.pid)
    _kill_marked(marker)
    return process.returncode, usage.ru_utime + usage.ru_stime, stopped


def apply_limits(limits):
    """In the worker, before anything else: the limits ``run`` asked for (when prlimit is missing)."""
    names = {"cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS, "fsize": resource.RLIMIT_FSIZE,
             "core": resource.RLIMIT_CORE}
    for name, value in limits.items():
        soft, hard = resource.getrlimit(names[name])
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(names[name], (value, value))


def exit_reason(returncode):
    """``-11`` -> "killed by SIGSEGV"; bubblewrap and sh report a signal as 128 + N."""
    number = -returncode if returncode < 0 else returncode - 128 if 128 < returncode < 160 else None
    if number:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        extra = " (the CPU-time limit)" if name == "SIGXCPU" else ""
        return f"killed by {name}{extra}"
    return f"exit status {returncode}"


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_marked(marker):
    """Kill every process whose environment carries ``marker`` (one that left the process group)."""
    needle = marker.encode() + b"="
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def _quote(path):
    import shlex

    return shlex.quote(str(path))
