"""Benchmark 6: optimizer-step time of the trainers on 1 process and on N (torchrun, data parallel).

    python benchmarks/bench_data_parallel.py [--json out.json]                    # sft, dpo, grpo; 1 and 2 processes
    python benchmarks/bench_data_parallel.py --algos grpo --processes 1 2 4 --device cuda

Each (trainer, number of processes) trains the toy world as a user would — one process as
``python -m minirlhf <algo>``, N as ``torchrun --standalone --nproc_per_node N -m minirlhf <algo>``,
one thread per process (torchrun's default; the single process gets the same) — for
``--stop-at-step K`` steps, in a worker that timestamps every ``TrainingLog.train`` call. The step
time is the median interval after the first step (start-up, DPO's reference pass and the first
step's warm-up stay out; the median shrugs off a shared machine's load spikes). The process counts
alternate, repeated ``--repeats`` times; the 1-minute load average is recorded around each run.

The ratio reported first is the step time on N processes ÷ on 1 for the same global batch (ideal:
1/N). On a CPU of C cores, N ≤ C processes each get a core; on GPUs, one GPU per process.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)

# Steps per run: the toy world's presets (SFT: 16 examples; DPO: 32 pairs; GRPO: 8 prompts × 16 samples).
STEPS = {"sft": 30, "dpo": 20, "grpo": 6}


def worker(algo, out, steps, device, json_path):
    """Run ``python -m minirlhf <algo>`` in this process, timestamping each optimizer step."""
    from minirlhf.__main__ import main
    from minirlhf.train import metrics
    from minirlhf.train.distributed import is_main

    stamps, train = [], metrics.TrainingLog.train

    def timed_train(self, done, step_metrics):
        stamps.append(time.perf_counter())
        return train(self, done, step_metrics)

    metrics.TrainingLog.train = timed_train
    extra = ["--device", device] if device else []
    main([algo, "--out", out, "--stop-at-step", str(steps), "--no-progress", "--no-tensorboard", "--eval-every", "0",
          *extra])
    if is_main():
        with open(json_path, "w") as f:
            json.dump([b - a for a, b in zip(stamps, stamps[1:])], f)


def run(algo, processes, out, device):
    json_path = out + ".json"
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    argv = launch + [os.path.abspath(__file__), "--worker", algo, out, str(STEPS[algo]), device or "", json_path]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    load_before = os.getloadavg()[0]
    done = subprocess.run(argv, cwd=common.REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    with open(json_path) as f:
        intervals = json.load(f)
    return intervals, (load_before + os.getloadavg()[0]) / 2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algos", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        algo, out, steps, device, json_path = args.worker
        return worker(algo, out, int(steps), device or None, json_path)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for algo in args.algos:
            intervals, loads = {n: [] for n in args.processes}, []
            for repeat in range(args.repeats):
                for n in args.processes:  # alternate the process counts
                    times, load = run(algo, n, os.path.join(tmp, f"{algo}-{n}-{repeat}"), args.device)
                    intervals[n] += times[1:]  # the first interval holds the first step's warm-up
                    loads.append(load)
            step = {n: statistics.median(intervals[n]) for n in args.processes}
            for n in args.processes:
                results.append({"algo": algo, "processes": n, "step_seconds": step[n],
                                "ratio_to_first": step[n] / step[args.processes[0]],
                                "load_average": sum(loads) / len(loads), "intervals": intervals[n]})
    device = args.device or ("cuda" if common.torch.cuda.is_available() else "cpu")
    common.torch.set_num_threads(1)  # what the workers ran with (device_name reports this process's)
    common.print_table("Optimizer-step time (median), toy world",
                       ["trainer", "processes", f"step time ÷ {args.processes[0]} process", "step time (s)", "load average"],
                       [(r["algo"], r["processes"], r["ratio_to_first"], r["step_seconds"], r["load_average"])
                        for r in results])
    print(f"\n{common.device_name(device)}")
    common.write_json(args.json, {"device": common.device_name(device), "results": results})


if __name__ == "__main__":
    main()
