"""proxy_ranking: how a proxy reward orders a policy's own samples, against the gold reward."""
import itertools
import math
import random

import pytest

from minirlhf.eval.proxy_ranking import proxy_ranking


def brute_force(gold, proxy, prompt_ids):
    """Agreement and best-of-n gains prompt by prompt, with every ordered pair enumerated."""
    agreements, gains, gold_gains = [], [], []
    for prompt in dict.fromkeys(prompt_ids):
        rows = [(g, r) for g, r, p in zip(gold, proxy, prompt_ids) if p == prompt]
        mean = sum(g for g, _ in rows) / len(rows)
        votes = []
        for (gi, ri), (gj, rj) in itertools.permutations(rows, 2):
            if gi > gj:
                votes.append(1.0 if ri > rj else 0.5 if ri == rj else 0.0)
        if votes:
            agreements.append(sum(votes) / len(votes))
        best_proxy = max(r for _, r in rows)
        gains.append(next(g for g, r in rows if r == best_proxy) - mean)
        gold_gains.append(max(g for g, _ in rows) - mean)
    average = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return average(agreements), average(gains), average(gold_gains)


def random_evaluation(rng, prompts=7, samples=5):
    ids = [p for p in range(prompts) for _ in range(samples)]
    gold = [rng.choice((-1.0, 0.0, 0.5, 2.0, 3.0)) for _ in ids]  # gold ties within a prompt happen
    proxy = [rng.choice((0.0, 0.1, 0.2)) for _ in ids]  # and so do proxy ties
    order = list(range(len(ids)))
    rng.shuffle(order)  # responses to a prompt need not be adjacent
    return [gold[i] for i in order], [proxy[i] for i in order], [ids[i] for i in order]


@pytest.mark.parametrize("seed", range(5))
def test_agreement_and_best_of_n_match_a_brute_force_count(seed):
    gold, proxy, ids = random_evaluation(random.Random(seed))
    result = proxy_ranking(gold, proxy, ids)
    agreement, gain, gold_gain = brute_force(gold, proxy, ids)
    assert result["agreement"][0] == pytest.approx(agreement)
    assert result["best_of_n_gain"][0] == pytest.approx(gain)
    assert result["gold_best_of_n_gain"][0] == pytest.approx(gold_gain)


def test_the_gold_reward_agrees_with_itself_and_its_reverse_never():
    gold, _, ids = random_evaluation(random.Random(0))
    itself = proxy_ranking(gold, gold, ids)
    assert itself["agreement"][0] == 1.0
    assert itself["best_of_n_gain"][0] == pytest.approx(itself["gold_best_of_n_gain"][0])
    assert itself["best_of_n_gain"][0] > 0
    reverse = proxy_ranking(gold, [-g for g in gold], ids)
    assert reverse["agreement"][0] == 0.0
    assert reverse["best_of_n_gain"][0] < 0


def test_a_constant_proxy_agrees_half_the_time():
    gold, _, ids = random_evaluation(random.Random(1))
    assert proxy_ranking(gold, [0.0] * len(gold), ids)["agreement"] == (0.5, 0.0)


def test_pairs_count_only_samples_with_different_gold_rewards():
    result = proxy_ranking([1.0, 1.0, 2.0], [0.0, 5.0, 1.0], [0, 0, 0])
    assert result["pairs"] == 2  # (1, 2) twice; the gold tie (1, 1) is no pair
    assert result["agreement"][0] == pytest.approx(0.5)
    assert result["best_of_n_gain"][0] == pytest.approx(1.0 - 4 / 3)


def test_mismatched_lengths_are_refused_and_gold_ties_leave_agreement_undefined():
    with pytest.raises(ValueError, match="3 gold rewards, 2 proxy scores and 3 prompt ids"):
        proxy_ranking([1.0, 2.0, 3.0], [1.0, 2.0], [0, 0, 1])
    with pytest.raises(ValueError, match="no responses"):
        proxy_ranking([], [], [])
    with pytest.raises(ValueError, match=r"proxy\[1\] is nan; expected a finite reward"):
        proxy_ranking([1.0, 2.0], [0.0, float("nan")], [0, 0])
    tied = proxy_ranking([1.0, 1.0, 2.0], [0.0, 1.0, 0.0], [0, 0, 1])  # no pair with different gold rewards
    assert math.isnan(tied["agreement"][0]) and tied["pairs"] == 0
    assert tied["best_of_n_gain"] == (0.0, 0.0)
