"""The main job: the whole RLHF pipeline on the embedded toy world, scored against the truth.

    python -m minirlhf pipeline              # ≤ 10 minutes on 2 CPU cores
    python -m minirlhf pipeline --quick      # seconds to a minute: a first look (and a test)

The toy world (``minirlhf.toy``) knows the gold reward r*(x, y) that its preference labels were
sampled from, so every stage can be measured against the truth instead of against another model:

1. **SFT.** The toy world's SFT policy (``train_sft`` on a corpus that imitates good *and* bad
   responses), built once and cached; it is π_ref for everything below.
2. **RM.** A Bradley–Terry reward model on the preference pairs; its test accuracy is compared
   with the Bayes-optimal accuracy E[σ(|Δr*|)] that no model can beat on BT-sampled labels.
3. **DPO** on the same pairs (offline).
4. **PPO** against the RM with the KL-shaped reward (β = 1).
5. **PPO, small β**: the same with β = 0.01 — the policy drifts far from π_ref and
   exploits what the RM over-pays for (the planted length bias: filler words).
6. **GRPO**, no critic, two rule-based rewards: ``math`` (1 if the answer is right) on the
   verifiable arithmetic prompts, and the gold reward r* itself on all prompts.
7. **Online DPO**: the policy samples pairs, the RM labels them, DPO updates.
8. **Evaluate** every policy on held-out prompts: gold reward and its helpful/harmless parts,
   math accuracy, RM (proxy) score, KL(π‖π_SFT) per response, length and filler words.
9. **Report**: ``<out>/report.md`` with the results table and the plots.

Every stage is a call of the same ``train_<algo>`` function the CLI runs; a stage whose
``<out>/<stage>/final`` already exists is not trained again, so an interrupted pipeline resumes
where it stopped.
"""
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path

import torch

from minirlhf.core.masked import masked_sum
from minirlhf.data.atomic import atomic_file, remove_dir, write_text_atomic
from minirlhf.data.datasets import load_prompt_data
from minirlhf.data.prompts import prompt_batch
from minirlhf.eval import plots
from minirlhf.eval.eval_rm import EvalRMArgs, evaluate_reward_model
from minirlhf.eval.overoptimisation import plot_overoptimisation
from minirlhf.models.forward import rollout_logprobs
from minirlhf.models.policy import load_policy, load_tokenizer
from minirlhf.models.sampling import generate_rollouts
from minirlhf.toy.language import gold_reward
from minirlhf.toy.measure import filler_count, gold_summary
from minirlhf.train.args import parse_args
from minirlhf.train.checkpoints import checkpoint_dirs, latest_checkpoint
from minirlhf.train.dpo import DPOArgs, train_dpo
from minirlhf.train.grpo import GRPOArgs, train_grpo
from minirlhf.train.online_dpo import OnlineDPOArgs, train_online_dpo
from minirlhf.train.ppo import PPOArgs, train_ppo
from minirlhf.train.preference import TOY_PRESET as DPO_TOY_PRESET
from minirlhf.train.rewards import RewardModelReward
from minirlhf.train.rm import TOY_PRESET as RM_TOY_PRESET, RMArgs, train_rm
from minirlhf.train.runtime import quiet_transformers, seed_everything, select_device
from minirlhf.train.toy_world import load_toy_world

# --quick shrinks every loop of the trainers' toy-world settings.
QUICK = {
    "rm": dict(epochs=1.0),
    "dpo": dict(epochs=1.0),
    "ppo": dict(steps=4, batch_size=16, minibatch_size=8),
    "grpo": dict(steps=3, batch_size=4, group_size=4),
    "online_dpo": dict(steps=3, batch_size=8),
}
# PPO against the learned RM: with β = 1 the policy gains gold reward while staying close to π_SFT;
# with a small β it over-optimises the RM.
PPO_BETA, PPO_STEPS = 1.0, 60
SMALL_BETA = 0.01


