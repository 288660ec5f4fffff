"""Reward-model losses: pairwise Bradley–Terry, InstructGPT's K-wise, and Plackett–Luce listwise.

A reward model r(x, y) gives one scalar per (prompt, response). The Bradley–Terry model says
P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)); each loss below is the negative log-likelihood of the
human ranking under that model (pairwise) or its listwise generalisation (Plackett–Luce).

All three return ``(loss, accuracy)``: ``loss`` is a scalar (already averaged, since the K-wise
and listwise losses weight each *prompt* once), ``accuracy`` is the detached fraction of pairs the
model orders correctly, where a tie counts as half right: a model that cannot tell two responses
apart (e.g. at initialisation with a zero score head) scores chance, 0.5, rather than 0.
"""
import math

import torch
import torch.nn.functional as F

from minirlhf.core.shapes import check_shapes


def _as_vector(x):
    """A score head's ``[B, 1]`` -> ``[B]`` (``[B]`` and scalars unchanged)."""
    return x.squeeze(-1) if torch.is_tensor(x) and x.dim() == 2 else x


def _pair_accuracy(difference):
    """1 where difference > 0, ½ where it is 0 (a tie), 0 otherwise; detached, same shape."""
    difference = difference.detach()
    return (difference > 0).to(difference.dtype) + 0.5 * (difference == 0).to(difference.dtype)


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None, center_coef=0.0):
    """Pairwise Bradley–Terry loss for a reward model (InstructGPT; Llama 2 adds the margin).

        L = mean_b[ −log σ(r_c − r_r − m) ] + c · mean_b[ (r_c + r_r)² ]

    The optional margin m (Llama 2) asks for a larger gap on pairs the annotators rated as clearly
    different. The centering term (coefficient c, "center_rewards_coefficient") pins the rewards'
    free additive constant near 0, which the BT likelihood alone leaves undetermined.

    Args:
        chosen_rewards, rejected_rewards: r(x, y_w), r(x, y_l), float, shape [B] (or [B, 1],
            squeezed).
        margin: None, a scalar, or a tensor [B] (or [B, 1]).
        center_coef: c ≥ 0, a scalar.

    Returns:
        (loss, accuracy): scalar loss; accuracy = mean_b 1[r_c > r_r] with ties counted ½
        (detached; the margin is a training target, not part of the metric).

    Hint: F.logsigmoid(x) is −softplus(−x), stable where log(torch.sigmoid(x)) underflows.
    """
    check_shapes(
        "bradley_terry_loss",
        chosen_rewards=(chosen_rewards, ("B", "B 1"), "float"),
        rejected_rewards=(rejected_rewards, ("B", "B 1"), "float"),
        margin=(margin, (None, "scalar", "B", "B 1")),
        center_coef=(center_coef, "scalar"),
    )
    chosen_rewards, rejected_rewards = _as_vector(chosen_rewards), _as_vector(rejected_rewards)
    margin = _as_vector(margin)
    # BEGIN SOLUTION
    difference = chosen_rewards - rejected_rewards
    logits = difference if margin is None else difference - margin
    loss = -F.logsigmoid(logits).mean()
    if center_coef:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards).pow(2).mean()
    return loss, _pair_accuracy(difference).mean()
    # END SOLUTION


def pair_accuracy(chosen_rewards, rejected_rewards):
    """The fraction of pairs ordered correctly, ``mean_b 1[r_c > r_r]`` with ties counted ½: the
    accuracy every loss here reports, for any pair of reward vectors (e.g. DPO's implicit rewards).

    Shapes: ``[B]`` (or ``[B, 1]``) each, float -> scalar, detached.
    """
    check_shapes(
        "pair_accuracy",
        chosen_rewards=(chosen_rewards, ("B", "B 1"), "float"),
        rejected_rewards=(rejected_rewards, ("B", "B 1"), "float"),
    )
    return _pair_accuracy(_as_vector(chosen_rewards) - _as_vector(rejected_rewards)).mean()


def _rank_mask(function, rewards, mask):
    """Check [P, K] rewards and mask; return the boolean mask (all True when mask is None)."""
    check_shapes(function, rewards=(rewards, "P K", "float"), mask=(mask, (None, "P K")))
    return torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool()


