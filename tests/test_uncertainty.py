"""Standard errors of the pipeline's numbers (``minirlhf.eval.uncertainty``) and the lessons report."""
import math
import random
import statistics

import pytest

from minirlhf.eval.uncertainty import mean_sd, mean_se, paired_gain, per_prompt_means, prompt_mean_se
from minirlhf.pipeline_report import Lesson, check_lessons, report_seeds, seeds_summary


def test_mean_se_is_the_sample_sd_over_root_n():
    samples = [1.0, 2.0, 3.0, 4.0, 10.0]
    mean, se = mean_se(samples)
    assert mean == pytest.approx(4.0)
    assert se == pytest.approx(statistics.stdev(samples) / math.sqrt(5))
    assert math.isnan(mean_se([3.0])[1])
    with pytest.raises(ValueError, match="no samples"):
        mean_se([])


def test_mean_se_covers_the_true_mean_at_the_nominal_rate():
    rng = random.Random(0)
    covered = 0
    for _ in range(2000):
        mean, se = mean_se([rng.gauss(1.0, 2.0) for _ in range(50)])
        covered += abs(mean - 1.0) <= 1.96 * se
    assert 0.93 < covered / 2000 < 0.97


def test_prompt_mean_se_averages_each_prompts_responses_first():
    # prompt 0: responses 1, 3 (mean 2); prompt 1: 10, 12 (11); prompt 2: 4, None (4: None skipped)
    values, prompts = [1, 10, 3, 12, 4, None], [0, 1, 0, 1, 2, 2]
    assert per_prompt_means(values, prompts) == {0: 2.0, 1: 11.0, 2: 4.0}
    mean, se = prompt_mean_se(values, prompts)
    assert (mean, se) == pytest.approx((17 / 3, statistics.stdev([2.0, 11.0, 4.0]) / math.sqrt(3)))
    # A prompt without any value is left out; equal counts per prompt give the plain mean.
    assert per_prompt_means([None, 5.0], [0, 1]) == {1: 5.0}
    assert prompt_mean_se([1, 2, 3, 6], [0, 0, 1, 1])[0] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="3 values but 2 prompt ids"):
        prompt_mean_se([1, 2, 3], [0, 1])


def test_responses_of_one_prompt_do_not_count_as_independent():
    # Two prompts far apart, many identical responses each: only 2 independent numbers.
    values, prompts = [0.0] * 50 + [10.0] * 50, [0] * 50 + [1] * 50
    assert prompt_mean_se(values, prompts)[1] == pytest.approx(5.0)
    assert mean_se(values)[1] < 1.0  # what treating responses as independent would claim


def test_paired_gain_cancels_the_prompt_to_prompt_spread():
    rng = random.Random(1)
    prompt_effect = [rng.gauss(0, 5) for _ in range(40)]
    prompts = [p for p in range(40) for _ in range(2)]
    base = [prompt_effect[p] + rng.gauss(0, 0.1) for p in prompts]
    policy = [value + 0.3 for value in base]  # the same responses, each 0.3 better
    gain, se = paired_gain(policy, prompts, base, prompts)
    assert gain == pytest.approx(0.3) and se == pytest.approx(0.0, abs=1e-12)
    # Brute force: the mean and SE of the per-prompt differences, order of the rows irrelevant.
    policy = [prompt_effect[p] + 0.3 + rng.gauss(0, 0.5) for p in prompts]
    order = list(range(len(prompts)))
    rng.shuffle(order)
    diffs = [(policy[2 * p] + policy[2 * p + 1] - base[2 * p] - base[2 * p + 1]) / 2 for p in range(40)]
    expected = (statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(40))
    assert paired_gain([policy[i] for i in order], [prompts[i] for i in order], base, prompts) == pytest.approx(expected)
    unpaired_se = math.hypot(prompt_mean_se(policy, prompts)[1], prompt_mean_se(base, prompts)[1])
    assert expected[1] < unpaired_se / 5  # what pairing buys