@dataclasses.dataclass
class PipelineArgs:
    """SFT -> RM -> DPO -> PPO -> GRPO (+ online DPO) on the toy world; writes <out>/report.md."""

    out: str = "runs/pipeline"
    """Directory of the run: one sub-directory per stage, report.md and the plots."""
    seed: int = 0
    """Seed of the toy world and of every stage."""
    quick: bool = False
    """A preset of seconds to a minute (tests, a first look): tiny loops, few eval prompts. The
    numbers it reports are not meant to show anything."""
    online_dpo: bool = True
    """Also run online DPO (RM-labelled pairs sampled from the policy)."""
    eval_prompts: int = 0
    """Held-out prompts to evaluate each policy on (0 = all of the toy world's eval prompts)."""
    eval_samples: int = 4
    """Sampled responses per eval prompt (temperature 1, as the policies were trained)."""
    device: typing.Optional[str] = None
    """'cuda', 'cpu', ... (default: CUDA when available)."""
    progress: bool = True
    """Show each stage's progress bar."""


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def run_stage(name, args, train_fn, stage_args, log):
    """Train one stage into ``<out>/<name>`` (skipped when its ``final`` exists); return its path."""
    final = Path(args.out) / name / "final"
    if final.exists():
        log(f"[{name}] already trained: {final}")
        return final
    started = time.perf_counter()
    stage_args.out = str(Path(args.out) / name)
    # An interrupted stage continues from its last complete checkpoint; without one it starts over.
    stage_args.resume = latest_checkpoint(stage_args.out) is not None
    if not stage_args.resume and checkpoint_dirs(stage_args.out):
        log(f"[{name}] no complete checkpoint to continue from: training the stage again")
        remove_dir(Path(stage_args.out) / "checkpoints")
    path = Path(train_fn(stage_args))
    log(f"[{name}] {time.perf_counter() - started:.0f} s -> {path}")
    return path


def quick_data(world, folder, train_pairs=256, eval_pairs=64):
    """--quick: the first lines of the preference files, as ``data``/``eval_data`` arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, source, n in (("data", world.pref_train, train_pairs), ("eval_data", world.pref_test, eval_pairs)):
        paths[key] = str(folder / source.name)
        lines = source.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        write_text_atomic(paths[key], "".join(lines))
    return paths


def stage_args(args_class, args, stage, **fields):
    """``args_class`` with the pipeline's common settings, ``fields``, and the --quick preset."""
    settings = dict(seed=args.seed, device=args.device, progress=args.progress, **fields)
    if args.quick:
        settings.update(QUICK.get(stage, {}))
    return args_class(**settings)


# ---------------------------------------------------------------------------------------------
# Evaluation of a policy against the gold reward, the proxy and the reference
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_policy(policy, reference, reward_model, tokenizer, prompt_batches, samples):
    """Sample ``samples`` responses per prompt and measure them.

    Returns ``(summary, per_response)``: means of gold / helpful / harmless reward, math accuracy,
    proxy (RM) score, KL and length; and the per-response lists (for the distribution plots).
    KL(π‖π_ref) of whole responses is estimated by Σ_t [log π(y_t) − log π_ref(y_t)] on samples
    y ~ π: the k1 estimator summed over the response, unbiased for the sequence-level KL.
    """
    rows = {"gold": [], "proxy": [], "kl": [], "length": [], "filler": []}
    weighted = {}
    for batch in prompt_batches:
        rollout = generate_rollouts(policy, tokenizer, batch, max_new_tokens=32, n_per_prompt=samples)
        logprobs, mask = rollout_logprobs(policy, rollout)
        ref_logprobs, _ = rollout_logprobs(reference, rollout)
        rows["gold"] += [gold_reward(p, r) for p, r in zip(rollout["prompts"], rollout["responses"])]
        rows["proxy"] += reward_model(rollout).tolist()
        rows["kl"] += masked_sum(logprobs - ref_logprobs, mask, dim=-1).tolist()
        rows["length"] += rollout["response_length"].tolist()
        rows["filler"] += [filler_count(r) for r in rollout["responses"]]
        n = len(rollout["responses"])
        for key, value in gold_summary(rollout["prompts"], rollout["responses"]).items():
            weighted.setdefault(key, []).append((value, n))
    summary = {k: sum(v * n for v, n in pairs) / sum(n for _, n in pairs) for k, pairs in weighted.items()}
    summary.update({k: sum(v) / len(v) for k, v in rows.items() if k != "gold"})
    return summary, rows


def prompt_batches(world, tokenizer, limit, device, batch_size=64):
    """The toy world's held-out prompts as left-padded batches (``prompt_batch``)."""
    examples, _ = load_prompt_data(str(world.eval_prompts), world.templates["eval_prompts"], tokenizer, 64)
    examples = examples[:limit] if limit else examples
    return [prompt_batch(examples[start : start + batch_size], tokenizer.pad_token_id, device)
            for start in range(0, len(examples), batch_size)]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

