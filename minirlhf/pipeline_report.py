"""The main job's report: every number with its uncertainty, and the lessons it claims, checked.

``python -m minirlhf pipeline`` claims lessons (``minirlhf.pipeline.LESSONS``): DPO raises the gold
reward, a small-β PPO over-optimises the reward model, ... A lesson is a gain over the SFT policy
(or the reward model's distance to the Bayes ceiling) against a threshold, and the report shows
at a glance which held:

- **one seed** (``report_one_seed``): every mean with its evaluation standard error (over prompts),
  every gain over SFT with its paired standard error, each lesson ✅ or ❌;
- **several seeds** (``report_seeds``): each cell as mean ± sd over the seeds (every seed its own toy
  world and training run: the spread a newcomer's single run falls in), each lesson per seed and
  for the mean.

``minirlhf.eval.uncertainty`` computes the standard errors; ``machine()`` names where it ran.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from pathlib import Path

import torch

from minirlhf.data.atomic import write_text_atomic
from minirlhf.eval.uncertainty import mean_sd

#: (metric, column title, percent?, signed?) of the results tables
COLUMNS = [
    ("gold", "gold reward r*", False, True),
    ("gold_helpful", "helpful", False, True),
    ("gold_harmless", "harmless", False, True),
    ("math_accuracy", "math acc.", True, False),
    ("proxy", "RM score", False, True),
    ("kl", "KL(π‖π_SFT)", False, False),
    ("length", "length (tokens)", False, False),
    ("filler", "filler words", False, False),
]
PERCENT = {key for key, _, percent, _ in COLUMNS if percent} | {"accuracy", "agreement"}
POINTS = {"bayes_gap"}  # a distance between accuracies: points with one decimal
GAIN_COLUMNS = ("gold", "math_accuracy", "proxy")


@dataclasses.dataclass(frozen=True)
class Lesson:
    """A claim of the main job: ``policy``'s gain over SFT in ``metric`` is at least ``threshold``
    (``at_least=False``: at most). The reward model's lesson uses policy "RM", metric "bayes_gap"."""

    claim: str
    policy: str
    metric: str
    threshold: float
    at_least: bool = True

    def holds(self, value: float) -> bool:
        return value >= self.threshold if self.at_least else value <= self.threshold


def number(key: str, value: float, signed: bool = False) -> str:
    """A value as the tables print it: percent points for accuracies, two decimals otherwise."""
    if value is None or math.isnan(value):
        return "–"
    if key in POINTS:
        return f"{value * 100:.1f} pts"
    if key in PERCENT:
        return f"{value * 100:+.0f} pts" if signed else f"{value * 100:.0f}%"
    if abs(value) >= 10:
        return f"{value:+.1f}" if signed else f"{value:.1f}"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def with_error(key: str, value: float, error: float, signed: bool = False) -> str:
    """``value ± error`` (the error in the value's unit: points for accuracies)."""
    if error is None or math.isnan(error):
        return number(key, value, signed)
    if key in POINTS or key in PERCENT:
        spread = f"{error * 100:.{1 if key in POINTS else 0}f}"
    else:
        spread = f"{error:.1f}" if abs(value) >= 10 else f"{error:.2f}"
    return f"{number(key, value, signed)} ± {spread}"


def check_lessons(lessons, gains: dict) -> list[dict]:
    """Each lesson against ``gains[policy][metric] = (value, SE)``: ``{claim, ..., value, se, held}``."""
    checks = []
    for lesson in lessons:
        if lesson.metric not in gains.get(lesson.policy, {}):
            continue  # its stage did not run (--no-online-dpo)
        value, se = gains[lesson.policy][lesson.metric]
        checks.append({**dataclasses.asdict(lesson), "value": value, "se": se, "held": lesson.holds(value)})
    return checks


def threshold_text(check: dict) -> str:
    return ("≥ " if check["at_least"] else "≤ ") + number(check["metric"], check["threshold"], signed=check["metric"] != "bayes_gap")


