"""``benchmarks/gpu_check.py --device cpu --tiny``: the GPU script's own code path, on this CPU.

A GPU is lent rarely and for minutes, so the script must not fail there for a reason a CPU run
could have shown: every section runs (the CUDA tests are collected and skipped), and the one JSON
holds every section's figures.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "dry.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    summary = json.loads(out.read_text())
    sections = summary["sections"]
    failed = {name: s["log_tail"] for name, s in sections.items() if not s["ok"]}
    assert done.returncode == 0 and not failed, failed or done.stdout + done.stderr
    assert {"cuda_tests", "bench_logprobs", "bench_fused_head", "bench_dpo_step", "bench_grpo_step",
            "train_dpo_bf16", "train_grpo_bf16"} <= set(sections)
    tests = sections["cuda_tests"]["figures"]
    assert tests["tests"] >= 5 and tests["skipped"] == tests["tests"]  # collected, skipped without CUDA
    assert sections["bench_logprobs"]["figures"]["results"]
    assert sections["bench_fused_head"]["figures"]["fused_over_unfused"]["peak_extra"] > 0
    for name in ("train_dpo_bf16", "train_grpo_bf16"):
        figures = sections[name]["figures"]
        assert figures["returncode"] == 0 and figures["seconds"] > 0 and figures["peak_memory_bytes"] > 0
