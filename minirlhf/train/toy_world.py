"""The toy world with its SFT policy: what every trainer uses when no ``--model``/``--data`` is given.

``minirlhf.toy.load_world`` builds the data, tokenizer and base model; the toy world's SFT policy
is trained here, by the project's own ``train_sft``, the first time it is asked for (about a
minute on two CPU cores), measured against the gold reward, and cached beside them::

    <cache>/toy-<seed>-<VERSION>/sft/    model + tokenizer, and toy_eval.json (written last: complete)

The build runs in a temporary directory that is renamed into place, so an interrupted build leaves
nothing behind and a concurrent one keeps whichever finished first.

**The same weights whoever builds them.** The policy is trained and measured on the CPU with
``BUILD_THREADS`` threads, whatever device the machine has and however many threads the calling
process uses (its own count is restored afterwards): a kernel that splits a float sum across more
threads may add in another order (whether one does depends on the CPU and the library), and those
last bits, amplified by a thousand optimizer steps, would make every later number depend on
whoever built the cache first; and a GPU's kernels differ from the CPU's. ``toy_eval.json`` records the sha256 of the
saved files and how they were built; ``load_world`` checks them on every load.

    python -m minirlhf toy-world [--seed N] [--cache-dir DIR] [--no-sft]
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from minirlhf.data.atomic import write_dir_atomic
from minirlhf.models.policy import load_policy, load_tokenizer
from minirlhf.toy.corpus import CorpusSizes
from minirlhf.toy.measure import measure_policy
from minirlhf.toy.world import SFT_DIR, SFT_EVAL, file_digests, load_world
from minirlhf.train.distributed import init_distributed, local_main_first
from minirlhf.train.runtime import torch_threads
from minirlhf.train.sft import TOY_PRESET, SFTArgs, train_sft

# The thread count and device of the toy SFT build: one CPU thread is also the fastest for a
# ~1M-parameter model.
BUILD_THREADS, BUILD_DEVICE = 1, "cpu"


def load_toy_world(seed=0, cache_dir=None, sft=True, sizes=CorpusSizes()):
    """The toy world for ``seed`` (``minirlhf.toy.load_world``), with its SFT policy trained and
    cached on first use (``sft=False`` skips it: seconds instead of a minute). Under torchrun each
    machine's local rank 0 trains it, as a lone process, while the other ranks wait."""
    world = load_world(seed=seed, cache_dir=cache_dir, sizes=sizes)
    if sft and world.sft_model is None:
        init_distributed()
        with local_main_first(), torch_threads(BUILD_THREADS):
            if load_world(seed=seed, cache_dir=cache_dir, sizes=sizes).sft_model is None:
                write_dir_atomic(world.dir / SFT_DIR, lambda tmp: build_sft_policy(world, tmp), keep_existing=True)
        world = load_world(seed=seed, cache_dir=cache_dir, sizes=sizes)
    return world


def build_sft_policy(world, out):
    """Train the toy SFT policy on ``world.sft_train`` into ``out`` and measure its gold reward.

    The saved model and tokenizer become ``out``'s files; ``toy_eval.json`` (the policy's gold
    reward, sampled and greedy, on the held-out prompts, and the files' sha256) is written last.
    Call it under ``torch_threads(BUILD_THREADS)`` for the reproducible build.
    """
    out = Path(out)
    started = time.perf_counter()
    run = out / "run"
    args = SFTArgs(model=str(world.base_model), data=str(world.sft_train), eval_data=str(world.sft_test),
                   template=world.templates["sft_train"], out=str(run), seed=world.seed, device=BUILD_DEVICE,
                   progress=False, tensorboard=False, **TOY_PRESET)
    final = Path(train_sft(args))
    for item in final.iterdir():
        item.rename(out / item.name)
    shutil.rmtree(run)
    train_seconds = time.perf_counter() - started

    model, tokenizer = load_policy(out), load_tokenizer(out)
    prompts = [json.loads(line)["prompt"] for line in world.eval_prompts.read_text().splitlines()]
    summary = {"sampled": measure_policy(model, tokenizer, prompts, num_samples=4, seed=world.seed),
               "greedy": measure_policy(model, tokenizer, prompts, num_samples=1, temperature=0.0, seed=world.seed),
               "train_seconds": train_seconds,
               "build": {"threads": torch.get_num_threads(), "device": BUILD_DEVICE, "torch": torch.__version__},
               "sha256": file_digests(out, exclude=(SFT_EVAL,))}
    (out / SFT_EVAL).write_text(json.dumps(summary, indent=2) + "\n")


def main(argv=None):
    """Build (or find) the toy world and print where it is and what was measured: Bayes
    accuracies, data statistics, the SFT policy's gold reward against the best achievable."""
    parser = argparse.ArgumentParser(prog="python -m minirlhf toy-world", description=main.__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="default: $MINIRLHF_CACHE or ~/.cache/minirlhf")
    parser.add_argument("--no-sft", action="store_true", help="skip the SFT policy (seconds, not a minute)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    world = load_toy_world(seed=args.seed, cache_dir=args.cache_dir, sft=not args.no_sft)
    print(json.dumps({"dir": str(world.dir), "sft_model": str(world.sft_model),
                      "sft_sha256": world.sft_sha256, "seconds": time.perf_counter() - started,
                      "bayes_accuracy": world.bayes_accuracy, "stats": world.stats}, indent=2))
    return 0
