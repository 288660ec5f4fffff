"""Benchmark 5: wall time of the main job and of the test suite on 2 CPU cores.

    python benchmarks/bench_end_to_end.py [--json out.json]       # pipeline, pipeline --quick, pytest
    python benchmarks/bench_end_to_end.py --only pipeline-quick   # one of: pipeline, pipeline-quick, tests

Each command runs once, as a user would run it, in a fresh process pinned to 2 CPU cores (the
first two the machine has), offline (``HF_HUB_OFFLINE=1``), from the repository root:

- ``python -m minirlhf pipeline --out <tmp>``: the whole toy-world pipeline (target ≤ 10 min),
  as a first run: with an empty toy-world cache (``MINIRLHF_CACHE=<tmp>``), so the time includes
  building the toy world and its SFT policy (``--warm-cache`` uses the existing cache instead);
- ``python -m minirlhf pipeline --quick --out <tmp>``: its smoke preset (target ≤ 1 min), with
  the existing toy-world cache, as after a first run;
- ``python -m pytest -q``: the whole test suite (target ≤ 15 min), with its 10 slowest tests.

The ratio reported first is wall time ÷ target (< 1 = within target). On a shared machine the same
command takes longer under load, so the 1-minute load average before and after each run is
recorded, and the CPU time (user + system of the command and its children), which load inflates
much less: on an idle 2-core machine the wall time would be about CPU time ÷ (cores kept busy).
"""
import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)

TARGETS = {"pipeline": 600.0, "pipeline-quick": 60.0, "tests": 900.0}  # seconds


def commands(out_dir):
    python = sys.executable
    return {
        "pipeline": [python, "-m", "minirlhf", "pipeline", "--out", os.path.join(out_dir, "pipeline")],
        "pipeline-quick": [python, "-m", "minirlhf", "pipeline", "--quick", "--out", os.path.join(out_dir, "quick")],
        "tests": [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10"],
    }


def pin_to_two_cores():
    """Run the child on the first two CPUs (a no-op on a 2-core machine)."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    os.sched_setaffinity(0, cpus)


def run(name, command, cache_dir=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    if cache_dir:
        env["MINIRLHF_CACHE"] = cache_dir
    load_before = os.getloadavg()[0]
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=common.REPO_ROOT, env=env, capture_output=True, text=True,
                          preexec_fn=pin_to_two_cores)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    output = done.stdout + done.stderr
    result = {
        "command": " ".join(["python"] + command[1:]),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "target_seconds": TARGETS[name],
        "ratio_to_target": seconds / TARGETS[name],
        "returncode": done.returncode,
        "toy_world_cache": "empty (first run)" if cache_dir else "existing",
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "output_tail": output[-3000:],
    }
    if name.startswith("pipeline"):  # the pipeline logs "[  934 s] [ppo] 100 s -> <path>" per stage
        result["stages"] = {m[1]: float(m[2]) for m in re.finditer(r"\] \[(\w+)\] (\d+) s ->", output)}
    if name == "tests":
        summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
        result["summary"] = summary[-1].strip("= ") if summary else None
        slowest = output.split("slowest 10 durations", 1)
        result["slowest"] = [line for line in slowest[1].splitlines()[1:12] if re.match(r"\s*\d", line)] \
            if len(slowest) == 2 else []
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=list(TARGETS), action="append",
                        help="run only this (repeatable; default: all three)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="run the full pipeline with the existing toy-world cache (default: an empty one)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    names = args.only or list(TARGETS)

    results = {}
    with tempfile.TemporaryDirectory(prefix="minirlhf-e2e-") as out_dir:
        for name in names:
            print(f"running {name} ...", flush=True)
            cold = name == "pipeline" and not args.warm_cache
            results[name] = run(name, commands(out_dir)[name], os.path.join(out_dir, "cache") if cold else None)
            if results[name]["returncode"] != 0:
                print(f"{name} exited with {results[name]['returncode']}:\n{results[name]['output_tail']}")

    device = f"{common.device_name('cpu').split(',')[0]}, pinned to 2 cores"
    common.print_table(
        "end to end: wall time ÷ target (< 1 = within target)",
        ["command", "time ÷ target", "target", "exit status"],
        [[r["command"].split(" --out")[0], r["ratio_to_target"], f"{r['target_seconds'] / 60:g} min",
          r["returncode"]] for r in results.values()],
    )
    common.print_table(
        f"absolute, on {device}",
        ["command", "wall time (s)", "CPU time (s)", "toy-world cache", "load average before → after", "result"],
        [[r["command"].split(" --out")[0], r["seconds"], r["cpu_seconds"],
          r["toy_world_cache"] if "pipeline" in r["command"] else "–",
          f"{r['load_before']:.1f} → {r['load_after']:.1f}",
          r.get("summary") or ("ok" if r["returncode"] == 0 else "failed")] for r in results.values()],
    )
    for r in results.values():
        if r.get("stages"):
            print(f"\n{r['command'].split(' --out')[0]}, seconds per stage: "
                  + ", ".join(f"{stage} {t:g}" for stage, t in r["stages"].items()))
    if "tests" in results and results["tests"]["slowest"]:
        print("\nslowest tests:\n" + "\n".join(results["tests"]["slowest"]))
    common.write_json(args.json, {"benchmark": "end to end", "device": device, "results": results})


if __name__ == "__main__":
    main()
