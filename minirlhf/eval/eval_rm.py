"""Evaluate a reward model on preference pairs: accuracy, reward mean/std, score histograms.

    accuracy = mean_i 1[r(x_i, y_w) > r(x_i, y_l)]      (a tie counts ½)

    python -m minirlhf eval-rm --model runs/rm/final                  # toy world's test split
    python -m minirlhf eval-rm --model runs/rm/final --baseline SFT_DIR --out runs/rm/eval

``--baseline`` scores the same pairs with a second model — a reward model, or a causal LM that
gets a fresh random score head, i.e. the RM *before* training — and draws both histograms side by
side, as in the course reports ("score distribution by qwen" vs "by the trained reward model").
Writes ``<out>/eval_rm.json`` (metrics), ``<out>/pair_scores.jsonl`` and PNG histograms/box plots.
"""
import dataclasses
import json
import sys
import typing
from pathlib import Path

from minirlhf.data.atomic import write_jsonl_atomic, write_text_atomic
from minirlhf.data.datasets import load_preference_data
from minirlhf.errors import MinirlhfError
from minirlhf.eval import plots
from minirlhf.models.policy import load_tokenizer
from minirlhf.models.reward_model import load_reward_model
from minirlhf.toy.world import load_world
from minirlhf.train.args import data_limits, parse_args
from minirlhf.train.rm import pair_scores, rm_metrics
from minirlhf.train.runtime import quiet_transformers, select_device


@dataclasses.dataclass
class EvalRMArgs:
    """Reward-model accuracy, reward mean/std and chosen-vs-rejected score histograms."""

    model: str = ""
    """The reward model to evaluate (a directory saved by `rm`, or any HF sequence-classification RM)."""
    baseline: typing.Optional[str] = None
    """A second model scored on the same pairs (e.g. the SFT model = the RM before training); a
    causal LM gets a random score head (seeded by --seed)."""
    data: typing.Optional[str] = None
    """Preference file to evaluate on (default: the toy world's test split)."""
    template: str = "align_anything"
    """Dataset template of --data (minirlhf/data/templates.py)."""
    out: typing.Optional[str] = None
    """Output directory (default: <model>/eval)."""
    batch_size: int = 32
    """Pairs per forward pass."""
    max_len: int = 512
    """Maximum tokens of prompt + response."""
    max_prompt_len: typing.Optional[int] = None
    """Maximum prompt tokens (default: half of --max-len)."""
    system_prompt: typing.Optional[str] = None
    """System prompt put in front of every conversation."""
    seed: int = 0
    """Seed of the random head given to a causal-LM --baseline."""
    device: typing.Optional[str] = None
    """'cuda', 'cpu', ... (default: CUDA when available)."""


def evaluate_reward_model(args: EvalRMArgs):
    """Run the evaluation; returns ``{"model": metrics, "baseline": metrics?}`` and writes the files."""
    # 1. Defaults: the toy world's test split and its Bayes-optimal accuracy.
    bayes = None
    if args.data is None:
        world = load_world()
        args.data, args.template = str(world.pref_test), world.templates["pref_test"]
        bayes = world.bayes_accuracy["pref_test"]
    out = Path(args.out or Path(args.model) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    device = select_device(args.device)

    # 2. Data (tokenized with the evaluated model's tokenizer).
    tokenizer = load_tokenizer(args.model)
    examples, report = load_preference_data(args.data, args.template, tokenizer, system_prompt=args.system_prompt,
                                            **data_limits(args))
    print(report, file=sys.stderr)

    # 3. Score every pair with the model (and the baseline).
    results, scores = {}, {}
    for name, path in (("model", args.model), ("baseline", args.baseline)):
        if path is None:
            continue
        model = load_reward_model(path, device=device, seed=args.seed)
        scores[name] = pair_scores(model, examples, tokenizer.pad_token_id, args.batch_size, device)
        results[name] = {"path": str(path), **rm_metrics(*scores[name])}
        del model
    summary = {"data": args.data, "pairs": len(examples), **results}
    if bayes is not None:
        summary["bayes_accuracy"] = bayes

    # 4. Files: metrics, per-pair scores, histograms (before vs after when there is a baseline).
    write_text_atomic(out / "eval_rm.json", json.dumps(summary, indent=2) + "\n")
    rows = []
    for i, example in enumerate(examples):
        row = {"prompt": example["prompt"], "chosen": example["chosen"], "rejected": example["rejected"]}
        for name, (c, r) in scores.items():
            row[f"{name}_chosen_score"], row[f"{name}_rejected_score"] = float(c[i]), float(r[i])
        rows.append(row)
    write_jsonl_atomic(out / "pair_scores.jsonl", rows)
    c, r = scores["model"]
    plots.histograms({"chosen": c, "rejected": r}, out / "score_hist.png",
                     title=f"reward model scores (accuracy {results['model']['accuracy']:.1%})", xlabel="reward")
    plots.histograms({"r(chosen) − r(rejected)": c - r}, out / "margin_hist.png", title="per-pair reward margin",
                     xlabel="margin")
    if "baseline" in scores:
        bc, br = scores["baseline"]
        plots.histogram_panels(
            {f"before: {Path(args.baseline).name} (acc {results['baseline']['accuracy']:.1%})": {"chosen": bc, "rejected": br},
             f"after: {Path(args.model).name} (acc {results['model']['accuracy']:.1%})": {"chosen": c, "rejected": r}},
            out / "score_hist_before_after.png", xlabel="reward")
        plots.boxplots({"before chosen": bc, "before rejected": br, "after chosen": c, "after rejected": r},
                       out / "score_boxes.png", title="reward model scores")
    print(json.dumps(summary, indent=2))
    return summary


def main(argv=None):
    args = parse_args(EvalRMArgs, argv, prog="python -m minirlhf eval-rm")
    if not args.model:
        raise MinirlhfError("eval-rm: --model (the reward model directory) is required")
    quiet_transformers()
    evaluate_reward_model(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
