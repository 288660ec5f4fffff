"""The main job: the whole RLHF pipeline on the embedded toy world, scored against the truth.

    python -m minirlhf pipeline              # one seed (README gives the time on 2 CPU cores)
    python -m minirlhf pipeline --seeds 3    # seeds 0, 1, 2: every cell as mean ± sd over seeds
    python -m minirlhf pipeline --quick      # a minute or two: a first look (and a test)

The toy world (``minirlhf.toy``) knows the gold reward r*(x, y) that its preference labels were
sampled from, so every stage can be measured against the truth instead of against another model:

1. **SFT.** The toy world's SFT policy (``train_sft`` on a corpus that imitates good *and* bad
   responses), built once and cached; it is π_ref for everything below.
2. **RM.** A Bradley–Terry reward model on the preference pairs; its test accuracy is compared
   with the Bayes-optimal accuracy E[σ(|Δr*|)] that no model can beat on BT-sampled labels, and
   its gap to that ceiling is measured in expectation over each pair's label (``bayes_gap``); and
   how it orders the SFT policy's own samples (``proxy_ranking``), which is what PPO and online
   DPO ask of it.
3. **DPO** on the same pairs (offline).
4. **PPO** against the RM with the KL-shaped reward (β = 1).
5. **PPO, small β**: the same with β = 0.01 — the policy drifts far from π_ref and
   exploits what the RM over-pays for (the planted length bias: filler words).
6. **GRPO**, no critic, two rule-based rewards: ``math`` (1 if the answer is right) on the
   verifiable arithmetic prompts, and the gold reward r* itself on all prompts.
7. **Online DPO**: the policy samples pairs, the RM labels them, DPO updates.
8. **Evaluate** every policy on held-out prompts: gold reward and its helpful/harmless parts,
   math accuracy, RM (proxy) score, KL(π‖π_SFT) per response, length and filler words.
9. **Report**: ``<out>/report.md`` (and ``results.json``): the lessons the run claims
   (``LESSONS``) checked, every mean with its evaluation standard error over prompts, every gain
   over SFT with its paired standard error (``minirlhf.eval.uncertainty``), and the plots. With
   ``--seeds K`` each seed runs in ``<out>/seed-<s>`` and the report gives mean ± sd over seeds and
   each lesson per seed (``minirlhf.pipeline_report``).

Every stage is a call of the same ``train_<algo>`` function the CLI runs; a stage whose
``<out>/<stage>/final`` already exists is not trained again, so an interrupted pipeline resumes
where it stopped; with ``--seeds`` a seed whose ``results.json`` is written (same settings) is not
run again either.
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
from minirlhf.data.datasets import load_prompt_data, read_records
from minirlhf.data.prompts import prompt_batch
from minirlhf.eval import plots
from minirlhf.eval.eval_rm import EvalRMArgs, evaluate_reward_model
from minirlhf.eval.overoptimisation import plot_overoptimisation
from minirlhf.eval.proxy_ranking import proxy_ranking
from minirlhf.eval.uncertainty import mean_se, paired_gain, prompt_mean_se
from minirlhf.errors import MinirlhfError
from minirlhf.models.forward import rollout_logprobs
from minirlhf.models.policy import load_policy, load_tokenizer
from minirlhf.models.sampling import generate_rollouts
from minirlhf.pipeline_report import Lesson, check_lessons, load_average, machine, write_seed_report, write_seeds_report
from minirlhf.toy.corpus import bayes_accuracy
from minirlhf.toy.language import gold_reward, math_correct, parse_prompt
from minirlhf.toy.measure import bayes_gap, filler_count, gold_scores
from minirlhf.toy.world import VERSION as TOY_WORLD_VERSION
from minirlhf.train.args import parse_args, saved_args
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
# Each stage's budget beyond its trainer's toy-world settings. RM: a second epoch teaches it more of
# what makes an answer good, which is what PPO and online DPO ask of it (the policy's own samples
# are not ranked by filler). DPO: β = 1 over a third of the pairs keeps the policy near π_SFT. PPO,
# twice with the same budget: with β = 1 the policy gains gold reward while staying close to π_SFT;
# with a small β it over-optimises the RM. GRPO: the math reward keeps paying for more than twice
# the iterations the gold reward needs. Online DPO: twice its trainer's 40 iterations.
RM_EPOCHS = 2.0
DPO_BETA, DPO_EPOCHS = 1.0, 0.35
PPO_BETA, SMALL_BETA, PPO_STEPS = 1.0, 0.01, 60
GRPO_STEPS = {"math": 110, "gold": 45}
ONLINE_DPO_STEPS = 80

#: what the main job claims, checked in every report (gains over SFT on the held-out prompts)
LESSONS = (
    Lesson("the reward model comes within 4 points of the Bayes ceiling", "RM", "bayes_gap", 0.04, at_least=False),
    Lesson("DPO raises the gold reward", "DPO", "gold", 0.15),
    Lesson(f"PPO (β = {PPO_BETA:g}) raises the gold reward", "PPO", "gold", 0.15),
    Lesson(f"PPO with a small β (= {SMALL_BETA:g}) raises the RM score ...", "PPO (small β)", "proxy", 1.0),
    Lesson("... while the gold reward falls: over-optimisation", "PPO (small β)", "gold", -0.3, at_least=False),
    Lesson("GRPO with the math reward raises math accuracy", "GRPO (math)", "math_accuracy", 0.15),
    Lesson("GRPO with the gold reward raises the gold reward", "GRPO (gold)", "gold", 0.8),
    Lesson("online DPO (RM judge) raises the gold reward", "online DPO", "gold", 0.10),
)


@dataclasses.dataclass
class PipelineArgs:
    """SFT -> RM -> DPO -> PPO -> GRPO (+ online DPO) on the toy world; writes <out>/report.md."""

    out: str = "runs/pipeline"
    """Directory of the run: one sub-directory per stage, report.md and the plots."""
    seed: int = 0
    """Seed of the toy world and of every stage (the first one with --seeds)."""
    seeds: int = 1
    """Run this many seeds (--seed, --seed + 1, ...), each its own toy world and training runs in
    <out>/seed-<s>; report.md then gives every cell as mean ± sd over the seeds and each lesson per seed."""
    quick: bool = False
    """A preset of seconds to a minute (tests, a first look): tiny loops, few eval prompts. The
    numbers it reports are not meant to show anything."""
    online_dpo: bool = True
    """Also run online DPO (RM-labelled pairs sampled from the policy)."""
    eval_prompts: int = 0
    """Held-out prompts to evaluate each policy on (0 = all of the toy world's eval prompts)."""
    eval_samples: int = 8
    """Sampled responses per eval prompt (temperature 1, as the policies were trained)."""
    device: typing.Optional[str] = None
    """'cuda', 'cpu', ... (default: CUDA when available)."""
    progress: bool = True
    """Show each stage's progress bar."""


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def run_stage(name, args, train_fn, stage_args, log):
    """Train one stage into ``<out>/<name>`` (skipped when its ``final`` exists and was trained from
    the same model, data and reward: not from another seed's or another toy-world version's); return
    its path."""
    stage_dir = Path(args.out) / name
    final, before = stage_dir / "final", saved_args(stage_dir) or {}
    origin = {key: str(getattr(stage_args, key)) for key in ("model", "data", "reward") if hasattr(stage_args, key)}
    same_inputs = all(str(before.get(key)) == value for key, value in origin.items())
    if final.exists() and same_inputs:
        log(f"[{name}] already trained: {final}")
        return final
    if before and not same_inputs:
        log(f"[{name}] {stage_dir} was trained from other inputs ({before.get('model')}): training the stage again")
        remove_dir(stage_dir)
    started = time.perf_counter()
    stage_args.out = str(stage_dir)
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


#: what ``evaluate_policy`` measures on each response (math accuracy on math prompts only)
METRICS = ("gold", "gold_helpful", "gold_harmless", "math_accuracy", "proxy", "kl", "length", "filler")


@torch.no_grad()
def evaluate_policy(policy, reference, reward_model, tokenizer, prompt_batches, samples):
    """Sample ``samples`` responses per prompt and measure each one.

    Returns ``{"prompt": [...], "kind": [...], metric: [...] for metric in METRICS}``: one entry per
    response, in the order sampled, ``prompt`` being the index of its held-out prompt (what the
    standard errors are computed over), ``kind`` that prompt's kind, and ``math_accuracy`` None off
    the math prompts. KL(π‖π_ref) of a whole response is estimated by Σ_t [log π(y_t) − log π_ref(y_t)]
    on samples y ~ π: the k1 estimator summed over the response, unbiased for the sequence-level KL.
    """
    rows = {key: [] for key in ("prompt", "kind", *METRICS)}
    first = 0
    for batch in prompt_batches:
        rollout = generate_rollouts(policy, tokenizer, batch, max_new_tokens=32, n_per_prompt=samples)
        logprobs, mask = rollout_logprobs(policy, rollout)
        ref_logprobs, _ = rollout_logprobs(reference, rollout)
        rows["prompt"] += (first + rollout["prompt_index"]).tolist()
        for prompt, response in zip(rollout["prompts"], rollout["responses"]):
            for key, value in gold_scores(prompt, response).items():
                rows[key].append(value)
            rows["kind"].append(parse_prompt(prompt).kind)
            rows["math_accuracy"].append(math_correct(prompt, response) if rows["kind"][-1] == "math" else None)
            rows["filler"].append(filler_count(response))
        rows["proxy"] += reward_model(rollout).tolist()
        rows["kl"] += masked_sum(logprobs - ref_logprobs, mask, dim=-1).tolist()
        rows["length"] += rollout["response_length"].tolist()
        first += len(batch["prompts"])
    return rows


def summarise(rows, sft_rows):
    """``(means, standard errors, gains over SFT)`` of one policy's ``evaluate_policy`` rows: the
    SEs over prompts, the gains paired by prompt with their SEs (``minirlhf.eval.uncertainty``)."""
    means, errors, gains = {}, {}, {}
    for key in METRICS:
        if all(value is None for value in rows[key]):
            continue
        means[key], errors[key] = prompt_mean_se(rows[key], rows["prompt"])
        gains[key] = paired_gain(rows[key], rows["prompt"], sft_rows[key], sft_rows["prompt"])
    return means, errors, gains


def prompt_batches(world, tokenizer, limit, device, batch_size=64):
    """The toy world's held-out prompts as left-padded batches (``prompt_batch``)."""
    examples, _ = load_prompt_data(str(world.eval_prompts), world.templates["eval_prompts"], tokenizer, 64)
    examples = examples[:limit] if limit else examples
    return [prompt_batch(examples[start : start + batch_size], tokenizer.pad_token_id, device)
            for start in range(0, len(examples), batch_size)]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


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


def settings(args):
    """What a seed's results depend on: a rerun reuses a finished seed's results only when these match
    (and when they came from this version of the toy world)."""
    return {"toy_world": TOY_WORLD_VERSION,
            **{key: getattr(args, key) for key in ("seed", "quick", "online_dpo", "eval_prompts", "eval_samples")}}


def run_seed(args: PipelineArgs):
    """Run every stage for ``args.seed``, evaluate, write ``<out>/report.md``; returns the results."""
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet_transformers()

    def log(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    # 1. SFT: the toy world's policy (trained with train_sft on first use, then cached).
    log(f"[sft] loading the toy world for seed {args.seed} (the first run trains its SFT policy: about a minute)")
    world = load_toy_world(seed=args.seed)
    sft = str(world.sft_model)

    # Each stage starts from the SFT policy with its trainer's toy-world settings. The offline
    # trainers skip their periodic test-split evaluations: the pipeline evaluates every model itself
    # at the end. --quick trains and evaluates on the first lines of the data files only.
    data = quick_data(world, out / "quick_data") if args.quick else {"data": str(world.pref_train),
                                                                      "eval_data": str(world.pref_test)}
    offline = dict(model=sft, eval_every=0, **data)

    # 2. Reward model, and its accuracy against the Bayes ceiling (before vs after training).
    rm_args = stage_args(RMArgs, args, "rm", **{**RM_TOY_PRESET, "epochs": RM_EPOCHS, **offline})
    rm = run_stage("rm", args, train_rm, rm_args, log)
    rm_eval = evaluate_reward_model(EvalRMArgs(model=str(rm), baseline=sft, data=data["eval_data"],
                                               template=world.templates["pref_test"], out=str(out / "rm" / "eval"),
                                               seed=args.seed, device=args.device))

    # 3.-7. The policies, each starting from this seed's SFT policy (named explicitly: a trainer's own
    #       defaults are the seed-0 toy world) and the online ones sampling this seed's prompts.
    policies = {"SFT": Path(sft)}
    dpo = stage_args(DPOArgs, args, "dpo", **{**DPO_TOY_PRESET, "beta": DPO_BETA, "epochs": DPO_EPOCHS, **offline})
    policies["DPO"] = run_stage("dpo", args, train_dpo, dpo, log)
    for name, stage, beta in (("PPO", "ppo", PPO_BETA), ("PPO (small β)", "ppo_small_beta", SMALL_BETA)):
        ppo = stage_args(PPOArgs, args, "ppo", model=sft, data=str(world.prompts), reward=str(rm), beta=beta,
                         steps=PPO_STEPS)
        policies[name] = run_stage(stage, args, train_ppo, ppo, log)
    for name, stage, reward, prompts in (("GRPO (math)", "grpo_math", "math", world.math_prompts),
                                         ("GRPO (gold)", "grpo_gold", "gold", world.prompts)):
        grpo = stage_args(GRPOArgs, args, "grpo", model=sft, data=str(prompts), reward=reward, steps=GRPO_STEPS[reward])
        policies[name] = run_stage(stage, args, train_grpo, grpo, log)
    if args.online_dpo:
        online = stage_args(OnlineDPOArgs, args, "online_dpo", model=sft, data=str(world.prompts), reward=str(rm),
                            steps=ONLINE_DPO_STEPS)
        policies["online DPO"] = run_stage("online_dpo", args, train_online_dpo, online, log)

    # 8. Evaluate every policy on the held-out prompts: means ± SE, gains over SFT paired by prompt.
    device = select_device(args.device)
    tokenizer = load_tokenizer(sft)
    reference = load_policy(sft, device=device)
    reward_model = RewardModelReward(rm, device=device)
    batches = prompt_batches(world, tokenizer, args.eval_prompts or (16 if args.quick else 0), device)
    per_response, means, errors, gains = {}, {}, {}, {}
    for name, path in policies.items():
        seed_everything(args.seed)
        policy = reference if name == "SFT" else load_policy(str(path), device=device)
        per_response[name] = evaluate_policy(policy, reference, reward_model, tokenizer, batches, args.eval_samples)
        means[name], errors[name], gains[name] = summarise(per_response[name], per_response["SFT"])
        log(f"[eval] {name}: gold {means[name]['gold']:+.2f}, RM {means[name]['proxy']:+.2f}, KL {means[name]['kl']:.2f}")
    # The RM's gap to the Bayes ceiling, in expectation over each test pair's Bradley–Terry label.
    pairs = read_records(out / "rm" / "eval" / "pair_scores.jsonl")
    for model in ("model", "baseline"):
        rm_eval[model]["bayes_gap"] = mean_se([bayes_gap(p["prompt"], p["chosen"], p["rejected"], p[f"{model}_chosen_score"],
                                                         p[f"{model}_rejected_score"]) for p in pairs])
    bayes = bayes_accuracy([(gold_reward(p["prompt"], p["chosen"]), gold_reward(p["prompt"], p["rejected"])) for p in pairs])
    gains["RM"] = {"bayes_gap": rm_eval["model"]["bayes_gap"]}
    # ... and how it ranks the SFT policy's own samples, which is what PPO and online DPO ask of it.
    sft_rows, rm_on_policy = per_response["SFT"], {}
    for kind in ("all", *sorted(set(sft_rows["kind"]))):
        rows = [row for *row, k in zip(sft_rows["gold"], sft_rows["proxy"], sft_rows["prompt"], sft_rows["kind"]) if kind in ("all", k)]
        rm_on_policy[kind] = proxy_ranking(*map(list, zip(*rows)))

    # 9. Plots and report.
    written = make_plots(out, out / "rm" / "eval", per_response, {"PPO": out / "ppo", "PPO (small β)": out / "ppo_small_beta"})
    results = {"seed": args.seed, "settings": settings(args), "rm": rm_eval, "bayes_accuracy": bayes,
               "rm_on_policy": rm_on_policy,
               "eval": {"prompts": sum(len(batch["prompts"]) for batch in batches), "samples": args.eval_samples},
               "policies": means, "errors": errors, "gains": gains, "lessons": check_lessons(LESSONS, gains),
               "seconds": time.perf_counter() - started, "machine": machine(), "load_average": load_average()}
    write_seed_report(out, results, written)
    log(f"report: {out / 'report.md'}")
    return results


def run_pipeline(args: PipelineArgs):
    """Run the pipeline for ``args.seeds`` seeds from ``args.seed`` on; returns the report's path.

    One seed writes into ``<out>``; several write each seed into ``<out>/seed-<s>`` and a summary
    over the seeds into ``<out>/report.md``."""
    if args.seeds < 1:
        raise MinirlhfError(f"--seeds {args.seeds}: expected at least 1")
    if args.seeds == 1:
        run_seed(args)
        return Path(args.out) / "report.md"
    started = time.perf_counter()
    per_seed = {}
    for seed in range(args.seed, args.seed + args.seeds):
        seed_args = dataclasses.replace(args, seed=seed, seeds=1, out=str(Path(args.out) / f"seed-{seed}"))
        finished = Path(seed_args.out) / "results.json"
        previous = json.loads(finished.read_text()) if finished.exists() else {}
        if previous.get("settings") == settings(seed_args):  # a rerun: this seed was evaluated already
            print(f"[seed {seed}] already evaluated: {finished}", file=sys.stderr, flush=True)
            per_seed[seed] = previous
        else:
            per_seed[seed] = run_seed(seed_args)
    write_seeds_report(Path(args.out), per_seed, time.perf_counter() - started)
    return Path(args.out) / "report.md"


def main(argv=None):
    args = parse_args(PipelineArgs, argv, prog="python -m minirlhf pipeline")
    report = run_pipeline(args)
    print(report.read_text())
    return 0
