"""Benchmark 7: our DPO trainer against TRL's ``DPOTrainer`` on the same model and data.

    /tmp/peers-venv/bin/python benchmarks/bench_vs_trl.py [--json out.json]   # CPU, 1 thread
    /tmp/peers-venv/bin/python benchmarks/bench_vs_trl.py --device cuda       # GPU (bf16 autocast / bf16=True)

TRL is a peer, never a dependency: install it in a separate environment that keeps this
project's torch and transformers (``python -m venv --system-site-packages /tmp/peers-venv &&
/tmp/peers-venv/bin/pip install trl -c <(printf 'torch==2.13.0\\ntransformers==5.24.0\\n')``) and
run this script with that environment's python; it is imported only in TRL's worker.

Setup (``common.write_word_setup`` in ``--workdir``): a random ``Qwen2ForCausalLM`` (hidden 256,
4 layers, 4/2 heads, MLP 1,024, Qwen's 151,936-token vocabulary, tied embeddings; shape
``tiny-qwen-vocab``), a word-level tokenizer without a chat template (one token per word), and 256
preference pairs of random words in TRL's standard format (``prompt``, ``chosen``, ``rejected``:
60 words each, so prompt + response = 121 tokens ≤ ``max_len`` 128, nothing truncated). Both run one epoch at
batch 8 (32 optimizer steps), β = 0.1, lr 1e-6, float32 on CPU, in a fresh process each:

- **ours**: ``train_dpo(DPOArgs(...))`` — the public API: reference log-probs cached once, one
  ``[2B, L]`` forward per step; it also evaluates 8 held-out pairs at the end, writes its final
  checkpoint and ``<out>/final``.
- **TRL**: ``DPOTrainer(...).train()`` then ``save_model``; TRL's defaults except
  ``gradient_checkpointing=False`` (TRL 1.x turns it on by default; ours has none yet, so both
  run without it; ``--trl-gradient-checkpointing`` restores TRL's default), no checkpoints, no
  evaluation, no logging integrations. TRL runs π_ref every step (``precompute_ref_log_probs``
  off by default) and its default optimizer is ``adamw_torch_fused``.

Reported: wall time of the job (model loading, tokenisation, training, saving; after imports)
and the peak resident set (VmHWM) of each process, as ratios TRL ÷ ours (> 1: ours is better).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py; it also puts the repository on sys.path)

PAIRS, EVAL_PAIRS, MAX_LEN, BATCH = 256, 8, 128, 8


def run_ours(workdir, out, device):
    from minirlhf.train.dpo import DPOArgs, train_dpo

    train_dpo(DPOArgs(model=str(workdir / "model"), data=str(workdir / "pairs.jsonl"), template="trl_standard",
                      eval_data=str(workdir / "eval_pairs.jsonl"), eval_template="trl_standard", out=str(out),
                      batch_size=BATCH, max_len=MAX_LEN, epochs=1.0, lr=1e-6, beta=0.1, device=device,
                      progress=False, tensorboard=False, seed=0))


def run_trl(workdir, out, device, gradient_checkpointing):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    data = load_dataset("json", data_files=str(workdir / "pairs.jsonl"), split="train")
    config = DPOConfig(output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=1e-6,
                       beta=0.1, max_length=MAX_LEN, gradient_checkpointing=gradient_checkpointing,
                       save_strategy="no", report_to="none", logging_steps=8, disable_tqdm=True, seed=0,
                       use_cpu=device == "cpu", bf16=device == "cuda", dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(Path(out) / "final"))


def worker(args):
    """Fresh process: one job; prints its wall time and peak RSS (or CUDA peak) as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker == "trl":
        import trl  # noqa: F401  (import time is not the job's)
    else:
        import minirlhf.train.dpo  # noqa: F401
    memory = common.PeakMemory(args.device).start()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        if args.worker == "ours":
            run_ours(Path(args.workdir), Path(out) / "run", args.device)
        else:
            run_trl(Path(args.workdir), Path(out) / "run", args.device, args.trl_gradient_checkpointing)
        seconds = time.perf_counter() - start
        peak = memory.peak()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"job": args.worker, "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu_before,
            "peak_bytes": peak, "baseline_bytes": memory.baseline}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", help="where the model and data go (default: a temporary directory)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's own default")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import torch

    torch.set_num_threads(args.threads)  # as the workers: device_name reports it
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed in this environment; see this script's docstring for the peers venv")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        if not (workdir / "model" / "config.json").exists():
            common.write_word_setup(workdir, "tiny-qwen-vocab", pairs=PAIRS, eval_pairs=EVAL_PAIRS)
        argv = ["--device", args.device, "--threads", str(args.threads), "--workdir", str(workdir)]
        argv += ["--trl-gradient-checkpointing"] if args.trl_gradient_checkpointing else []
        results = {job: common.run_worker(__file__, argv + ["--worker", job]) for job in ("ours", "trl")}
    ours, theirs = results["ours"], results["trl"]
    summary = {"benchmark": "DPO trainer vs TRL DPOTrainer", "device": common.device_name(args.device),
               "trl": trl.__version__, "pairs": PAIRS, "batch": BATCH, "max_len": MAX_LEN, "results": results,
               "trl_over_ours": {"time": theirs["seconds"] / ours["seconds"],
                                 "cpu_time": theirs["cpu_seconds"] / ours["cpu_seconds"],
                                 "peak_memory": theirs["peak_bytes"] / ours["peak_bytes"]}}
    common.print_table(f"DPO, {PAIRS} pairs, batch {BATCH}, {MAX_LEN} tokens, TRL {trl.__version__} "
                       f"(> 1: ours is better)", ["ratio", "TRL ÷ ours"],
                       [["wall time", summary["trl_over_ours"]["time"]],
                        ["CPU time (user + system; what a shared machine's load inflates least)",
                         summary["trl_over_ours"]["cpu_time"]],
                        ["peak memory", summary["trl_over_ours"]["peak_memory"]]])
    memory_name = "peak CUDA memory (MiB)" if args.device == "cuda" else "peak RSS (MiB)"
    common.print_table(f"absolute, on {summary['device']}", ["job", "wall time (s)", "CPU time (s)", memory_name],
                       [[job, r["seconds"], r["cpu_seconds"], common.mib(r["peak_bytes"])] for job, r in results.items()])
    common.write_json(args.json, summary)


if __name__ == "__main__":
    main()
