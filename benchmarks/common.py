"""What benchmarks 2–5 share: the two model shapes, timing, peak memory in a fresh process, MFU,
the ratio table and the JSON file.

Conventions (see benchmarks/README.md):

- **Ratios first.** Every script prints a table of ratios (ours ÷ the reference variant);
  absolute numbers come after, always with the device they were taken on.
- **Time** is the median of ``repeats`` calls after ``warmup`` calls. Variants that are compared
  are timed *alternately* in one process, so a shared machine's drifting load hits both alike.
- **Peak memory** is measured in a fresh subprocess per variant (``run_worker``), so one variant
  never inherits another's allocator state: on CPU the process's peak resident set (VmHWM, reset
  through ``/proc/self/clear_refs``), on CUDA ``torch.cuda.max_memory_allocated``.
"""
import contextlib
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

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run the scripts from anywhere without installing minirlhf

# Dense bf16 tensor-core peak (no sparsity) of the GPUs we report MFU on, FLOP/s.
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def model_config(shape):
    """A ``Qwen2Config`` by name.

    - ``"tiny"`` (CPU): hidden 256, 6 layers, 4 query / 2 key-value heads, vocabulary 8,192. The
      LM head is 26% of the parameters, as in Qwen2.5-0.5B (27%), so the share of work and memory
      that the logits take is in proportion to the real model's.
    - ``"toy"``: the toy world's policy, ``minirlhf.toy.model.toy_config`` with the toy tokenizer
      (hidden 128, 4 layers, a vocabulary of a few hundred tokens): the smallest model minirlhf
      trains.
    - ``"qwen2.5-0.5b"`` (GPU): Qwen2.5-0.5B's published shape: hidden 896, 24 layers, 14/2
      heads, MLP 4,864, vocabulary 151,936, tied embeddings (494M parameters).
    - ``"qwen-width-2l"`` (CPU): the same width and vocabulary with 2 layers (166M parameters, 82%
      of them the embedding): the LM head and its logits dominate, as they do per token at 0.5B.
    - ``"tiny-qwen-vocab"`` (CPU): ``tiny`` with 4 layers and Qwen's 151,936-token vocabulary
      (the model of the comparison with TRL).
    """
    from transformers import Qwen2Config

    shapes = {
        "tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=8192),
        "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, vocab_size=151936, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    }
    shapes["qwen-width-2l"] = dict(shapes["qwen2.5-0.5b"], num_hidden_layers=2)
    shapes["tiny-qwen-vocab"] = dict(shapes["tiny"], num_hidden_layers=4, vocab_size=151936)
    if shape == "toy":
        from minirlhf.toy.model import toy_config
        from minirlhf.toy.tokenizer import build_toy_tokenizer

        config = toy_config(build_toy_tokenizer())
        config.max_position_embeddings = 4096  # rotary positions work at any length; benchmarks go past 128
        return config
    kwargs = dict(shapes[shape], max_position_embeddings=4096, tie_word_embeddings=True,
                  bos_token_id=None, eos_token_id=1, pad_token_id=0)
    return Qwen2Config(**kwargs)


def build_model(shape, device, seed=0):
    """A randomly initialised ``Qwen2ForCausalLM`` of ``shape`` (float32 weights: on CUDA the
    trainers run them under bf16 autocast, see ``minirlhf.train.precision.Precision``)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # initialise in place: 494M parameters are slow to build on a CPU and copy
        return Qwen2ForCausalLM(model_config(shape))


def num_parameters(model):
    """Parameters counted once (tied input/output embeddings are one matrix)."""
    return sum(p.numel() for p in model.parameters())


def default_shape(device):
    return "qwen2.5-0.5b" if torch.device(device).type == "cuda" else "tiny"


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def make_pairs(num_pairs, prompt_len, response_len, config, seed=0):
    """Random preference pairs shaped like the collators' input: prompt lengths uniform in
    ``[prompt_len/2, prompt_len]``, each response in ``[response_len/2, response_len]`` ending in EOS."""
    generator = torch.Generator().manual_seed(seed)
    eos, pad = config.eos_token_id, config.pad_token_id

    def tokens(low, high):
        n = int(torch.randint(low, high + 1, (), generator=generator))
        ids = torch.randint(0, config.vocab_size, (n,), generator=generator)
        ids[(ids == eos) | (ids == pad)] = 3  # no early stop token inside a text
        return ids.tolist()

    pairs = []
    for _ in range(num_pairs):
        prompt = tokens(prompt_len // 2, prompt_len)
        example = {}
        for side in ("chosen", "rejected"):
            response = tokens(response_len // 2, response_len - 1) + [eos]
            example[f"{side}_input_ids"] = prompt + response
            example[f"{side}_response_mask"] = [0] * len(prompt) + [1] * len(response)
        pairs.append(example)
    return pairs


def word_tokenizer(num_words=2000):
    """A byte-level BPE tokenizer in which each of ``num_words`` three-letter words (``aaa``, ``aab``,
    …, over the letters a–m) is one token when a space precedes it; pad ``<pad>`` = 0, eos
    ``<eos>`` = 1, no chat template. Built from a vocabulary and merges (no training), and in the
    format ``AutoTokenizer`` loads as ``Qwen2Tokenizer`` beside a Qwen2 config with the same ids.
    Returns ``(tokenizer, words)``."""
    import itertools

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["".join(letters) for letters in itertools.product("abcdefghijklm", repeat=3)][:num_words]
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>"] + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    for word in words:  # "Ġ" + "a" -> "Ġa", "Ġa" + "b" -> "Ġab", ...: every prefix is a token
        prefix = "Ġ"
        for letter in word:
            if prefix + letter not in vocab:
                vocab[prefix + letter] = len(vocab)
                merges.append((prefix, letter))
            prefix += letter
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        model_max_length=4096)
    return tokenizer, words


def write_word_setup(directory, shape, pairs=0, eval_pairs=0, prompts=0, words=60, dtype=None, seed=0, device="cpu"):
    """A training setup of random words in ``directory``, for runs through the trainers' public API.

    ``model/``: a random ``Qwen2ForCausalLM`` of ``shape`` (initialised on ``device``, saved with
    ``save_pretrained`` in ``dtype`` if given) with ``word_tokenizer()`` beside it. ``pairs.jsonl`` / ``eval_pairs.jsonl``: TRL's
    standard preference format (``prompt``, ``chosen``, ``rejected``, ``words`` words each, about
    one token per word); ``prompts.jsonl``: ``prompt`` + ``answer`` records. Returns the directory.
    """
    import random
    from pathlib import Path

    directory = Path(directory)
    tokenizer, vocabulary = word_tokenizer()
    model = build_model(shape, device, seed=seed)
    model.to(dtype or model.dtype).save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    rng = random.Random(seed)

    def text():
        return " ".join(rng.choice(vocabulary) for _ in range(words))

    files = {"pairs.jsonl": [{"prompt": text(), "chosen": text(), "rejected": text()} for _ in range(pairs)],
             "eval_pairs.jsonl": [{"prompt": text(), "chosen": text(), "rejected": text()} for _ in range(eval_pairs)],
             "prompts.jsonl": [{"prompt": text(), "answer": str(rng.randrange(100))} for _ in range(prompts)]}
    for name, records in files.items():
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


# ---------------------------------------------------------------------------------------------
# Timing, memory, MFU
# ---------------------------------------------------------------------------------------------


def add_common_arguments(parser):
    """``--device``, ``--threads``, ``--repeats``, ``--warmup``, ``--json``: every script has them."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads than free "
                             "cores make every process spin; 1 thread gives stable ratios)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--json", help="write the results here")


