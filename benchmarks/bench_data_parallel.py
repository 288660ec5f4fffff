"""Benchmark 6: optimizer-step time of the trainers on 1 process and on N (torchrun, data parallel).

    python benchmarks/bench_data_parallel.py [--json out.json]                    # sft, dpo, grpo; 1 and 2 processes
    python benchmarks/bench_data_parallel.py --algos grpo --processes 1 2 4 --device cuda

Each (trainer, number of processes) runs the toy world twice as a user would, with
``--stop-at-step K1`` and ``--stop-at-step K2`` into fresh directories: one process as
``python -m minirlhf <algo>``, N as ``torchrun --standalone --nproc_per_node N -m minirlhf <algo>``
(one thread per process: torchrun's default, and the single process gets the same). The step time
is ``(T(K2) − T(K1)) / (K2 − K1)``: start-up (imports, loading, DPO's reference pass) cancels.
The runs of different process counts alternate, so a shared machine's drifting load hits them
alike; the 1-minute load average is recorded around each run.

The ratio reported first is the step time on N processes ÷ on 1 (ideal: 1/N for the same global
batch). On a CPU of C cores, N ≤ C processes each get a core; on GPUs, one GPU per process.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)

# (K1, K2) per trainer: the toy world's presets (SFT: batch 16; DPO: 32 pairs; GRPO: 8 prompts × 16 samples).
STEPS = {"sft": (4, 24), "dpo": (4, 24), "grpo": (2, 8)}


def command(algo, processes, stop_at_step, out, device):
    launch = [sys.executable, "-m", "minirlhf"]
    if processes > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                  "-m", "minirlhf"]
    extra = ["--device", device] if device else []
    return launch + [algo, "--out", out, "--stop-at-step", str(stop_at_step), "--no-progress", "--no-tensorboard",
                     "--eval-every", "0", *extra]


def timed_run(argv):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=common.REPO_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return seconds, (load_before + os.getloadavg()[0]) / 2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algos", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for algo in args.algos:
            k1, k2 = STEPS[algo]
            times = {n: {} for n in args.processes}
            loads = []
            for k in (k1, k2):
                for n in args.processes:  # alternate the process counts
                    seconds, load = timed_run(command(algo, n, k, os.path.join(tmp, f"{algo}-{n}-{k}"), args.device))
                    times[n][k] = seconds
                    loads.append(load)
            step = {n: (times[n][k2] - times[n][k1]) / (k2 - k1) for n in args.processes}
            for n in args.processes:
                results.append({"algo": algo, "processes": n, "step_seconds": step[n],
                                "ratio_to_1": step[n] / step[args.processes[0]], "load_average": sum(loads) / len(loads),
                                "wall_seconds": times[n]})
    device = args.device or ("cuda" if common.torch.cuda.is_available() else "cpu")
    common.print_table("Optimizer-step time, toy world", ["trainer", "processes", f"step time ÷ {args.processes[0]} process",
                       "step time (s)", "load average"],
                       [(r["algo"], r["processes"], r["ratio_to_1"], r["step_seconds"], r["load_average"]) for r in results])
    print(f"\n{common.device_name(device)}")
    common.write_json(args.json, {"device": common.device_name(device), "results": results})


if __name__ == "__main__":
    main()