def machine() -> str:
    """Where the run ran, in words: CPU model and cores (or the GPU), torch version and threads."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()}-core CPU ({cpu}), {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}")


def load_average() -> str:
    try:
        return "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"
    except OSError:
        return "load average unknown"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _lesson_rows_one_seed(checks):
    return _table(["lesson", "measured ± SE", "threshold", "held"],
                  [[c["claim"], with_error(c["metric"], c["value"], c["se"], signed=c["metric"] != "bayes_gap"),
                    threshold_text(c), "✅" if c["held"] else "❌"] for c in checks])


def report_one_seed(results: dict, title_note: str = "") -> list[str]:
    """The lines of one seed's ``report.md`` body: lessons, reward model, policies, gains.

    ``results``: what ``minirlhf.pipeline`` writes to ``results.json`` (``policies``, ``errors``,
    ``gains``, ``lessons``, ``rm``, ``bayes_accuracy``, ``eval``)."""
    checks, rm, bayes = results["lessons"], results["rm"], results["bayes_accuracy"]
    held = sum(c["held"] for c in checks)
    lines = [f"## Lessons: {held} of {len(checks)} held{title_note}", ""]
    lines += _lesson_rows_one_seed(checks)
    lines += ["", "Each gain is over the SFT policy, on the same held-out prompts; its standard error is that of the "
              "per-prompt differences (paired). A lesson holds when the gain clears its threshold.", ""]
    n_test = rm["pairs"]
    lines += ["## Reward model", ""]
    rows = []
    for label, key in (("before training (random head on the SFT model)", "baseline"), ("after training", "model")):
        accuracy, (gap, gap_se) = rm[key]["accuracy"], rm[key]["bayes_gap"]
        se = math.sqrt(accuracy * (1 - accuracy) / n_test)
        rows.append([label, f"{accuracy:.1%} ± {se:.1%}", f"{bayes - gap:.1%}", f"{bayes:.1%}",
                     f"{gap * 100:.1f} pts ± {gap_se * 100:.1f}"])
    lines += _table(["", f"test accuracy ({n_test} pairs) ± SE", "expected accuracy", "Bayes-optimal E[σ(|Δr*|)]",
                     "gap (expected) ± SE"], rows)
    lines += ["", "Labels were sampled from the Bradley–Terry model of the gold reward, so even the gold reward itself "
              "only reaches the Bayes-optimal accuracy. The expected accuracy is the model's on these pairs averaged "
              "over their labels (σ(Δr*) when it ranks a pair the gold reward's way, σ(−Δr*) when not): the gap, the "
              "lesson's number, then measures the model and not which labels happened to be drawn.", ""]
    lines += rm_on_policy_lines(results)
    evaluation = results["eval"]
    lines += [f"## Policies ({evaluation['prompts']} held-out prompts × {evaluation['samples']} samples at temperature 1; "
              "mean ± SE over prompts)", ""]
    lines += _table(["policy"] + [title for _, title, _, _ in COLUMNS],
                    [[name] + [with_error(key, means[key], results["errors"][name][key], signed)
                               if key in means else "–" for key, _, _, signed in COLUMNS]
                     for name, means in results["policies"].items()])
    lines += ["", "## Gains over SFT (paired by prompt, ± SE)", ""]
    lines += _table(["policy"] + [title for key, title, _, _ in COLUMNS if key in GAIN_COLUMNS],
                    [[name] + [with_error(key, *gains[key], signed=True) if key in gains else "–"
                               for key in GAIN_COLUMNS]
                     for name, gains in results["gains"].items() if name not in ("SFT", "RM")])
    return lines


def rm_on_policy_lines(results: dict) -> list[str]:
    """How the RM ranks the SFT policy's own samples, per prompt kind (``minirlhf.eval.proxy_ranking``)."""
    ranking, samples = results["rm_on_policy"], results["eval"]["samples"]
    rows = [[kind, f"{r['pairs']}", with_error("agreement", *r["agreement"]), with_error("gold", *r["best_of_n_gain"], signed=True),
             with_error("gold", *r["gold_best_of_n_gain"], signed=True)] for kind, r in ranking.items()]
    return [f"### The reward model on the SFT policy's own samples ({samples} per held-out prompt)", "",
            *_table(["prompts", "sample pairs", "ordered as r* orders them", f"gold gain of the RM's best of {samples}",
                     f"gold gain of r*'s best of {samples}"], rows),
            "", "This is what PPO and online DPO ask of the reward model: to rank the policy's own samples, not the "
            "test pairs, whose better response often carries the planted filler. Where it orders them no better than "
            "chance (½), a policy optimised against it has no gold reward to gain; r*'s own best of n is what a "
            "perfect reward model would pick.", ""]


