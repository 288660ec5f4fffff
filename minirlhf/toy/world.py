"""``load_world()``: the toy world's data, tokenizer and base model, built once from a seed and cached.

    world = load_world(seed=0)            # seconds the first time, then read from the cache

Cache directory: ``cache_dir`` or ``$MINIRLHF_CACHE`` or ``~/.cache/minirlhf``, then
``toy-<seed>-<VERSION>/``::

    world.json          what was measured (Bayes accuracies, data statistics), the sha256 of
                        every file below but sft/, and (once it is built) of the SFT weights
    data/*.jsonl        the datasets (see ``minirlhf.toy.corpus``)
    tokenizer/          the toy tokenizer as built (HF format, chat_template.jinja)
    base/               the untrained tiny Qwen2 model (+ tokenizer: ``world.tokenizer_path``)
    sft/                the SFT policy (+ tokenizer, toy_eval.json: its gold reward, the sha256 of
                        its files and how it was built)

The SFT policy is trained by the train layer (``minirlhf.train.toy_world.load_toy_world``, which
every trainer's defaults use): ``load_world`` reports it as ``sft_model`` once it is there (its
``toy_eval.json``, written last, marks it complete) and as None before. Each piece is built in a
temporary directory next to its target and renamed into place, so an interrupted build leaves
nothing half-written and a missing piece is simply rebuilt.

**Bit-reproducible.** A seed fixes every byte: the data (``random.Random`` streams), the tokenizer,
the base model's initialisation and the SFT policy, which is trained on the CPU with one thread
whatever the calling process uses (``minirlhf.train.toy_world``). The recorded sha256 digests are
checked on every load: a file that no longer matches (an edit, a damaged disk) is reported and the
piece rebuilt. ``world.sft_sha256`` (also in ``world.json``) names the SFT weights in one string:
two machines with the same value train every later stage from the same policy. Bump ``VERSION`` whenever the language, the data generator, the model or the SFT
recipe changes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from transformers import PreTrainedTokenizerFast

from minirlhf.data.atomic import write_dir_atomic, write_text_atomic
from minirlhf.models.policy import load_tokenizer
from minirlhf.toy import language
from minirlhf.toy.corpus import CorpusSizes, build_corpus
from minirlhf.toy.model import save_toy_model
from minirlhf.toy.tokenizer import save_toy_tokenizer

VERSION = "v6"

#: the data template (``minirlhf.data.templates``) of each dataset file
TEMPLATES = {
    "pref_train": "align_anything", "pref_test": "align_anything", "pku_train": "pku_saferlhf",
    "sft_train": "sft", "sft_test": "sft", "kto_train": "kto",
    "prompts": "prompt", "eval_prompts": "prompt", "math_prompts": "prompt",
}

#: the SFT policy's directory in the world's cache, and the file that marks it complete
SFT_DIR, SFT_EVAL, SFT_WEIGHTS = "sft", "toy_eval.json", "model.safetensors"


@dataclass(frozen=True)
class ToyWorld:
    """The toy world's pieces. Paths are absolute; ``sft_model`` is None until the SFT policy is built."""

    seed: int
    dir: Path
    tokenizer: PreTrainedTokenizerFast
    tokenizer_path: Path
    base_model: Path
    sft_model: Path | None
    sft_sha256: str | None  # sha256 of the SFT weights (model.safetensors); None until built
    pref_train: Path
    pref_test: Path
    pku_train: Path
    sft_train: Path
    sft_test: Path
    kto_train: Path
    prompts: Path
    eval_prompts: Path
    math_prompts: Path
    bayes_accuracy: dict[str, float]  # per preference file: E[σ(|Δr*|)]
    stats: dict[str, float]  # data statistics, and the SFT policy's gold reward when built
    templates: dict[str, str] = field(default_factory=lambda: dict(TEMPLATES))
    gold_reward: Callable[[str, str], float] = language.gold_reward
    helpful_score: Callable[[str, str], float] = language.helpful_score
    harmless_score: Callable[[str, str], float] = language.harmless_score
    math_correct: Callable[[str, str], float] = language.math_correct
    max_gold_reward: Callable[[str], float] = language.max_gold_reward


def default_cache_dir() -> Path:
    return Path(os.environ.get("MINIRLHF_CACHE") or Path.home() / ".cache" / "minirlhf")


