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

import torch

from minirlhf.core.reward_losses import bradley_terry_loss
from minirlhf.data.collate import collate_preference
from minirlhf.data.datasets import load_preference_data
from minirlhf.eval import plots
from minirlhf.models.policy import load_tokenizer
from minirlhf.models.reward_model import RewardModel
from minirlhf.train import common


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


def load_reward_model(path, device=None, seed=0):
    """A saved reward model, or — for a causal-LM checkpoint — its backbone with a random head."""
    config = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").exists() else {}
    if any(a.endswith("ForCausalLM") for a in config.get("architectures") or []):
        return RewardModel.from_causal_lm(path, device=device, seed=seed)
    return RewardModel.from_pretrained(path, device=device)


@torch.no_grad()
def pair_scores(model, examples, pad_id, batch_size, device):
    """``(chosen [N], rejected [N])`` end scores r(x, y_w), r(x, y_l) of preference examples (float32,
    CPU); one forward per batch over the concatenated ``[2B, L]`` pairs."""
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(examples), batch_size):
        batch = common.to_device(collate_preference(examples[start : start + batch_size], pad_id), device)
        with common.autocast(device):
            _, end_scores = model(batch["input_ids"], batch["attention_mask"])
        c, r = end_scores.float().cpu().chunk(2)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def rm_metrics(chosen, rejected):
    """Accuracy (ties ½), Bradley–Terry loss, reward mean/std over all 2N responses, chosen and
    rejected mean rewards and the mean margin r(y_w) − r(y_l)."""
    loss, accuracy = bradley_terry_loss(chosen, rejected)
    both = torch.cat([chosen, rejected])
    return {
        "accuracy": float(accuracy),
        "loss": float(loss),
        "reward_mean": float(both.mean()),
        "reward_std": float(both.std()) if both.numel() > 1 else 0.0,
        "chosen_reward": float(chosen.mean()),
        "rejected_reward": float(rejected.mean()),
        "margin": float((chosen - rejected).mean()),
    }


def evaluate_reward_model(args: EvalRMArgs):
    """Run the evaluation; returns ``{"model": metrics, "baseline": metrics?}`` and writes the files."""
    # 1. Defaults: the toy world's test split and its Bayes-optimal accuracy.
    bayes = None
    if args.data is None:
        world = common.toy_world(sft=False)
        args.data, args.template = str(world.pref_test), world.templates["pref_test"]
        bayes = world.bayes_accuracy["pref_test"]
    out = Path(args.out or Path(args.model) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    device = common.select_device(args.device)

    # 2. Data (tokenized with the evaluated model's tokenizer).
    tokenizer = load_tokenizer(args.model)
    examples, report = load_preference_data(args.data, args.template, tokenizer, system_prompt=args.system_prompt,
                                            **common.data_limits(args))
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
    (out / "eval_rm.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "pair_scores.jsonl", "w") as f:
        for i, example in enumerate(examples):
            row = {"prompt": example["prompt"], "chosen": example["chosen"], "rejected": example["rejected"]}
            for name, (c, r) in scores.items():
                row[f"{name}_chosen_score"], row[f"{name}_rejected_score"] = float(c[i]), float(r[i])
            f.write(json.dumps(row) + "\n")
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
    args = common.parse_args(EvalRMArgs, argv, prog="python -m minirlhf eval-rm")
    if not args.model:
        raise common.MinirlhfError("eval-rm: --model (the reward model directory) is required")
    common.quiet_transformers()
    evaluate_reward_model(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