def seeds_summary(per_seed: dict) -> dict:
    """Mean and sd over seeds of every policy mean, gain and lesson value in ``per_seed`` ``{seed: results}``."""
    first = next(iter(per_seed.values()))
    policies = {name: {key: mean_sd([r["policies"][name][key] for r in per_seed.values()]) for key in means}
                for name, means in first["policies"].items()}
    gains = {name: {key: mean_sd([r["gains"][name][key][0] for r in per_seed.values()]) for key in values}
             for name, values in first["gains"].items()}
    lessons = []
    for index, check in enumerate(first["lessons"]):
        values = [r["lessons"][index]["value"] for r in per_seed.values()]
        mean, sd = mean_sd(values)
        lesson = Lesson(check["claim"], check["policy"], check["metric"], check["threshold"], check["at_least"])
        lessons.append({**dataclasses.asdict(lesson), "values": values, "mean": mean, "sd": sd,
                        "held_per_seed": [lesson.holds(v) for v in values], "held_in_mean": lesson.holds(mean)})
    gains_per_seed = {name: {key: [r["gains"][name][key] for r in per_seed.values()] for key in values}
                      for name, values in first["gains"].items()}
    return {"seeds": list(per_seed), "policies": policies, "gains": gains, "gains_per_seed": gains_per_seed,
            "lessons": lessons,
            "rm_accuracy": mean_sd([r["rm"]["model"]["accuracy"] for r in per_seed.values()]),
            "rm_expected_accuracy": mean_sd([r["bayes_accuracy"] - r["rm"]["model"]["bayes_gap"][0]
                                             for r in per_seed.values()]),
            "bayes_accuracy": mean_sd([r["bayes_accuracy"] for r in per_seed.values()]),
            **({"rm_on_policy": {key: mean_sd([r["rm_on_policy"]["all"][key][0] for r in per_seed.values()])
                                 for key in ("agreement", "best_of_n_gain", "gold_best_of_n_gain")}}
               if all("rm_on_policy" in r for r in per_seed.values()) else {})}


def report_seeds(summary: dict) -> list[str]:
    """The lines of a multi-seed ``report.md`` body (``summary`` from ``seeds_summary``)."""
    seeds, lessons = summary["seeds"], summary["lessons"]
    everywhere = sum(all(c["held_per_seed"]) and c["held_in_mean"] for c in lessons)
    lines = [f"## Lessons: {everywhere} of {len(lessons)} held in every seed and in the mean", ""]
    rows = []
    for c in lessons:
        signed = c["metric"] != "bayes_gap"
        cells = [f"{number(c['metric'], v, signed)} {'✅' if ok else '❌'}" for v, ok in zip(c["values"], c["held_per_seed"])]
        rows.append([c["claim"], threshold_text(c)] + cells
                    + [f"{with_error(c['metric'], c['mean'], c['sd'], signed)} {'✅' if c['held_in_mean'] else '❌'}"])
    lines += _table(["lesson", "threshold"] + [f"seed {s}" for s in seeds] + ["mean ± sd"], rows)
    accuracy, expected, bayes = summary["rm_accuracy"], summary["rm_expected_accuracy"], summary["bayes_accuracy"]
    lines += ["", f"Reward model test accuracy {accuracy[0]:.1%} ± {accuracy[1]:.1%} (expected over the labels: "
              f"{expected[0]:.1%} ± {expected[1]:.1%}) against a Bayes-optimal "
              f"{bayes[0]:.1%} ± {bayes[1]:.1%} (mean ± sd over seeds).", ""]
    if "rm_on_policy" in summary:
        on_policy = summary["rm_on_policy"]
        lines += [f"On the SFT policy's own samples the RM orders {with_error('agreement', *on_policy['agreement'])} of the "
                  f"pairs as the gold reward does, and its best sample gains {with_error('gold', *on_policy['best_of_n_gain'], signed=True)} "
                  f"gold (the gold reward's best: {with_error('gold', *on_policy['gold_best_of_n_gain'], signed=True)}); "
                  "see each seed's report.", ""]
    lines += [f"## Policies (mean ± sd over {len(seeds)} seeds)", ""]
    lines += _table(["policy"] + [title for _, title, _, _ in COLUMNS],
                    [[name] + [with_error(key, *means[key], signed) if key in means else "–"
                               for key, _, _, signed in COLUMNS] for name, means in summary["policies"].items()])
    lines += ["", "## Gains over SFT: each seed ± its evaluation SE (paired by prompt), and mean ± sd over seeds"]
    for key, title, _, _ in COLUMNS:
        if key not in GAIN_COLUMNS:
            continue
        lines += ["", f"**{title}**", ""]
        lines += _table(["policy"] + [f"seed {s}" for s in seeds] + ["mean ± sd"],
                        [[name] + [with_error(key, *value, signed=True) for value in per_seed[key]]
                         + [with_error(key, *summary["gains"][name][key], signed=True)]
                         for name, per_seed in summary["gains_per_seed"].items()
                         if name not in ("SFT", "RM") and key in per_seed])
    return lines


