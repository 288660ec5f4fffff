"""Memory of one RLHF training step on one GPU, computed from a model config (offline).

    python benchmarks/memory_table.py                 # Qwen2.5-0.5B, 8 sequences × 1,024 tokens (512 response)
    python benchmarks/memory_table.py --check         # + a CPU run that checks the formula at one point
    python benchmarks/memory_table.py --rows 4 --seq-len 512 --response-len 256 --lora-r 8 --json mem.json

For DPO (policy trained; π_ref's log-probs cached before training, so no reference is held), PPO
(policy and critic trained, reference and reward model for inference) and GRPO (policy trained,
reference for inference), each with full fine-tuning, gradient checkpointing, LoRA, and the lever
"reference/reward models in the compute dtype", under bf16 or fp16 autocast with float32 master
weights (the two take the same bytes; fp16 adds a loss scaler). The parts, in bytes:

- **weights**: 4 per trained parameter (float32 master copy); 4 per inference parameter, or 2
  with the compute-dtype lever; a LoRA base is frozen and kept in the compute dtype (2), and the
  reference is the same base with the adapters off (0 more).
- **gradients** 4 and **AdamW** 8 (two moments) per *trained* parameter.
- **activations**: what autograd saves per token and decoder layer of Hugging Face's Qwen2
  (SDPA attention), counted with ``torch.autograd.graph.saved_tensors_hooks``: two RMSNorms save
  their float32 input and normalised output (2·(8d + 4)); the inputs of q/k/v and gate/up (one
  float32 copy shared by all, or under autocast one compute-dtype cast per projection: 5·c·d);
  q and the key/value heads after ``repeat_kv`` (3·c·d, padded batches), the output (c·d) and
  the log-sum-exp (4·heads); the MLP's gate, SiLU, up and product (4·c·I). With gradient
  checkpointing only each layer's float32 input (4d) stays, plus one layer recomputed.
- **logits** (unfused path): the LM head's ``[response tokens + 1, V]`` logits in the compute
  dtype and their gradient, plus ``gather_logprobs``' float32 chunk (1/12 of them); the fused
  head (``fused_response_logprobs``) needs two float32 chunks of 128 MiB instead.

The peak is the largest of three moments: the start of the backward (activations, logits and
their gradient, the LM head's weight gradient), its end (all gradients, plus the embedding's
dense gradient before it is added to the tied weight's), and the AdamW step (its temporaries:
``torch.optim.AdamW``'s default ``foreach`` on CUDA makes one float32 tensor per trained
parameter — 4 bytes each —, ``fused=True`` none, the CPU's per-tensor loop two of the largest).
Not counted: the CUDA context and allocator fragmentation (~0.5–1 GiB), the rollout's KV cache
(2·layers·d_kv·c bytes per token: 12 KiB at 0.5B), the data.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py; it also puts the repository on sys.path)

GIB = 2**30
FP32 = 4
FUSED_CHUNK_BYTES = 2 * 128 * 2**20  # two float32 chunks (minirlhf/core/fused_logprobs.py)
# gather_logprobs' float32 chunk: 1/12 of the logits' bytes (12 chunks of float32 logits, 24 of bf16
# ones, whose float32 chunk weighs twice its share; minirlhf/core/logprobs.py)
GATHER_CHUNK_FRACTION = 1 / 12

# config.json of Qwen/Qwen2.5-0.5B-Instruct, verbatim (the base model's differs only in
# eos_token_id 151643 and max_window_layers 24): 494,032,768 parameters.
QWEN25_05B_INSTRUCT = dict(
    architectures=["Qwen2ForCausalLM"], attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645,
    hidden_act="silu", hidden_size=896, initializer_range=0.02, intermediate_size=4864,
    max_position_embeddings=32768, max_window_layers=21, num_attention_heads=14, num_hidden_layers=24,
    num_key_value_heads=2, rms_norm_eps=1e-06, rope_theta=1000000.0, sliding_window=32768,
    tie_word_embeddings=True, torch_dtype="bfloat16", use_cache=True, use_sliding_window=False,
    vocab_size=151936,
)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALGORITHMS = {  # trained models, inference models ("policy"/"critic"/"reference"/"reward")
    "DPO": (("policy",), ()),
    "PPO": (("policy", "critic"), ("reference", "reward")),
    "GRPO": (("policy",), ("reference",)),
}
# name: (LoRA, gradient checkpointing, reference/reward in the compute dtype, fused LM head, AdamW)
METHODS = {
    "full, ref/RM in float32 (before the levers)": (False, False, False, False, "foreach"),
    "full, ref/RM in compute dtype": (False, False, True, False, "foreach"),
    "full + grad. checkpointing": (False, True, True, False, "foreach"),
    "full + grad. ckpt + fused head + fused AdamW": (False, True, True, True, "fused"),
    "LoRA r={r}": (True, False, True, False, "foreach"),
    "LoRA r={r} + grad. ckpt + fused head": (True, True, True, True, "fused"),
}


def qwen_config():
    from transformers import Qwen2Config

    return Qwen2Config(**QWEN25_05B_INSTRUCT)


def parameter_counts(config, lora_r):
    """Counts from the model itself, built on the meta device (no memory): all parameters (tied
    ones once), the embedding / LM head matrix, the largest tensor, and LoRA's A and B at rank r."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = list(model.parameters())
    lora = sum(lora_r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS)
    head = model.get_output_embeddings().weight.numel()
    return {"total": sum(p.numel() for p in params), "head": head, "largest": max(p.numel() for p in params),
            "lora": lora, "tied": bool(config.tie_word_embeddings)}


