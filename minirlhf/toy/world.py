"""``load_world()``: every piece of the toy world, built once from a seed and cached on disk.

    world = load_world(seed=0)            # data, tokenizer, base model, SFT model (~minutes once)
    world = load_world(seed=0, sft=False) # everything but the SFT model (seconds)

Cache directory: ``cache_dir`` or ``$MINIRLHF_CACHE`` or ``~/.cache/minirlhf``, then
``toy-<seed>-<VERSION>/``::

    world.json          what was measured (Bayes accuracies, data statistics)
    data/*.jsonl        the datasets (see ``minirlhf.toy.corpus``)
    tokenizer/          the toy tokenizer as built (HF format, chat_template.jinja)
    base/               the untrained tiny Qwen2 model (+ tokenizer: ``world.tokenizer_path``)
    sft/                the SFT policy (+ tokenizer, toy_eval.json: its gold reward)

Each stage is built in a temporary directory next to its target and renamed into place, so an
interrupted build leaves nothing half-written and a missing piece is simply rebuilt. Bump
``VERSION`` whenever the language, the data generator or the model changes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from transformers import PreTrainedTokenizerFast

from minirlhf.models.policy import load_tokenizer
from minirlhf.toy import language
from minirlhf.toy.corpus import CorpusSizes, build_corpus
from minirlhf.toy.model import save_toy_model
from minirlhf.toy.tokenizer import save_toy_tokenizer

VERSION = "v3"

#: the data template (``minirlhf.data.templates``) of each dataset file
TEMPLATES = {
    "pref_train": "align_anything", "pref_test": "align_anything", "pku_train": "pku_saferlhf",
    "sft_train": "sft", "sft_test": "sft", "kto_train": "kto",
    "prompts": "prompt", "eval_prompts": "prompt", "math_prompts": "prompt",
}

#: how the SFT policy is trained (tiny model from scratch: a high learning rate, short sequences)
SFT_HYPERPARAMETERS = dict(epochs=4.0, lr=3e-3, batch_size=16, max_len=64, max_prompt_len=32)


@dataclass(frozen=True)
class ToyWorld:
    """The toy world's pieces. Paths are absolute; ``sft_model`` is None when built with ``sft=False``."""

    seed: int
    dir: Path
    tokenizer: PreTrainedTokenizerFast
    tokenizer_path: Path
    base_model: Path
    sft_model: Path | None
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


def _build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Run ``build(tmp)`` in a fresh directory beside ``target``, then rename it to ``target``.

    If another process finished the same target first, its result is kept and ours discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_base(seed: int, out: Path, sizes: CorpusSizes) -> None:
    started = time.perf_counter()
    corpus = build_corpus(seed, out / "data", sizes)
    tokenizer = save_toy_tokenizer(out / "tokenizer")
    save_toy_model(tokenizer, seed, out / "base")
    eval_prompts = [json.loads(line)["prompt"] for line in corpus.eval_prompts.read_text().splitlines()]
    stats = dict(corpus.stats)
    stats["eval_prompts_max_gold_mean"] = sum(map(language.max_gold_reward, eval_prompts)) / len(eval_prompts)
    stats["build_seconds"] = time.perf_counter() - started
    meta = {"seed": seed, "version": VERSION, "bayes_accuracy": corpus.bayes_accuracy, "stats": stats}
    (out / "world.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks "complete"


def _build_sft(world_dir: Path, seed: int, out: Path) -> None:
    """SFT the base model on sft_train with the project's trainer; measure its gold reward."""
    from minirlhf.train.sft import SFTArgs, train_sft
    from minirlhf.toy.measure import measure_policy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    run = out / "run"
    args = SFTArgs(model=str(world_dir / "base"), data=str(world_dir / "data" / "sft_train.jsonl"),
                   eval_data=str(world_dir / "data" / "sft_test.jsonl"), template=TEMPLATES["sft_train"],
                   out=str(run), seed=seed, progress=False, tensorboard=False, **SFT_HYPERPARAMETERS)
    final = Path(train_sft(args))
    for item in final.iterdir():  # the saved model and tokenizer become <world>/sft
        item.rename(out / item.name)
    shutil.rmtree(run)
    train_seconds = time.perf_counter() - started

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompts = [json.loads(line)["prompt"] for line in (world_dir / "data" / "eval_prompts.jsonl").read_text().splitlines()]
    summary = {"sampled": measure_policy(model, tokenizer, prompts, num_samples=4, seed=seed),
               "greedy": measure_policy(model, tokenizer, prompts, num_samples=1, temperature=0.0, seed=seed),
               "train_seconds": train_seconds}
    (out / "toy_eval.json").write_text(json.dumps(summary, indent=2) + "\n")  # last: marks "complete"


def load_world(seed: int = 0, cache_dir: str | Path | None = None, sft: bool = True,
               sizes: CorpusSizes = CorpusSizes()) -> ToyWorld:
    """The toy world for ``seed``, built into the cache on first use (see the module docstring).

    ``sft=False`` skips the SFT policy (seconds instead of minutes); ``sizes`` changes the dataset
    sizes (a non-default size gets its own cache directory).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    suffix = "" if sizes == CorpusSizes() else "-" + "-".join(str(v) for v in vars(sizes).values())
    world_dir = (root / f"toy-{seed}-{VERSION}{suffix}").resolve()
    if not (world_dir / "world.json").exists():
        shutil.rmtree(world_dir, ignore_errors=True)  # a stray incomplete directory
        _build_atomically(world_dir, lambda tmp: _build_base(seed, tmp, sizes))
    if sft and not (world_dir / "sft" / "toy_eval.json").exists():
        _build_atomically(world_dir / "sft", lambda tmp: _build_sft(world_dir, seed, tmp))

    meta = json.loads((world_dir / "world.json").read_text())
    stats = dict(meta["stats"])
    sft_dir = world_dir / "sft" if (world_dir / "sft" / "toy_eval.json").exists() else None
    if sft_dir is not None:
        sft_eval = json.loads((sft_dir / "toy_eval.json").read_text())
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
        tokenizer_path=world_dir / "base", base_model=world_dir / "base", sft_model=sft_dir,
        **{name: data / f"{name}.jsonl" for name in TEMPLATES},
        bayes_accuracy=meta["bayes_accuracy"], stats=stats,
    )
