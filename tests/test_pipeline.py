"""The main job end to end: `python -m minirlhf pipeline --quick` on the toy world."""
import json
import math
from pathlib import Path

import pytest

from minirlhf.__main__ import main
from minirlhf.pipeline import LESSONS

POLICIES = ["SFT", "DPO", "PPO", "PPO (small β)", "GRPO (math)", "GRPO (gold)", "online DPO"]


def test_pipeline_quick_writes_report_with_every_stage(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pipeline", "--quick", "--out", str(out), "--no-progress", "--eval-prompts", "8", "--eval-samples", "1"]
    assert main(argv) == 0

    report = (out / "report.md").read_text()
    for name in POLICIES:
        assert f"| {name} |" in report
    assert "Bayes-optimal accuracy" in report
    results = json.loads((out / "results.json").read_text())
    assert list(results["policies"]) == POLICIES
    for summary in results["policies"].values():
        assert all(math.isfinite(v) for v in summary.values())
    assert results["policies"]["SFT"]["kl"] == 0.0  # the reference against itself
    assert 0.5 < results["bayes_accuracy"] < 1.0
    for stage in ["rm", "dpo", "ppo", "ppo_small_beta", "grpo_math", "grpo_gold", "online_dpo"]:
        assert (out / stage / "final" / "config.json").exists()
    for plot in ["gold_by_policy.png", "proxy_by_policy.png", "length_by_policy.png"]:
        assert (out / plot).stat().st_size > 0

    # Every number carries its standard error; every lesson is checked.
    for name in POLICIES:
        assert set(results["errors"][name]) == set(results["policies"][name])
        assert results["gains"][name]["gold"][0] == pytest.approx(results["policies"][name]["gold"]
                                                                  - results["policies"]["SFT"]["gold"])
    assert results["gains"]["SFT"]["gold"] == [0.0, 0.0]
    assert [c["policy"] for c in results["lessons"]] == [lesson.policy for lesson in LESSONS]
    assert all(isinstance(c["held"], bool) and math.isfinite(c["se"]) for c in results["lessons"])
    assert "## Lessons:" in report and " ± " in report
    # One sample per prompt: no pair of the SFT policy's own samples for the RM to order.
    assert results["rm_on_policy"]["all"]["pairs"] == 0 and "the SFT policy's own samples" in report

    # A second run finds every stage trained and only evaluates again.
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().err.count("already trained") == 7

    # --seeds 2 runs each seed in <out>/seed-<s>; a seed whose results are there (same settings) is
    # not run again: here both are, so only the summary over the seeds is written.
    seeds_out = tmp_path / "seeds"
    for seed, shift in ((0, 0.0), (1, 1.0)):
        (seeds_out / f"seed-{seed}").mkdir(parents=True)
        one = json.loads(json.dumps(results))
        one["seed"] = one["settings"]["seed"] = seed
        one["policies"]["DPO"]["gold"] += shift
        one["gains"]["DPO"]["gold"][0] += shift
        one["lessons"][1]["value"] += shift
        (seeds_out / f"seed-{seed}" / "results.json").write_text(json.dumps(one))
    argv_seeds = ["pipeline", "--quick", "--seeds", "2", "--out", str(seeds_out)] + argv[4:]
    assert main(argv_seeds) == 0
    assert capsys.readouterr().err.count("already evaluated") == 2
    summary = json.loads((seeds_out / "results.json").read_text())["summary"]
    dpo = summary["lessons"][1]
    assert dpo["policy"] == "DPO" and dpo["values"][1] == pytest.approx(dpo["values"][0] + 1.0)
    assert dpo["sd"] == pytest.approx(math.sqrt(0.5))
    report = (seeds_out / "report.md").read_text()
    assert "| seed 0 | seed 1 | mean ± sd |" in report


def test_every_stage_trains_from_the_seeds_own_world(tmp_path, monkeypatch):
    """A trainer's own defaults are the seed-0 toy world: the pipeline must name seed s's SFT policy
    and prompts for every stage, or seed s's policies start from another world's SFT policy."""
    from types import SimpleNamespace

    from minirlhf import pipeline

    root = tmp_path / "toy-7"
    files = {name: root / "data" / f"{name}.jsonl" for name in ("pref_train", "pref_test", "prompts", "math_prompts")}
    world = SimpleNamespace(sft_model=root / "sft", templates={"pref_test": "align_anything"}, **files)
    trained = {}

    class Evaluating(Exception):
        pass

    def fake_stage(name, args, train_fn, stage_args, log):
        trained[name] = stage_args
        return tmp_path / "run" / name / "final"

    def stop(*args, **kwargs):
        raise Evaluating

    monkeypatch.setattr(pipeline, "load_toy_world", lambda seed: world if seed == 7 else pytest.fail(f"world {seed}"))
    monkeypatch.setattr(pipeline, "run_stage", fake_stage)
    monkeypatch.setattr(pipeline, "evaluate_reward_model", lambda args: {})
    monkeypatch.setattr(pipeline, "load_tokenizer", stop)
    with pytest.raises(Evaluating):
        pipeline.run_seed(pipeline.PipelineArgs(out=str(tmp_path / "run"), seed=7, progress=False))
    assert sorted(trained) == ["dpo", "grpo_gold", "grpo_math", "online_dpo", "ppo", "ppo_small_beta", "rm"]
    for name, args in trained.items():
        assert (name, args.model, args.seed) == (name, str(world.sft_model), 7)
        assert args.data in {str(path) for path in files.values()}, name
    assert trained["grpo_math"].data == str(files["math_prompts"]) and trained["ppo"].data == str(files["prompts"])


def test_a_stage_trained_from_other_inputs_is_trained_again(tmp_path):
    """A finished stage is reused only when it started from the same model, data and reward: after a
    toy-world upgrade (or with another seed's world) it is trained again, never silently reused."""
    from minirlhf.pipeline import PipelineArgs, run_stage
    from minirlhf.train.grpo import GRPOArgs

    calls = []

    def fake_train(stage_args):
        calls.append(stage_args.model)
        final = Path(stage_args.out) / "final"
        final.mkdir(parents=True)
        (Path(stage_args.out) / "args.json").write_text(json.dumps({"model": stage_args.model, "data": stage_args.data,
                                                                    "reward": stage_args.reward}))
        return final

    args = PipelineArgs(out=str(tmp_path))
    for model in ("toy-1-v4/sft", "toy-1-v4/sft", "toy-1-v5/sft"):
        run_stage("grpo", args, fake_train, GRPOArgs(model=model, data="prompts.jsonl", reward="math"), lambda message: None)
    assert calls == ["toy-1-v4/sft", "toy-1-v5/sft"]