def setup_threads(args):
    if args.threads:
        torch.set_num_threads(args.threads)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_alternately(functions, device, repeats=5, warmup=1):
    """``{name: median seconds}`` of each ``functions[name]()``, calling them in turn.

    ``warmup`` rounds first (kernels, thread pools, allocator caches); then ``repeats`` rounds
    that call every function once each, so load drift on a shared machine hits all of them.
    """
    seconds = {name: [] for name in functions}
    for round_ in range(warmup + repeats):
        for name, fn in functions.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_ >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


class PeakMemory:
    """Peak memory of a region above what was held when it started, in bytes.

    CPU: the process's peak resident set (VmHWM), reset to the current RSS at ``start``. CUDA:
    ``max_memory_allocated`` since ``start``. ``held()`` is what is held right now (RSS or
    allocated), to report the total footprint as well.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with contextlib.suppress(OSError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back: an honest baseline
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        self.baseline = self.held()
        return self

    def held(self):
        if self.cuda:
            return torch.cuda.memory_allocated()
        return _proc_status("VmRSS")

    def peak(self):
        """Peak since ``start`` (absolute)."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _proc_status("VmHWM")

    def peak_extra(self):
        return self.peak() - self.baseline


def _proc_status(field):
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def bf16_peak_flops(device):
    """The GPU's dense bf16 peak (FLOP/s), or None for a CPU or an unknown GPU."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for gpu, peak in BF16_PEAK_FLOPS.items() if gpu in name), None)


def mfu(flops, seconds, device):
    """Model FLOPs utilisation ``flops / seconds / peak``, or None where the peak is unknown."""
    peak = bf16_peak_flops(device)
    return None if peak is None else flops / seconds / peak


# ---------------------------------------------------------------------------------------------
# Fresh-process workers, device name, table, JSON
# ---------------------------------------------------------------------------------------------


# glibc's malloc moves its mmap threshold up to the size of the largest block freed so far, so
# tensors of a few MiB end up in the heap, where freed ones stay resident or fragment it: the peak
# RSS of the same step then drifts by hundreds of MiB from run to run. A fixed threshold maps every
# tensor above 64 KiB on its own and unmaps it when freed, so RSS follows the live tensors, as
# ``torch.cuda.max_memory_allocated`` does on a GPU.
TENSOR_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**10)}


def run_worker(script, argv, env=None):
    """Run ``python script argv`` (a worker mode that prints one JSON line last) and parse it.
    ``env``: extra environment variables for the worker (e.g. ``TENSOR_RSS_ENV``)."""
    done = subprocess.run([sys.executable, os.path.abspath(script), *argv], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    if done.returncode != 0:
        raise SystemExit(f"worker {' '.join(argv)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def device_name(device):
    """What the numbers were taken on, e.g. "NVIDIA H100 80GB HBM3" or "AMD EPYC, 2 cores, ..."."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return f"{cpu} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{load}"


def print_table(title, header, rows):
    """A Markdown table (pasteable into benchmarks/README.md)."""
    print(f"\n{title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(_cell(v) for v in row) + " |")


def _cell(value):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def write_json(path, summary):
    if path:
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"\nwrote {path}")


def mib(num_bytes):
    return num_bytes / 2**20