COLUMNS = [
    ("gold", "gold reward r*", "{:+.2f}"),
    ("gold_helpful", "helpful", "{:+.2f}"),
    ("gold_harmless", "harmless", "{:+.2f}"),
    ("math_accuracy", "math acc.", "{:.0%}"),
    ("proxy", "RM score", "{:+.2f}"),
    ("kl", "KL(π‖π_SFT)", "{:.2f}"),
    ("length", "length (tokens)", "{:.1f}"),
    ("filler", "filler words", "{:.2f}"),
]


def results_table(results):
    header = "| policy | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, summary in results.items():
        cells = [fmt.format(summary[key]) if key in summary else "–" for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(args, world, rm_eval, results, num_prompts, plots_written, seconds):
    """``<out>/report.md``: what ran, the RM against the Bayes ceiling, the results table, plots."""
    bayes = world.bayes_accuracy["pref_test"]
    rm_accuracy = rm_eval["model"]["accuracy"]
    sft, small = results["SFT"], results.get("PPO (small β)")
    lines = [
        "# minirlhf pipeline report",
        "",
        f"Toy world seed {args.seed}{' — **--quick preset: the numbers show nothing**' if args.quick else ''}; "
        f"total time {seconds / 60:.1f} min; {len(results)} policies evaluated on "
        f"{num_prompts} held-out prompts × {args.eval_samples} samples each.",
        "",
        "## Reward model",
        "",
        "| | test accuracy | Bayes-optimal accuracy E[σ(|Δr*|)] | gap |",
        "|---|---|---|---|",
        f"| before training (random head on the SFT model) | {rm_eval['baseline']['accuracy']:.1%} | {bayes:.1%} | "
        f"{(bayes - rm_eval['baseline']['accuracy']) * 100:.1f} pts |",
        f"| after training | {rm_accuracy:.1%} | {bayes:.1%} | {(bayes - rm_accuracy) * 100:.1f} pts |",
        "",
        "Labels were sampled from the Bradley–Terry model of the gold reward, so even the gold reward "
        "itself only reaches the Bayes-optimal accuracy.",
        "",
        "## Policies (held-out prompts, sampled at temperature 1)",
        "",
        results_table(results),
        "",
        "- **gold reward r*** is the truth the preference labels were sampled from; **RM score** is the "
        "proxy the online methods optimise; **KL** is Σ_t log π/π_SFT per response (k1, on samples).",
        "- Gain over SFT in gold reward: "
        + ", ".join(f"{name} {summary['gold'] - sft['gold']:+.2f}" for name, summary in results.items() if name != "SFT")
        + ".",
    ]
    if small is not None:
        proxy_gain, gold_gain = small["proxy"] - sft["proxy"], small["gold"] - sft["gold"]
        verdict = ("the proxy rose while the gold reward fell: over-optimisation"
                   if proxy_gain > 0 > gold_gain else "no over-optimisation seen in this run")
        lines.append(
            f"- **PPO with a small β** (β = {SMALL_BETA}): RM score {proxy_gain:+.2f} and gold "
            f"{gold_gain:+.2f} vs SFT, at KL {small['kl']:.1f} nats, {small['filler']:.2f} filler words per "
            f"response (SFT: {sft['filler']:.2f}) — {verdict}. Filler words are the planted length bias: the "
            "preference data pays for them, the gold reward does not."
        )
    lines += ["", "## Plots", ""]
    lines += [f"![{title}]({path.name})" for title, path in plots_written]
    write_text_atomic(Path(args.out) / "report.md", "\n".join(lines) + "\n")
    write_text_atomic(Path(args.out) / "results.json", json.dumps(
        {"rm": rm_eval, "bayes_accuracy": bayes, "policies": results, "seconds": seconds}, indent=2) + "\n")


def make_plots(out, rm_eval_dir, per_response, ppo_runs):
    """Score and length distributions per policy, and the over-optimisation curves."""
    written = []
    for title, path in [("RM scores: chosen vs rejected, before vs after training", rm_eval_dir / "score_hist_before_after.png")]:
        if path.exists():
            target = Path(out) / path.name
            with atomic_file(target, "wb") as f:
                f.write(path.read_bytes())
            written.append((title, target))
    for key, xlabel, title in [("gold", "gold reward r*", "Gold reward per response"),
                               ("proxy", "RM score", "Reward-model score per response"),
                               ("length", "response tokens", "Response length")]:
        path = Path(out) / f"{key}_by_policy.png"
        plots.boxplots({name: rows[key] for name, rows in per_response.items()}, path, title=title, ylabel=xlabel)
        written.append((title, path))
    path = Path(out) / "overoptimisation.png"
    try:
        plot_overoptimisation(ppo_runs, path)
        written.append(("Gold vs proxy reward against KL during PPO (Gao et al.)", path))
    except ValueError as err:  # too few PPO iterations to draw (--quick)
        print(f"no over-optimisation plot: {err}", file=sys.stderr)
    return written


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def run_pipeline(args: PipelineArgs):
    """Run every stage, evaluate, write the report; returns the report's path."""
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet_transformers()

    def log(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    # 1. SFT: the toy world's policy (trained with train_sft on first use, then cached).
    log("[sft] loading the toy world (the first run trains its SFT policy: a few minutes)")
    world = load_toy_world(seed=args.seed)
    sft = str(world.sft_model)

    # Each stage starts from the SFT policy with its trainer's toy-world settings. The offline
    # trainers skip their periodic test-split evaluations: the pipeline evaluates every model itself
    # at the end. --quick trains and evaluates on the first lines of the data files only.
    data = quick_data(world, out / "quick_data") if args.quick else {}
    offline = dict(model=sft, eval_every=0, **data)

    # 2. Reward model, and its accuracy against the Bayes ceiling (before vs after training).
    rm = run_stage("rm", args, train_rm, stage_args(RMArgs, args, "rm", **{**RM_TOY_PRESET, **offline}), log)
    rm_eval = evaluate_reward_model(EvalRMArgs(model=str(rm), baseline=sft, data=data.get("eval_data"),
                                               out=str(out / "rm" / "eval"), seed=args.seed, device=args.device))

    # 3.-7. The policies, each starting from the SFT policy.
    policies = {"SFT": Path(sft)}
    dpo_args = stage_args(DPOArgs, args, "dpo", **{**DPO_TOY_PRESET, **offline})
    policies["DPO"] = run_stage("dpo", args, train_dpo, dpo_args, log)
    ppo = stage_args(PPOArgs, args, "ppo", reward=str(rm), beta=PPO_BETA, steps=PPO_STEPS)
    policies["PPO"] = run_stage("ppo", args, train_ppo, ppo, log)
    small = stage_args(PPOArgs, args, "ppo", reward=str(rm), beta=SMALL_BETA, steps=PPO_STEPS)
    policies["PPO (small β)"] = run_stage("ppo_small_beta", args, train_ppo, small, log)
    grpo_math = stage_args(GRPOArgs, args, "grpo", reward="math", data=str(world.math_prompts))
    policies["GRPO (math)"] = run_stage("grpo_math", args, train_grpo, grpo_math, log)
    grpo_gold = stage_args(GRPOArgs, args, "grpo", reward="gold", data=str(world.prompts))
    policies["GRPO (gold)"] = run_stage("grpo_gold", args, train_grpo, grpo_gold, log)
    if args.online_dpo:
        online = stage_args(OnlineDPOArgs, args, "online_dpo", reward=str(rm))
        policies["online DPO"] = run_stage("online_dpo", args, train_online_dpo, online, log)

    # 8. Evaluate every policy on the held-out prompts.
    device = select_device(args.device)
    tokenizer = load_tokenizer(sft)
    reference = load_policy(sft, device=device)
    reward_model = RewardModelReward(rm, device=device)
    batches = prompt_batches(world, tokenizer, args.eval_prompts or (16 if args.quick else 0), device)
    results, per_response = {}, {}
    for name, path in policies.items():
        seed_everything(args.seed)
        policy = reference if name == "SFT" else load_policy(str(path), device=device)
        results[name], per_response[name] = evaluate_policy(policy, reference, reward_model, tokenizer,
                                                            batches, args.eval_samples)
        log(f"[eval] {name}: gold {results[name]['gold']:+.2f}, RM {results[name]['proxy']:+.2f}, "
            f"KL {results[name]['kl']:.2f}")

    # 9. Plots and report.
    written = make_plots(out, out / "rm" / "eval", per_response, {"PPO": out / "ppo", "PPO (small β)": out / "ppo_small_beta"})
    num_prompts = sum(len(batch["prompts"]) for batch in batches)
    write_report(args, world, rm_eval, results, num_prompts, written, time.perf_counter() - started)
    log(f"report: {out / 'report.md'}")
    return out / "report.md"


def main(argv=None):
    args = parse_args(PipelineArgs, argv, prog="python -m minirlhf pipeline")
    report = run_pipeline(args)
    print(report.read_text())
    return 0