def file_digests(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root``, leaving out the top-level entries
    named in ``exclude`` and hidden ones (a concurrent build's temporary directories)."""
    root = Path(root)
    digests = {}
    for path in sorted(root.rglob("*")):
        top = path.relative_to(root).parts[0]
        if path.is_file() and top not in exclude and not top.startswith("."):
            digests[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def changed_files(root: Path, recorded: dict[str, str], exclude: tuple[str, ...] = ()) -> list[str]:
    """The files under ``root`` whose sha256 differs from ``recorded`` (or that are missing or new)."""
    found = file_digests(root, exclude)
    return sorted(name for name in set(found) | set(recorded) if found.get(name) != recorded.get(name))


def warn_rebuild(what: Path, changed: list[str]) -> None:
    print(f"warning: the toy world's {what} does not match the sha256 recorded when it was built "
          f"({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}); rebuilding it", file=sys.stderr)


def _build_base(seed: int, out: Path, sizes: CorpusSizes) -> None:
    started = time.perf_counter()
    corpus = build_corpus(seed, out / "data", sizes)
    tokenizer = save_toy_tokenizer(out / "tokenizer")
    save_toy_model(tokenizer, seed, out / "base")
    eval_prompts = [json.loads(line)["prompt"] for line in corpus.eval_prompts.read_text().splitlines()]
    stats = dict(corpus.stats)
    stats["eval_prompts_max_gold_mean"] = sum(map(language.max_gold_reward, eval_prompts)) / len(eval_prompts)
    stats["build_seconds"] = time.perf_counter() - started
    meta = {"seed": seed, "version": VERSION, "bayes_accuracy": corpus.bayes_accuracy, "stats": stats,
            "sha256": file_digests(out)}
    (out / "world.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks "complete"


def load_world(seed: int = 0, cache_dir: str | Path | None = None, sizes: CorpusSizes = CorpusSizes()) -> ToyWorld:
    """The toy world for ``seed``, built into the cache on first use (see the module docstring).

    ``sizes`` changes the dataset sizes (a non-default size gets its own cache directory).
    ``sft_model`` is the cached SFT policy, or None when it has not been trained yet.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    suffix = "" if sizes == CorpusSizes() else "-" + "-".join(str(v) for v in vars(sizes).values())
    world_dir = (root / f"toy-{seed}-{VERSION}{suffix}").resolve()
    if not (world_dir / "world.json").exists():
        shutil.rmtree(world_dir, ignore_errors=True)  # a stray incomplete directory
        write_dir_atomic(world_dir, lambda tmp: _build_base(seed, tmp, sizes), keep_existing=True)
    meta = json.loads((world_dir / "world.json").read_text())
    changed = changed_files(world_dir, meta["sha256"], exclude=("world.json", SFT_DIR))
    if changed:  # the SFT policy was trained from these files: it goes too
        warn_rebuild(world_dir, changed)
        write_dir_atomic(world_dir, lambda tmp: _build_base(seed, tmp, sizes))
        meta = json.loads((world_dir / "world.json").read_text())

    stats = dict(meta["stats"])
    sft_dir = world_dir / SFT_DIR if (world_dir / SFT_DIR / SFT_EVAL).exists() else None
    if sft_dir is not None:
        sft_eval = json.loads((sft_dir / SFT_EVAL).read_text())
        changed = changed_files(sft_dir, sft_eval["sha256"], exclude=(SFT_EVAL,))
        if changed:  # reported as missing: the train layer rebuilds it
            warn_rebuild(sft_dir, changed)
            shutil.rmtree(sft_dir, ignore_errors=True)
            sft_dir = None
    sft_sha256 = None
    if sft_dir is not None:
        sft_sha256 = sft_eval["sha256"][SFT_WEIGHTS]
        if meta.get("sft_sha256") != sft_sha256:  # first load after the build: recorded in world.json
            meta["sft_sha256"] = sft_sha256
            write_text_atomic(world_dir / "world.json", json.dumps(meta, indent=2) + "\n")
        stats.update({f"sft_policy_{k}": v for k, v in sft_eval["sampled"].items()})
        stats.update({f"sft_policy_greedy_{k}": v for k, v in sft_eval["greedy"].items()})
        stats["sft_train_seconds"] = sft_eval["train_seconds"]
    data = world_dir / "data"
    return ToyWorld(
        seed=seed, dir=world_dir,
        # Loaded the way every trainer loads it (AutoTokenizer next to a qwen2 config gives
        # Qwen2Tokenizer, which splits digits one by one), so that the world and the trainers
        # always tokenize alike.
        tokenizer=load_tokenizer(world_dir / "base"),
        tokenizer_path=world_dir / "base", base_model=world_dir / "base", sft_model=sft_dir, sft_sha256=sft_sha256,
        **{name: data / f"{name}.jsonl" for name in TEMPLATES},
        bayes_accuracy=meta["bayes_accuracy"], stats=stats,
    )
