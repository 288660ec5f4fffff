"""Benchmark 1: memory and time of log-prob gathering at Qwen's vocabulary size.

    python benchmarks/bench_logprobs.py [--json out.json]            # CPU: B=2, T=256, fp32 and bf16
    python benchmarks/bench_logprobs.py --device cuda --json out.json  # GPU: B=8, T=1024, bf16

Every (variant, mode, dtype) runs in a fresh subprocess, so one measurement cannot inherit
another's allocator state. Peak extra memory is the peak over the call minus the memory held
just before it (on CPU the process's peak RSS, reset through /proc/self/clear_refs; on CUDA
``torch.cuda.max_memory_allocated``), minus the one gradient tensor for forward+backward, as a
multiple of the logits tensor's bytes. Time is the median of ``--repeats`` calls, as a ratio to
the naive variant of the same mode and dtype timed alternately in the same process. Error is the max |log-prob − float64 reference| over
the first row. Targets for ``ours``: extra ≤ 0.15×, time ≤ 1.2× naive.
"""
import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from minirlhf import gather_logprobs  # noqa: E402

VARIANTS = {
    # what minirlhf does: chunked forward, hand-written chunked backward
    "ours": gather_logprobs,
    # what most code does: a full log-softmax in the logits' dtype, then gather
    "naive": lambda z, y: torch.log_softmax(z, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1).float(),
    # the same, upcast first for bf16 accuracy: a full float32 copy plus a full float32 log-softmax
    "naive_fp32": lambda z, y: torch.log_softmax(z.float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1),
    # gather minus a vectorised logsumexp: logsumexp still allocates a full z − max temporary
    "logsumexp": lambda z, y: (z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)).float(),
    # TRL's selective_log_softmax for bf16: a float32 log-softmax one sequence at a time
    "per_row": lambda z, y: torch.stack(
        [torch.log_softmax(zb.float(), -1).gather(-1, yb.unsqueeze(-1)).squeeze(-1) for zb, yb in zip(z, y)]
    ),
}
MODES = ("forward", "forward+backward")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, help="B (default 2 on CPU, 8 on CUDA)")
    parser.add_argument("--length", type=int, help="T (default 256 on CPU, 1024 on CUDA)")
    parser.add_argument("--vocab", type=int, default=151936, help="V (default: Qwen2.5's 151,936)")
    parser.add_argument("--dtypes", help="comma-separated (default float32,bfloat16 on CPU; bfloat16 on CUDA)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "variant/mode/dtype": measure one, print JSON
    args = parser.parse_args()
    on_cuda = args.device == "cuda"
    args.batch = args.batch or (8 if on_cuda else 2)
    args.length = args.length or (1024 if on_cuda else 256)
    args.dtypes = args.dtypes or ("bfloat16" if on_cuda else "float32,bfloat16")
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(measure(args, *args.worker.split("/"))))
        return

    results = []
    for dtype in args.dtypes.split(","):
        for mode in MODES:
            for variant in args.variants.split(","):
                r = run_worker(args, variant, mode, dtype)
                results.append(r)
                print(f"{dtype:>9} {mode:>16} {variant:>10}: extra {r['extra_ratio']:.3f}x logits, "
                      f"{r['time_ratio']:.2f}x naive time", flush=True)  # fmt: skip
    summary = {
        "benchmark": "log-prob gathering",
        "device": _device_name(args.device, args.threads),
        "shape": {"B": args.batch, "T": args.length, "V": args.vocab},
        "torch": torch.__version__,
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    _print_table(summary)


def run_worker(args, variant, mode, dtype):
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", f"{variant}/{mode}/{dtype}",
        "--device", args.device, "--batch", str(args.batch), "--length", str(args.length),
        "--vocab", str(args.vocab), "--repeats", str(args.repeats),
    ] + (["--threads", str(args.threads)] if args.threads else [])  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker {variant}/{mode}/{dtype} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args, variant, mode, dtype_name):
    """One measurement, in this (fresh) process."""
    device, dtype, backward = torch.device(args.device), getattr(torch, dtype_name), mode != "forward"
    fn = VARIANTS[variant]

    def call(z, y, fn=fn):
        if not backward:
            with torch.no_grad():
                return fn(z, y), None
        z.requires_grad_(True)
        out = fn(z, y)
        (grad,) = torch.autograd.grad(out, z, torch.ones_like(out))
        z.requires_grad_(False)
        return out, grad

    generator = torch.Generator(device).manual_seed(0)
    logits = torch.randn(args.batch, args.length, args.vocab, dtype=dtype, device=device, generator=generator)
    logits.mul_(3)
    labels = torch.randint(0, args.vocab, (args.batch, args.length), device=device, generator=generator)
    call(logits[:1, :4].clone(), labels[:1, :4])  # load kernels and thread pools before measuring

    memory = _CudaMemory() if device.type == "cuda" else _RssMemory()
    memory.start()
    out, grad = call(logits, labels)
    extra = memory.peak_extra() - (grad.numel() * grad.element_size() if grad is not None else 0)
    del out, grad

    # Time this variant and the naive one alternately in this process: on a shared machine the
    # load drifts, and alternating exposes both to the same drift.
    seconds = {variant: [], "naive": []}
    for _ in range(args.repeats):
        for name in seconds:
            _sync(device)
            start = time.perf_counter()
            call(logits, labels, VARIANTS[name])
            _sync(device)
            seconds[name].append(time.perf_counter() - start)

    with torch.no_grad():  # accuracy on the first sequence, against float64
        out = fn(logits[:1], labels[:1]).double()
        reference = torch.log_softmax(logits[:1].double(), -1).gather(-1, labels[:1].unsqueeze(-1)).squeeze(-1)
        error = (out - reference).abs().max().item()
    return {
        "variant": variant,
        "mode": mode,
        "dtype": dtype_name,
        "logits_bytes": logits.numel() * logits.element_size(),
        "extra_bytes": extra,
        "extra_ratio": extra / (logits.numel() * logits.element_size()),
        "seconds": statistics.median(seconds[variant]),
        "time_ratio": statistics.median(seconds[variant]) / statistics.median(seconds["naive"]),
        "max_abs_error": error,
    }


class _RssMemory:
    """Peak resident memory (VmHWM) since ``start``, minus the resident memory at ``start``."""

    def start(self):
        gc.collect()
        if platform.system() == "Linux":
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the baseline is honest
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        self.baseline = self._status("VmRSS")

    def peak_extra(self):
        return self._status("VmHWM") - self.baseline

    @staticmethod
    def _status(field):
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024


class _CudaMemory:
    def start(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.baseline = torch.cuda.memory_allocated()

    def peak_extra(self):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.baseline


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_name(device, threads):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {threads or torch.get_num_threads()} torch threads"


def _print_table(summary):
    shape = summary["shape"]
    print(f"\n{summary['benchmark']}: B={shape['B']} T={shape['T']} V={shape['V']} on {summary['device']}")
    print("| dtype | mode | variant | peak extra / logits | time / naive | max abs error |")
    print("|---|---|---|---|---|---|")
    for r in summary["results"]:
        print(
            f"| {r['dtype']} | {r['mode']} | {r['variant']} | {r['extra_ratio']:.3f} | "
            f"{r['time_ratio']:.2f} | {r['max_abs_error']:.1e} |"
        )


if __name__ == "__main__":
    main()
