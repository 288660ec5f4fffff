"""``python -m minirlhf data inspect FILE --template NAME``: what a dataset holds after conversion.

Prints the record counts (kept, skipped by reason, truncated), the first ``--n`` converted
examples, and length statistics per group (chosen vs rejected for preference data: a length gap
between them is a bias a reward model will happily learn). ``--tokenizer`` measures lengths in
tokens after chat formatting and truncation, otherwise in words. ``--plot out.png`` draws the
length histograms.
"""
import argparse
import statistics
from pathlib import Path

from matplotlib.figure import Figure

from minirlhf.data.atomic import atomic_file
from minirlhf.data.datasets import (
    convert_records,
    load_kto_data,
    load_preference_data,
    load_prompt_data,
    load_sft_data,
)
from minirlhf.data.templates import TEMPLATES, KTOExample, PreferenceExample, PromptExample, SFTExample
from minirlhf.errors import DataError
from minirlhf.models.policy import load_tokenizer


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m minirlhf data", description="Inspect a dataset.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="counts, examples and length statistics after conversion")
    inspect.add_argument("file", help="a JSON/JSONL file (or a Hugging Face dataset NAME[:SPLIT])")
    inspect.add_argument("--template", required=True, help=f"one of: {', '.join(sorted(TEMPLATES))}")
    inspect.add_argument("--tokenizer", help="tokenizer name or path: count tokens (after chat formatting) instead of words")
    inspect.add_argument("--plot", help="write the length histograms to this image file (e.g. lengths.png)")
    inspect.add_argument("--n", type=int, default=3, help="how many converted examples to show (default 3)")
    inspect.add_argument("--max-len", type=int, default=512, help="truncation length with --tokenizer (default 512)")
    inspect.add_argument("--max-prompt-len", type=int, default=256, help="prompt truncation with --tokenizer (default 256)")
    inspect.add_argument("--system-prompt", help="system prompt for the chat template (default: the template's)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.plot and Path(args.plot).suffix.lower() not in (".png", ".pdf", ".svg"):
        raise DataError(f"--plot {args.plot}: expected a .png, .pdf or .svg file name")
    converted, report = convert_records(args.file, args.template, kind=None)
    if not converted:
        print(report)
        raise DataError(f"{args.file}: no usable record (all {report.records} skipped)")
    kind = type(converted[0][1])
    if args.tokenizer:
        report, groups, shown = _token_lengths(args, kind)
        unit = "tokens"
    else:
        examples = [example for _, example in converted]
        groups, shown = _word_lengths(examples, kind), [_describe(e) for e in examples[: args.n]]
        unit = "words"

    print(report)
    for i, text in enumerate(shown):
        print(f"\n--- example {i} ---\n{text}")
    print(f"\nlengths in {unit}:")
    for name, lengths in groups.items():
        print(f"  {name:<12} {_stats(lengths)}")
    if kind is PreferenceExample:
        chosen, rejected = groups["chosen"], groups["rejected"]
        longer = sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)
        print(f"  chosen is longer than rejected in {longer:.1%} of pairs")
    if args.plot:
        _plot(groups, unit, f"{Path(args.file).name} (template {args.template})", args.plot)
        print(f"\nwrote {args.plot}")
    return 0


def _token_lengths(args, kind):
    tokenizer = load_tokenizer(args.tokenizer)
    options = dict(max_len=args.max_len, max_prompt_len=args.max_prompt_len, system_prompt=args.system_prompt)
    if kind is PreferenceExample:
        examples, report = load_preference_data(args.file, args.template, tokenizer, **options)
        groups = {side: [sum(e[f"{side}_response_mask"]) for e in examples] for side in ("chosen", "rejected")}
        shown = [_decode(tokenizer, e["chosen_input_ids"], e["chosen_response_mask"]) for e in examples[: args.n]]
    elif kind is PromptExample:
        examples, report = load_prompt_data(args.file, args.template, tokenizer, args.max_prompt_len, args.system_prompt)
        groups = {"prompt": [len(e["input_ids"]) for e in examples]}
        shown = [tokenizer.decode(e["input_ids"]) for e in examples[: args.n]]
    else:
        load = load_sft_data if kind is SFTExample else load_kto_data
        examples, report = load(args.file, args.template, tokenizer, **options)
        groups = _group_single(examples, kind, lambda e: sum(e["response_mask"]))
        shown = [_decode(tokenizer, e["input_ids"], e["response_mask"]) for e in examples[: args.n]]
    return report, groups, shown


def _word_lengths(examples, kind):
    if kind is PreferenceExample:
        return {"chosen": [_words(e.chosen) for e in examples], "rejected": [_words(e.rejected) for e in examples]}
    if kind is PromptExample:
        return {"prompt": [_words(e.prompt) for e in examples]}
    return _group_single(examples, kind, lambda e: _words(e.response if kind is SFTExample else e.completion))


def _group_single(examples, kind, length):
    if kind is KTOExample:
        label = (lambda e: e["label"]) if isinstance(examples[0], dict) else (lambda e: e.label)
        return {"desirable": [length(e) for e in examples if label(e)],
                "undesirable": [length(e) for e in examples if not label(e)]}
    return {"response": [length(e) for e in examples]}


def _words(text):
    if isinstance(text, list):  # a conversation
        text = " ".join(m["content"] for m in text)
    return len(text.split())


def _describe(example, width=300):
    return "\n".join(f"{name}: {_short(value, width)}" for name, value in vars(example).items())


def _decode(tokenizer, input_ids, response_mask):
    """The sequence as the model sees it, the trained response part between ⟦ ⟧."""
    start = response_mask.index(1)
    return tokenizer.decode(input_ids[:start]) + "⟦" + tokenizer.decode(input_ids[start:]) + "⟧"


def _short(value, width):
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[:width] + f"... ({len(text)} chars)"


def _stats(lengths):
    if not lengths:
        return "n=0"
    std = statistics.pstdev(lengths)
    return (f"n={len(lengths)}  mean={statistics.fmean(lengths):.1f}  median={statistics.median(lengths):g}  "
            f"std={std:.1f}  min={min(lengths)}  max={max(lengths)}")


def _plot(groups, unit, title, path):
    values = [v for lengths in groups.values() for v in lengths]
    bins = min(50, max(values) - min(values) + 1)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, lengths in groups.items():
        ax.hist(lengths, bins=bins, range=(min(values), max(values) + 1), alpha=0.5, label=f"{name} (n={len(lengths)})")
    ax.set(xlabel=f"length ({unit})", ylabel="count", title=title)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path, "wb") as f:  # never a half-written image
        fig.savefig(f, format=Path(path).suffix[1:].lower())
