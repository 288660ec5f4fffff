"""The one script to run when a GPU is lent: every CUDA check and figure, in under 5 minutes, in one JSON.

    python benchmarks/gpu_check.py --out gpu_check.json                 # one CUDA GPU
    python benchmarks/gpu_check.py --device cpu --tiny --out dry.json   # the same code path on a CPU, < 1 minute

Sections, each in its own process with its own timeout (a failure or a hang loses that section
only; the JSON is rewritten after every section, so a crash keeps what was measured):

1. ``cuda_tests``: ``pytest -m cuda tests/test_cuda.py`` (fused head = unfused in bf16/fp16, LoRA
   on CUDA, float32 log-probs under autocast, the allocator's memory figures);
2. ``bench_logprobs``, ``bench_fused_head``, ``bench_dpo_step`` (MFU), ``bench_grpo_step``: the
   benchmark scripts with ``--device cuda``; their own JSON goes into this one;
3. ``train_dpo_<variant>`` (20 steps) and ``train_grpo_<variant>`` (10 steps): the trainers'
   command lines (``python -m minirlhf dpo|grpo``) on a random Qwen2.5-0.5B-shaped model and
   random-word data (``common.write_word_setup``), with wall time and
   ``torch.cuda.max_memory_allocated``; one DPO run per entry of ``TRAIN_VARIANTS`` (bf16, fp16,
   gradient checkpointing, LoRA r = 16, fused head), GRPO for those in ``GRPO_VARIANTS``.

``--tiny`` shrinks every section (the CPU-sized model, a few steps) so that ``--device cpu
--tiny`` runs the same code in under a minute; ``tests/test_gpu_check.py`` runs it.
"""
import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py; it also puts the repository on sys.path)

BENCHMARKS = Path(common.REPO_ROOT) / "benchmarks"
# Extra command-line flags per training run, one run of DPO each (the memory levers: README,
# "Memory on one GPU"); the variants in GRPO_VARIANTS run GRPO too. bf16 is what --precision auto
# picks on a GPU that has it; fp16 (with loss scaling) is what a T4 gets.
TRAIN_VARIANTS = {
    "bf16": ["--precision", "bf16"],
    "fp16": ["--precision", "fp16"],
    "checkpointing": ["--precision", "bf16", "--gradient-checkpointing"],
    "lora16": ["--precision", "bf16", "--lora-rank", "16"],
    "fused_head": ["--precision", "bf16", "--fused-head"],
}
GRPO_VARIANTS = ("bf16", "fp16", "lora16")


def sections(args, setup, scratch):
    """``[(name, command, timeout seconds, json file or None)]``; sizes depend on ``--tiny``."""
    python, tiny = sys.executable, args.tiny
    device = ["--device", args.device]

    def bench(name, extra, timeout):
        out = scratch / f"{name}.json"
        return name, [python, str(BENCHMARKS / f"{name}.py"), *device, "--json", str(out), *extra], timeout, out

    small = dict(
        logprobs=["--variants", "ours", "--dtypes", "bfloat16", "--batch", "1", "--length", "16", "--vocab", "4096",
                  "--repeats", "1"],
        fused=["--shape", "tiny", "--pairs", "1", "--prompt-len", "16", "--response-len", "8", "--repeats", "1",
               "--warmup", "0"],
        dpo=["--shape", "toy", "--pairs", "1", "--prompt-len", "16", "--response-len", "8", "--repeats", "1",
             "--warmup", "0"],
        grpo=["--shape", "toy", "--prompts", "2", "--group-size", "2", "--prompt-len", "8", "--max-new-tokens", "4",
              "--compare-rows", "2", "--compare-repeats", "1", "--repeats", "1", "--warmup", "0"],
    )
    full = dict(logprobs=["--variants", "ours,naive", "--repeats", "3"], fused=["--repeats", "3"], dpo=["--repeats", "3"],
                grpo=["--repeats", "2", "--max-new-tokens", "64", "--compare-repeats", "1"])
    sizes = small if tiny else full
    result = [
        ("cuda_tests", [python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_cuda.py",
                        "--junitxml", str(scratch / "cuda_tests.xml")], 120, scratch / "cuda_tests.xml"),
        bench("bench_logprobs", sizes["logprobs"], 90),
        bench("bench_fused_head", sizes["fused"], 90),
        bench("bench_dpo_step", sizes["dpo"], 120),
        bench("bench_grpo_step", sizes["grpo"], 120),
    ]
    dpo_steps, grpo_steps = (2, 2) if tiny else (20, 10)
    for variant, flags in TRAIN_VARIANTS.items():
        dpo = ["dpo", "--model", str(setup / "model"), "--data", str(setup / "pairs.jsonl"), "--template",
               "trl_standard", "--eval-data", str(setup / "eval_pairs.jsonl"), "--eval-template", "trl_standard",
               "--batch-size", "2" if tiny else "8", "--max-len", "256", "--stop-at-step", str(dpo_steps),
               "--lr", "1e-6", "--out", str(scratch / f"dpo_{variant}"), *device, *flags]
        grpo = ["grpo", "--model", str(setup / "model"), "--data", str(setup / "prompts.jsonl"), "--template",
                "prompt", "--reward", "math", "--steps", str(grpo_steps), "--batch-size", "2" if tiny else "8",
                "--group-size", "2" if tiny else "8", "--max-new-tokens", "8" if tiny else "64",
                "--lr", "1e-6", "--out", str(scratch / f"grpo_{variant}"), *device, *flags]
        runs = [(f"train_dpo_{variant}", dpo)] + ([(f"train_grpo_{variant}", grpo)] if variant in GRPO_VARIANTS else [])
        for name, argv in runs:
            out = scratch / f"{name}.json"
            result.append((name, [python, os.path.abspath(__file__), "--train-worker", str(out), "--",
                                  *argv, "--no-progress", "--no-tensorboard"], 150, out))
    return result


