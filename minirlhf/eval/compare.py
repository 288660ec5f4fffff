"""Compare two policies' generations on the same prompts: ``python -m minirlhf compare``.

    python -m minirlhf generate --model SFT_DIR --out base.jsonl
    python -m minirlhf generate --model runs/dpo/final --out tuned.jsonl
    python -m minirlhf compare --base base.jsonl --tuned tuned.jsonl --reward-model runs/rm/final

Both files hold ``prompt`` + ``response`` records (``generate``'s output; several samples per prompt
are fine). With ``--reward-model`` every response is scored by r_φ exactly as the trainers score it
(from the token ids ``generate`` records; a response cut at the budget gets no end-of-turn token:
see ``minirlhf/eval/score.py``); otherwise a ``score`` field already in the files is used (``score``
writes one). Responses are grouped by prompt and the
per-prompt mean scores compared on the prompts both files have:

    win rate = mean over prompts of 1[s_tuned(x) > s_base(x)] (+ ½ for a tie)

Writes to ``--out``: ``summary.json`` and ``summary.md`` (means, std, win rate, lengths; the gold
reward too in the toy world), ``per_prompt.jsonl``, and PNGs — score distributions (histogram and
box plot), per-prompt score differences, response-length distributions, and the same for gold.
"""
import dataclasses
import json
import statistics
import sys
import typing
from pathlib import Path

from minirlhf.data.atomic import write_jsonl_atomic, write_text_atomic
from minirlhf.errors import MinirlhfError
from minirlhf.eval import plots
from minirlhf.eval.score import read_prompt_responses, score_generations
from minirlhf.models.policy import load_tokenizer
from minirlhf.models.reward_model import load_reward_model
from minirlhf.toy.language import gold_reward
from minirlhf.toy.measure import is_toy_prompt
from minirlhf.train.args import parse_args
from minirlhf.train.runtime import quiet_transformers, select_device


@dataclasses.dataclass
class CompareArgs:
    """Compare base vs tuned generations: scores, win rate, lengths (and gold in the toy world)."""

    base: str = ""
    """Generations of the base policy (JSONL of prompt, response; e.g. from `generate`)."""
    tuned: str = ""
    """Generations of the tuned policy on the same prompts."""
    reward_model: typing.Optional[str] = None
    """Reward model that scores both files (default: use the files' own `score` fields)."""
    out: typing.Optional[str] = None
    """Output directory (default: <tuned>.compare/ next to --tuned)."""
    base_name: str = "base"
    """Label of --base in plots and tables."""
    tuned_name: str = "tuned"
    """Label of --tuned in plots and tables."""
    template: str = "sft"
    """Template reading a record as (prompt, response)."""
    tokenizer: typing.Optional[str] = None
    """Tokenizer for response lengths in tokens (default: the reward model's; else whitespace words)."""
    batch_size: int = 32
    """Responses per reward-model forward pass."""
    max_len: int = 512
    """Maximum tokens of prompt + response when scoring."""
    system_prompt: typing.Optional[str] = None
    """System prompt used when scoring."""
    device: typing.Optional[str] = None
    """'cuda', 'cpu', ... (default: CUDA when available)."""


def _key(prompt):
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def win_rate(differences):
    """Fraction of positive differences, ties counted ½."""
    return sum((d > 0) + 0.5 * (d == 0) for d in differences) / len(differences) if differences else float("nan")


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "n": len(values)}


def _per_prompt_means(rows, field):
    groups = {}
    for row in rows:
        if row[field] is not None:
            groups.setdefault(row["key"], []).append(row[field])
    return {k: statistics.fmean(v) for k, v in groups.items()}


def load_generations(path, args, model, tokenizer, device):
    """Rows ``{key, prompt, response, score, gold, length}`` of a generation file."""
    records = read_prompt_responses(path, args.template)
    prompts, responses = [r.prompt for r in records], [r.response for r in records]
    if model is not None:  # scored as the trainers score them (see minirlhf/eval/score.py)
        scores = score_generations(model, tokenizer, records, batch_size=args.batch_size, max_len=args.max_len,
                                   system_prompt=args.system_prompt, device=device)
    else:
        scores = [r.record.get("score") for r in records]
    gold = [r.record.get("gold") for r in records]
    if any(g is None for g in gold):
        toy = prompts and all(map(is_toy_prompt, prompts))
        gold = [gold_reward(p, y) for p, y in zip(prompts, responses)] if toy else [None] * len(records)
    if tokenizer is not None:
        lengths = [len(tokenizer(y, add_special_tokens=False)["input_ids"]) for y in responses]
    else:
        lengths = [len(y.split()) for y in responses]
    return [{"key": _key(p), "prompt": p, "response": y, "score": s, "gold": g, "length": n}
            for p, y, s, g, n in zip(prompts, responses, scores, gold, lengths)]