def _ranked_pairs(valid):
    """[P, K] bool -> [P, K, K] bool: True at (p, i, j) when i < j and both responses exist,
    i.e. the ranking says "response i beats response j"."""
    K = valid.shape[1]
    upper = torch.ones(K, K, dtype=torch.bool, device=valid.device).triu(diagonal=1)
    return upper & valid[:, :, None] & valid[:, None, :]


def kwise_bradley_terry_loss(rewards, mask=None):
    """InstructGPT's K-wise loss: all C(K,2) Bradley–Terry pairs of a prompt, weighted as one example.

        L = mean_p (1 / C(K_p, 2)) Σ_{i<j valid} −log σ(r_{p,i} − r_{p,j})

    Responses are ordered best first (column 0 is the best), so every pair i < j says "i beats j".
    Normalising by the prompt's pair count keeps the C(K,2) highly correlated comparisons of one
    prompt from counting as C(K,2) independent examples (Ouyang et al. 2022, §3.5).

    Args:
        rewards: [P, K], r(x_p, y_{p,k}) ranked best-first.
        mask: optional [P, K], 1 for responses that exist (prompts with fewer than K responses);
            invalid entries form no pair. The valid entries keep their column order as the ranking.

    Returns:
        (loss, accuracy): scalar loss averaged over the prompts that have at least one pair;
        accuracy is the fraction of all valid pairs in the batch ordered correctly (ties ½).
        A batch with no pair at all is an error.

    Hint: ``pairs[p, i, j]`` (given) marks the comparisons; build the [P, K, K] differences
    r_i − r_j by broadcasting and average −log σ over the marked entries of each prompt.
    """
    valid = _rank_mask("kwise_bradley_terry_loss", rewards, mask)
    pairs = _ranked_pairs(valid)
    if not pairs.any():
        raise ValueError("kwise_bradley_terry_loss: no prompt has two valid responses to compare")
    rewards = rewards.masked_fill(~valid, 0.0)  # whatever sits in padding must not reach a gradient
    # BEGIN SOLUTION
    differences = rewards[:, :, None] - rewards[:, None, :]  # [P, K, K]: r_i − r_j
    pair_losses = torch.where(pairs, -F.logsigmoid(differences), torch.zeros_like(differences))
    pairs_per_prompt = pairs.sum(dim=(1, 2))
    has_pairs = pairs_per_prompt > 0
    prompt_losses = pair_losses.sum(dim=(1, 2))[has_pairs] / pairs_per_prompt[has_pairs]
    accuracy = _pair_accuracy(differences)[pairs].mean()
    return prompt_losses.mean(), accuracy
    # END SOLUTION


def plackett_luce_loss(rewards, mask=None):
    """Listwise Plackett–Luce negative log-likelihood of a full ranking (used by e.g. PRO, LiPO).

    The ranking y_1 ≻ y_2 ≻ … ≻ y_K is generated by repeatedly picking the best of the remaining
    responses with probability softmax over what is left:

        L = mean_p −Σ_k [ r_k − log Σ_{j ≥ k} exp(r_j) ]

    For K = 2 this is exactly −log σ(r_1 − r_2), the Bradley–Terry loss.

    Args:
        rewards: [P, K], ranked best-first (column 0 is the best).
        mask: optional [P, K], 1 for responses that exist; invalid entries take no part in any
            softmax (their probability mass is 0) and contribute no term.

    Returns:
        (loss, accuracy): scalar loss averaged over prompts with at least two valid responses
        (a lone response has probability 1 and says nothing); accuracy as in
        ``kwise_bradley_terry_loss`` (pairwise, ties ½). A batch with no pair is an error.
    """
    valid = _rank_mask("plackett_luce_loss", rewards, mask)
    # Invalid entries become −inf so they vanish from every log Σ exp; masked_fill (not a product)
    # also stops the −inf from sending NaN gradients back to them.
    scores = rewards.masked_fill(~valid, -math.inf)
    # log Σ_{j ≥ k} exp(r_j) for every k: a cumulative logsumexp run from the right.
    suffix_logsumexp = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)
    terms = torch.where(valid, scores - suffix_logsumexp, torch.zeros_like(scores))
    pairs = _ranked_pairs(valid)
    has_pairs = pairs.any(dim=(1, 2))
    if not has_pairs.any():
        raise ValueError("plackett_luce_loss: no prompt has two valid responses to rank")
    loss = -terms.sum(dim=1)[has_pairs].mean()
    accuracy = _pair_accuracy(rewards[:, :, None] - rewards[:, None, :])[pairs].mean()
    return loss, accuracy
