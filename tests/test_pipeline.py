"""The main job end to end: `python -m minirlhf pipeline --quick` on the toy world."""
import json
import math

from minirlhf.__main__ import main

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

    # A second run finds every stage trained and only evaluates again.
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().err.count("already trained") == 7