def activation_bytes_per_token(config, compute_bytes, checkpointing):
    """Bytes autograd keeps per token for the whole decoder (see the module docstring)."""
    d, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    autocast = compute_bytes != FP32
    projection_inputs = 5 * compute_bytes * d if autocast else 2 * FP32 * d
    layer = 2 * (8 * d + 4) + projection_inputs + 4 * compute_bytes * d + 4 * heads + 4 * compute_bytes * inter
    final_norm = 8 * d + 4 + compute_bytes * d  # and the LM head's input
    if checkpointing:
        return config.num_hidden_layers * FP32 * d + layer + final_norm
    return config.num_hidden_layers * layer + final_norm


def step_memory(config, counts, algorithm, lora, checkpointing, inference_in_compute_dtype, fused, shape,
                compute_bytes, optimizer_temporaries="foreach"):
    """Bytes of each part and the peak of one training step (see the module docstring)."""
    trained_models, inference_models = ALGORITHMS[algorithm]
    n, head = counts["total"], counts["head"]
    rows, seq_len, response_len = shape
    tokens, logit_rows = rows * seq_len, rows * (response_len + 1)
    trained = counts["lora"] if lora else n  # per trained model (the critic: the same backbone, a tiny head)
    frozen_bytes = 2 if inference_in_compute_dtype else FP32
    weights = len(trained_models) * (trained * FP32 + (n * compute_bytes if lora else 0))
    weights += sum(0 if (lora and name == "reference") else n * frozen_bytes for name in inference_models)
    gradients, adam = len(trained_models) * trained * FP32, len(trained_models) * trained * 2 * FP32
    activations = len(trained_models) * tokens * activation_bytes_per_token(config, compute_bytes, checkpointing)
    if fused:
        logits = FUSED_CHUNK_BYTES
    else:
        one = logit_rows * config.vocab_size * compute_bytes
        logits = (2 + GATHER_CHUNK_FRACTION) * one  # logits, their gradient, gather_logprobs' chunk
    head_gradient = 0 if lora else head * FP32 * (1 if compute_bytes == FP32 else 1 + compute_bytes / FP32)
    dense_embedding_gradient = head * FP32 if (counts["tied"] and not lora) else 0
    if optimizer_temporaries == "foreach":
        step_temporaries = len(trained_models) * trained * FP32
    elif optimizer_temporaries == "per-tensor":
        step_temporaries = 2 * (counts["largest"] if not lora else 0) * FP32  # LoRA: tiny tensors
    else:
        step_temporaries = 0
    moments = {
        "backward start": weights + adam + activations + logits + head_gradient,
        "backward end": weights + adam + gradients + dense_embedding_gradient,
        "AdamW step": weights + adam + gradients + step_temporaries,
    }
    peak_at = max(moments, key=moments.get)
    return {"weights": weights, "gradients": gradients, "adamw": adam, "activations": activations, "logits": logits,
            "peak": moments[peak_at], "peak_at": peak_at}


def table(config, counts, shape, lora_r, compute_bytes):
    rows = []
    for algorithm in ALGORITHMS:
        for name, (lora, checkpointing, inference_dtype, fused, adamw) in METHODS.items():
            parts = step_memory(config, counts, algorithm, lora, checkpointing, inference_dtype, fused, shape,
                                compute_bytes, optimizer_temporaries=adamw)
            rows.append({"algorithm": algorithm, "method": name.format(r=lora_r), **parts})
    return rows


# ---------------------------------------------------------------------------------------------
# The check: a real fp32 DPO step on this CPU
# ---------------------------------------------------------------------------------------------