def compare(args: CompareArgs):
    """Run the comparison; returns the summary dict (also written to ``<out>/summary.json``)."""
    # 1. Score both files (or read their scores); lengths in tokens when a tokenizer is at hand.
    device = select_device(args.device)
    model = tokenizer = None
    if args.reward_model:
        model = load_reward_model(args.reward_model, device=device)
    if args.tokenizer or args.reward_model:
        tokenizer = load_tokenizer(args.tokenizer or args.reward_model)
    names = (args.base_name, args.tuned_name)
    rows = {name: load_generations(path, args, model, tokenizer, device) for name, path in zip(names, (args.base, args.tuned))}
    has = {field: any(r[field] is not None for name in names for r in rows[name]) for field in ("score", "gold")}
    if not has["score"] and not has["gold"]:
        raise MinirlhfError("compare: nothing to compare — give --reward-model, or files with 'score' fields "
                            "(python -m minirlhf score), or toy-world prompts (gold reward)")

    # 2. Per-prompt means on the prompts both files answered; differences and win rates.
    summary = {"base": args.base, "tuned": args.tuned, "reward_model": args.reward_model,
               "length_unit": "tokens" if tokenizer is not None else "words"}
    per_prompt, differences = {}, {}
    for field in ("score", "gold"):
        if not has[field]:
            continue
        means = {name: _per_prompt_means(rows[name], field) for name in names}
        shared = [k for k in means[names[0]] if k in means[names[1]]]
        if not shared:
            raise MinirlhfError(f"compare: {args.base} and {args.tuned} have no prompt in common")
        differences[field] = [means[names[1]][k] - means[names[0]][k] for k in shared]
        for k in shared:
            per_prompt.setdefault(k, {"prompt": k})
            per_prompt[k].update({f"{names[0]}_{field}": means[names[0]][k], f"{names[1]}_{field}": means[names[1]][k]})
        summary[field] = {
            **{name: _stats([r[field] for r in rows[name]]) for name in names},
            "prompts": len(shared),
            "win_rate": win_rate(differences[field]),
            "mean_difference": statistics.fmean(differences[field]),
        }
    summary["length"] = {name: _stats([r["length"] for r in rows[name]]) for name in names}

    # 3. Files: summary (JSON + markdown), per-prompt table, plots.
    out = Path(args.out or Path(args.tuned).with_suffix(".compare"))
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "summary.md", summary_markdown(summary, names))
    write_jsonl_atomic(out / "per_prompt.jsonl", per_prompt.values())
    label = {"score": "reward-model score", "gold": "gold reward"}
    for field in differences:
        groups = {name: [r[field] for r in rows[name]] for name in names}
        plots.histograms(groups, out / f"{field}_hist.png", title=f"{label[field]} distribution", xlabel=label[field])
        plots.boxplots(groups, out / f"{field}_box.png", title=label[field], ylabel=label[field])
        plots.difference_histogram(differences[field], out / f"{field}_diff_hist.png",
                                   title=f"per-prompt {label[field]}", xlabel=f"{names[1]} − {names[0]}")
    plots.histograms({name: [r["length"] for r in rows[name]] for name in names}, out / "length_hist.png",
                     title="response length", xlabel=f"response length ({summary['length_unit']})", bins=30)
    print((out / "summary.md").read_text())
    return summary


def summary_markdown(summary, names):
    """The summary as a small markdown table."""
    lines = [f"| | {names[0]} | {names[1]} | win rate of {names[1]} |", "|---|---|---|---|"]

    def cell(stats):
        return "–" if stats["mean"] is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}"

    for field, label in (("score", "RM score"), ("gold", "gold reward")):
        if field in summary:
            s = summary[field]
            lines.append(f"| {label} | {cell(s[names[0]])} | {cell(s[names[1]])} | {s['win_rate']:.1%} "
                         f"({s['prompts']} prompts) |")
    length = summary["length"]
    lines.append(f"| length ({summary['length_unit']}) | {cell(length[names[0]])} | {cell(length[names[1]])} | |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(CompareArgs, argv, prog="python -m minirlhf compare")
    if not args.base or not args.tuned:
        raise MinirlhfError("compare: --base and --tuned (generation JSONL files) are required")
    quiet_transformers()
    compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