def test_paired_gain_uses_the_shared_prompts_only():
    gain, _ = paired_gain([1.0, None, 5.0], [0, 1, 2], [0.0, 2.0, 3.0], [0, 1, 2])
    assert gain == pytest.approx(1.5)  # prompts 0 and 2
    with pytest.raises(ValueError, match="share no prompt"):
        paired_gain([1.0], [0], [1.0], [1])


def test_mean_sd_over_seeds():
    assert mean_sd([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    mean, sd = mean_sd([0.4])
    assert mean == 0.4 and math.isnan(sd)


def test_lessons_hold_per_threshold_direction():
    up, down = Lesson("up", "DPO", "gold", 0.15), Lesson("down", "PPO (small β)", "gold", -0.3, at_least=False)
    assert up.holds(0.15) and not up.holds(0.149)
    assert down.holds(-0.5) and not down.holds(-0.2)
    checks = check_lessons([up, down, Lesson("absent", "online DPO", "gold", 0.1)],
                           {"DPO": {"gold": (0.2, 0.05)}, "PPO (small β)": {"gold": (-0.1, 0.05)}})
    assert [(c["claim"], c["held"], c["se"]) for c in checks] == [("up", True, 0.05), ("down", False, 0.05)]


def seed_results(dpo_gain, sft_gold=0.1):
    gains = {"SFT": {"gold": (0.0, 0.0)}, "DPO": {"gold": (dpo_gain, 0.05)}}
    return {"policies": {"SFT": {"gold": sft_gold}, "DPO": {"gold": sft_gold + dpo_gain}}, "gains": gains,
            "lessons": check_lessons([Lesson("DPO raises the gold reward", "DPO", "gold", 0.15)], gains),
            "rm": {"model": {"accuracy": 0.7, "bayes_gap": (0.04, 0.005)}}, "bayes_accuracy": 0.75,
            "rm_on_policy": {"all": {"agreement": (0.55 + dpo_gain / 10, 0.01), "best_of_n_gain": (dpo_gain, 0.05),
                                     "gold_best_of_n_gain": (1.8, 0.05), "pairs": 900}}}


def test_seeds_summary_reports_every_lesson_per_seed_and_in_the_mean():
    summary = seeds_summary({0: seed_results(0.3), 1: seed_results(0.1), 2: seed_results(0.2, sft_gold=0.3)})
    lesson, = summary["lessons"]
    assert lesson["values"] == pytest.approx([0.3, 0.1, 0.2])
    assert lesson["held_per_seed"] == [True, False, True] and lesson["held_in_mean"]
    assert (lesson["mean"], lesson["sd"]) == pytest.approx((0.2, 0.1))
    assert summary["policies"]["SFT"]["gold"] == pytest.approx(mean_sd([0.1, 0.1, 0.3]))
    assert summary["gains"]["DPO"]["gold"] == pytest.approx((0.2, 0.1))
    report = "\n".join(report_seeds(summary))
    assert "0 of 1 held in every seed and in the mean" in report
    assert "+0.10 ❌" in report and "+0.20 ± 0.10 ✅" in report
    assert "test accuracy 70.0% ± 0.0% (expected over the labels: 71.0% ± 0.0%)" in report
    assert summary["rm_on_policy"]["agreement"] == pytest.approx((0.57, 0.01))
    assert "the RM orders 57% ± 1 of the pairs as the gold reward does, and its best sample gains +0.20 ± 0.10" in report


def test_numbers_print_with_their_error_in_their_own_unit():
    from minirlhf.pipeline_report import threshold_text, with_error

    assert with_error("gold", -2.004, 0.113, signed=True) == "-2.00 ± 0.11"
    assert with_error("math_accuracy", 0.24, 0.05, signed=True) == "+24 pts ± 5"
    assert with_error("math_accuracy", 0.48, 0.04) == "48% ± 4"
    assert with_error("bayes_gap", 0.029, 0.014) == "2.9 pts ± 1.4"
    assert with_error("kl", 37.7, 0.71) == "37.7 ± 0.7"
    assert with_error("gold", 0.4, float("nan")) == "0.40"  # one seed: no spread to show
    assert threshold_text({"metric": "bayes_gap", "threshold": 0.04, "at_least": False}) == "≤ 4.0 pts"