def measure_dpo_step(pairs, seq_len, response_len, threads):
    """Worker (fresh process): peak RSS of two fp32 DPO optimizer steps of a random model with the
    exact config (policy forward + backward with ``response_logprobs``, sigmoid ``dpo_loss`` against
    cached reference log-probs, ``torch.optim.AdamW``); returns the RSS after imports and the peak."""
    from minirlhf.core.dpo_losses import dpo_loss
    from minirlhf.core.logprobs import sequence_logprobs
    from minirlhf.models.forward import response_logprobs
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(threads)
    baseline = common.PeakMemory("cpu").start().held()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen_config()).train()
    rows = 2 * pairs
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 150000, (rows, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    response_mask[:, seq_len - response_len:] = 1
    reference = torch.zeros(pairs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for _ in range(2):
        token_logps, mask = response_logprobs(model, input_ids, attention_mask, response_mask)
        chosen, rejected = sequence_logprobs(token_logps, mask).chunk(2)
        losses, _, _ = dpo_loss(chosen, rejected, reference, reference, 0.1)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"baseline_bytes": baseline, "peak_rss_bytes": common._proc_status("VmHWM")}


def check(args, config, counts):
    """Predicted vs measured peak RSS of the fp32 DPO step, measured twice in fresh processes: with
    glibc's default malloc (what a user sees) and with a fixed mmap threshold, under which RSS
    follows the live tensors (``common.TENSOR_RSS_ENV``), the quantity the formula predicts."""
    pairs, seq_len, response_len = 2, 128, 64
    argv = ["--worker", "--threads", str(args.threads)]
    measured = {"default malloc": common.run_worker(__file__, argv),
                "fixed mmap threshold": common.run_worker(__file__, argv, env=common.TENSOR_RSS_ENV)}
    predicted = step_memory(config, counts, "DPO", False, False, False, False, (2 * pairs, seq_len, response_len),
                            FP32, optimizer_temporaries="per-tensor")
    print(f"\nCheck on this CPU (fp32, DPO step, {pairs} pairs × {seq_len} tokens, {response_len} response; "
          f"{common.device_name('cpu')}):\n")
    print("| | GiB |\n|---|---|")
    for key in ("weights", "gradients", "adamw", "activations", "logits"):
        print(f"| predicted {key} | {predicted[key] / GIB:.2f} |")
    for name, run in measured.items():
        total = run["baseline_bytes"] + predicted["peak"]
        run.update(predicted_total_bytes=total, predicted_over_measured=total / run["peak_rss_bytes"])
        print(f"| {name}: predicted peak ({predicted['peak_at']}) + process baseline "
              f"{run['baseline_bytes'] / GIB:.2f} | **{total / GIB:.2f}** |")
        print(f"| {name}: measured peak RSS | **{run['peak_rss_bytes'] / GIB:.2f}** "
              f"(predicted ÷ measured {run['predicted_over_measured']:.3f}) |")
    return {"predicted": predicted, "measured": measured}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="sequences per micro-batch (DPO: 2 per pair)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--response-len", type=int, default=512, help="response tokens per sequence")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--check", action="store_true", help="also run the fp32 CPU check (two runs of ~3 minutes, ~10 GiB)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure_dpo_step(2, 128, 64, args.threads)))
        return
    config = qwen_config()
    counts = parameter_counts(config, args.lora_r)
    shape = (args.rows, args.seq_len, args.response_len)
    rows = table(config, counts, shape, args.lora_r, compute_bytes=2)
    print(f"Qwen2.5-0.5B ({counts['total']:,} parameters; LoRA r={args.lora_r}: {counts['lora']:,} per model), "
          f"bf16 or fp16 autocast, float32 master weights, AdamW (foreach); micro-batch of {args.rows} sequences × "
          f"{args.seq_len} tokens ({args.response_len} response). GiB:\n")
    print("| algorithm | method | weights | gradients | AdamW | activations | logits | peak | peak at |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['algorithm']} | {r['method']} | " + " | ".join(
            f"{r[k] / GIB:.1f}" for k in ("weights", "gradients", "adamw", "activations", "logits"))
            + f" | **{r['peak'] / GIB:.1f}** | {r['peak_at']} |")
    print(f"\nPeak GiB per step (the same rows; a 16 GB card holds ~14.5 GiB, a 24 GB card ~22):\n")
    print("| method | " + " | ".join(ALGORITHMS) + " |")
    print("|---|" + "---|" * len(ALGORITHMS))
    for method in dict.fromkeys(r["method"] for r in rows):
        peaks = {r["algorithm"]: r["peak"] for r in rows if r["method"] == method}
        print(f"| {method} | " + " | ".join(f"{peaks[a] / GIB:.1f}" for a in ALGORITHMS) + " |")
    summary = {"config": QWEN25_05B_INSTRUCT, "parameters": counts, "shape": shape, "table": rows}
    if args.check:
        summary["check"] = check(args, config, counts)
    common.write_json(args.json, summary)


if __name__ == "__main__":
    main()