def over_optimisation_note(results: dict) -> list[str]:
    """The small-β PPO run in words: RM and gold gains, KL, filler words (none when it did not run)."""
    if "PPO (small β)" not in results["gains"]:
        return []
    gains, means, sft = results["gains"]["PPO (small β)"], results["policies"]["PPO (small β)"], results["policies"]["SFT"]
    verdict = ("the proxy rose while the gold reward fell: over-optimisation" if gains["proxy"][0] > 0 > gains["gold"][0]
               else "no over-optimisation seen in this run")
    return [f"- **PPO with a small β**: RM score {with_error('proxy', *gains['proxy'], signed=True)} and gold "
            f"{with_error('gold', *gains['gold'], signed=True)} vs SFT, at KL {means['kl']:.1f} nats, "
            f"{means['filler']:.2f} filler words per response (SFT: {sft['filler']:.2f}) — {verdict}. Filler words "
            "are the planted length bias: the preference data pays for them, the gold reward does not."]


def write_seed_report(out: Path, results: dict, plots_written: list) -> None:
    """``<out>/report.md`` and ``results.json`` of one seed: the lessons checked, the reward model
    against the Bayes ceiling, every policy's means ± SE and gains over SFT, the plots."""
    quick = " — **--quick preset: the numbers show nothing**" if results["settings"]["quick"] else ""
    lines = [
        "# minirlhf pipeline report",
        "",
        f"Toy world seed {results['seed']}{quick}; {len(results['policies'])} policies; total time "
        f"{results['seconds'] / 60:.1f} min on {results['machine']} ({results['load_average']} at the end).",
        "",
        *report_one_seed(results),
        "",
        "- **gold reward r*** is the truth the preference labels were sampled from; **RM score** is the "
        "proxy the online methods optimise; **KL** is Σ_t log π/π_SFT per response (k1, on samples).",
        *over_optimisation_note(results),
        "", "## Plots", "",
        *[f"![{title}]({path.name})" for title, path in plots_written],
    ]
    write_text_atomic(Path(out) / "report.md", "\n".join(lines) + "\n")
    write_text_atomic(Path(out) / "results.json", json.dumps(results, indent=2) + "\n")


def write_seeds_report(out: Path, per_seed: dict, seconds: float) -> None:
    """``<out>/report.md`` and ``results.json`` of a multi-seed run ``{seed: one seed's results}``:
    mean ± sd over seeds of every cell, and each lesson per seed and in the mean."""
    summary = seeds_summary(per_seed)
    minutes = ", ".join(f"seed {s}: {r['seconds'] / 60:.1f}" for s, r in per_seed.items())
    lines = [
        f"# minirlhf pipeline report: seeds {', '.join(str(s) for s in per_seed)}",
        "",
        f"Each seed is its own toy world (data, SFT policy) and its own training runs; `seed-<s>/report.md` "
        f"has one seed's numbers with their evaluation standard errors. Time per seed, in minutes, as each was "
        f"run: {minutes}; this call {seconds / 60:.1f} min (seeds found finished are not run again) on "
        f"{machine()} ({load_average()} at the end).",
        "",
        *report_seeds(summary),
    ]
    write_text_atomic(Path(out) / "report.md", "\n".join(lines) + "\n")
    write_text_atomic(Path(out) / "results.json", json.dumps(
        {"summary": summary, "per_seed": {str(s): r for s, r in per_seed.items()}, "seconds": seconds}, indent=2) + "\n")