def run_section(command, timeout, env):
    """Run ``command`` in its own process group; kill the whole group on timeout. ``(rc, seconds, log)``."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=common.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True, env=env)
    try:
        log, _ = process.communicate(timeout=timeout)
        rc = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the section's workers too
        log, _ = process.communicate()
        rc = None
    return rc, time.perf_counter() - start, log


def read_figures(path):
    """A section's figures: its JSON, or pytest's JUnit counts; None if it wrote nothing."""
    if path is None or not Path(path).exists():
        return None
    if str(path).endswith(".xml"):
        suite = ElementTree.parse(path).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        failed = [case.get("name") for case in suite.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
        return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")} | {"failed": failed}
    return json.loads(Path(path).read_text())


def train_worker(out, argv):
    """Run ``python -m minirlhf <argv>`` in this process; write wall time and peak memory to ``out``."""
    import torch

    from minirlhf.__main__ import main as minirlhf_main

    cuda = torch.cuda.is_available() and "cpu" not in argv
    memory = common.PeakMemory("cuda" if cuda else "cpu").start()
    start = time.perf_counter()
    rc = minirlhf_main(argv)
    figures = {"returncode": rc, "seconds": time.perf_counter() - start,
               "peak_memory_bytes": memory.peak(), "memory": "max_memory_allocated" if cuda else "peak RSS"}
    Path(out).write_text(json.dumps(figures))
    return rc


def write_atomic(path, summary):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized models and a few steps (a dry run)")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON of figures")
    parser.add_argument("--only", action="append", help="run only this section (repeatable)")
    parser.add_argument("--train-worker", help=argparse.SUPPRESS)  # JSON path; the trainer's argv follows "--"
    args, rest = parser.parse_known_args()
    if args.train_worker:
        sys.exit(train_worker(args.train_worker, rest[1:] if rest[:1] == ["--"] else rest))
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny for a dry run")
    started = time.perf_counter()
    summary = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": common.device_name(args.device), "torch": torch.__version__, "tiny": args.tiny,
               "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=common.REPO_ROOT, capture_output=True,
                                        text=True).stdout.strip(), "sections": {}}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        shape = "tiny" if args.tiny else "qwen2.5-0.5b"
        setup = common.write_word_setup(scratch / "setup", shape, pairs=4 if args.tiny else 160, eval_pairs=4,
                                        prompts=8 if args.tiny else 80, words=24 if args.tiny else 60,
                                        dtype=None if args.tiny else torch.bfloat16, device=args.device)
        # On a CPU, one thread per process: the sections' small ops spend two threads' time waiting
        # for each other (a tiny GRPO run took 36 s with two, 5 s with one, on 2 shared cores).
        env = {**os.environ, "HF_HUB_OFFLINE": "1"} | ({"OMP_NUM_THREADS": "1"} if args.device == "cpu" else {})
        for name, command, timeout, figures in sections(args, setup, scratch):
            if args.only and name not in args.only:
                continue
            rc, seconds, log = run_section(command, timeout, env)
            summary["sections"][name] = {"ok": rc == 0, "returncode": rc, "timed_out": rc is None,
                                         "seconds": round(seconds, 2), "figures": read_figures(figures),
                                         "log_tail": log[-3000:]}
            print(f"{name:<24} {'ok' if rc == 0 else 'TIMED OUT' if rc is None else f'FAILED (rc {rc})':<14} "
                  f"{seconds:6.1f} s", flush=True)
            write_atomic(args.out, summary)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    write_atomic(args.out, summary)
    failed = [name for name, section in summary["sections"].items() if not section["ok"]]
    print(f"wrote {args.out} in {summary['seconds']} s; " + (f"FAILED: {', '.join(failed)}" if failed else "all ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
