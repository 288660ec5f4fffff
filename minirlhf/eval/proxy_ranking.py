"""How well a proxy reward ranks a policy's *own* samples: the question an online method asks it.

A reward model is tested on held-out preference pairs, written by the same writers as its training
pairs. PPO, GRPO and online DPO ask it something else: which of the policy's own samples to a prompt
is better. A model that ranks the test pairs well through a feature that predicts the label only
there (the toy world's planted filler words) can rank the policy's samples no better than chance,
and then nothing optimised against it gains much true reward. With ``n`` samples per prompt scored
by both the gold reward r* and the proxy r̂::

    agreement      = over same-prompt sample pairs with r*(y_i) ≠ r*(y_j): the fraction the proxy
                     orders the gold reward's way (a proxy tie counts ½)
    best_of_n_gain = r*(y_k) − mean_i r*(y_i),  k = argmax_i r̂(y_i)       (best-of-n by the proxy)
    gold_best_of_n = max_i r*(y_i) − mean_i r*(y_i)                       (best-of-n by the truth)

each averaged over prompts, with its standard error over prompts (a prompt whose samples all have
the same gold reward has no pair to agree on and is left out of ``agreement``, which is NaN when
no prompt has such a pair). The gold reward
has agreement 1 and the largest gain; a proxy that knows nothing has agreement ½ and gain 0, in
expectation.

Shapes: ``gold``, ``proxy`` and ``prompt_ids`` are equal-length lists, one entry per response;
responses to the same prompt share a prompt id (in any order). Rewards must be finite.
"""
from __future__ import annotations

import math

from minirlhf.eval.uncertainty import mean_se


def proxy_ranking(gold: list, proxy: list, prompt_ids: list) -> dict:
    """``{"agreement", "best_of_n_gain", "gold_best_of_n_gain"}``, each ``(mean, SE over prompts)``,
    and ``"pairs"``: the number of compared pairs (module docstring)."""
    if not len(gold) == len(proxy) == len(prompt_ids):
        raise ValueError(f"proxy_ranking: {len(gold)} gold rewards, {len(proxy)} proxy scores and "
                         f"{len(prompt_ids)} prompt ids; expected one of each per response")
    if not gold:
        raise ValueError("proxy_ranking: no responses")
    for name, values in (("gold", gold), ("proxy", proxy)):
        bad = next((i for i, value in enumerate(values) if not math.isfinite(value)), None)
        if bad is not None:
            raise ValueError(f"proxy_ranking: {name}[{bad}] is {values[bad]!r}; expected a finite reward")
    groups = {}
    for g, r, prompt in zip(gold, proxy, prompt_ids):
        groups.setdefault(prompt, []).append((float(g), float(r)))
    agreements, gains, gold_gains, pairs = [], [], [], 0
    for samples in groups.values():
        mean_gold = sum(g for g, _ in samples) / len(samples)
        gains.append(max(samples, key=lambda s: s[1])[0] - mean_gold)
        gold_gains.append(max(g for g, _ in samples) - mean_gold)
        votes = [1.0 if (gi - gj) * (ri - rj) > 0 else 0.5 if ri == rj else 0.0
                 for i, (gi, ri) in enumerate(samples) for gj, rj in samples[i + 1:] if gi != gj]
        if votes:
            agreements.append(sum(votes) / len(votes))
            pairs += len(votes)
    return {"agreement": mean_se(agreements) if agreements else (math.nan, math.nan), "best_of_n_gain": mean_se(gains),
            "gold_best_of_n_gain": mean_se(gold_gains), "pairs": pairs}
