"""Direct preference losses: DPO and its variants (cDPO, robust, IPO, hinge, DPOP, R-DPO), SimPO,
ORPO and KTO.

Each function takes per-sequence log-probabilities that the caller has already reduced from token
log-probs ([B, T] with a response mask, see ``sequence_logprobs``) and returns per-example losses
``[B]``; the trainer takes ``.mean()``. Two reductions appear (``sequence_logprobs(..., average=)``):

* **summed** log-probs, log π(y|x) = Σ_t log π(y_t | x, y_<t): DPO (sigmoid, cdpo, robust, hinge),
  DPOP, R-DPO and KTO, as in their papers;
* **length-averaged** log-probs, (1/|y|) Σ_t log π(y_t | x, y_<t): IPO (by convention, see
  ``dpo_loss``), SimPO and ORPO, whose formulas are defined on them.

Implicit rewards returned next to the losses are detached: they are for logging (reward accuracy,
margins), never for backpropagation.
"""
import math

import torch
import torch.nn.functional as F

from minirlhf.core.shapes import ShapeError, check_shapes

DPO_LOSS_TYPES = ("sigmoid", "cdpo", "robust", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    logit_offset=None,
):
    """Direct Preference Optimization (Rafailov et al. 2023) and its pairwise variants.

    With h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)] and the logit
    z = β·h − o (o = ``logit_offset``, 0 by default), per pair:

        sigmoid  −log σ(z)                                    DPO
        cdpo     −(1−ε) log σ(z) − ε log σ(−z)                conservative DPO: labels flipped w.p. ε
        robust   [−(1−ε) log σ(z) + ε log σ(−z)] / (1 − 2ε)   Chowdhury et al. 2024: unbiased under
                                                              flip rate ε (needs ε < ½)
        ipo      (h − 1/(2β))²                                IPO (Azar et al. 2023), β = their τ
        hinge    max(0, 1 − z)                                SLiC-HF (Zhao et al. 2023), δ = 1/β

    The minimiser of the expected sigmoid loss when a fraction p of the labels say "w ≻ l" has
    σ(βh*) = p (the BT maximum-likelihood fit). cdpo is DPO's loss averaged over labels flipped
    with probability ε, so even on clean labels its optimum is finite: σ(βh*) = 1 − ε. A [B] ε
    gives each pair its own: with ε_i = σ(−Δr_i) for a judge's reward margin Δr_i ≥ 0 (a soft
    Bradley–Terry label), the optimum is βh* = Δr_i, the KL-regularised optimum
    π ∝ π_ref·exp(r/β) that PPO with the same β aims at.

    **Logit offset (DPOP, R-DPO).** o is subtracted from the logit z, inside the sigmoid, for
    sigmoid/cdpo/robust/hinge. It is how the extra terms of two variants plug in:

        R-DPO (Park et al. 2024):  logit_offset = rdpo_length_margin(len_w, len_l, alpha)
                                   z = βh − α(|y_w| − |y_l|)
        DPOP  (Pal et al. 2024):   logit_offset = beta * dpop_penalty(policy_chosen, ref_chosen, lam)
                                   z = β(h − λ·max(0, log π_ref(y_w) − log π(y_w)))

    IPO regresses h onto a target instead of passing it through a sigmoid, so it takes no offset.

    **Inputs.** Summed response log-probs for sigmoid/cdpo/robust/hinge. IPO is meant for
    length-averaged log-probs: its target 1/(2β) is a fixed gap, and with sums h grows with
    length, so the same β would ask long pairs for a much smaller per-token gap than short ones
    (the trainer passes averages when loss_type == "ipo").

    Args:
        policy_chosen_logps, policy_rejected_logps: log π_θ(y_w|x), log π_θ(y_l|x), [B] float
            (all four of one shape: [B], or [] for a single pair).
        ref_chosen_logps, ref_rejected_logps: the same under the frozen reference, [B].
        beta: β ≥ 0, the strength of the implicit KL(π‖π_ref) regulariser (IPO: τ > 0).
        loss_type: one of "sigmoid", "cdpo", "robust", "ipo", "hinge".
        label_smoothing: ε, the assumed label-flip rate, a scalar or one per pair [B]; only for
            cdpo (0 ≤ ε ≤ ½) and robust (0 ≤ ε < ½).
        logit_offset: None, a scalar (float or 0-dim tensor) or a [B] tensor o subtracted from βh
            (see above); a [B, 1] raises (it would broadcast the losses to [B, B]).
            beta is a scalar.

    Returns:
        (losses [B], chosen_rewards [B], rejected_rewards [B]); the implicit rewards are
        β·(log π − log π_ref), detached.

    Hint: all five branches are graded. Use −F.logsigmoid(z), stable for large |z|; IPO is a
    plain square of h − 1/(2β).
    """
    check_shapes(
        "dpo_loss",
        policy_chosen_logps=(policy_chosen_logps, "...", "float"),
        policy_rejected_logps=(policy_rejected_logps, "...", "float"),
        ref_chosen_logps=(ref_chosen_logps, "...", "float"),
        ref_rejected_logps=(ref_rejected_logps, "...", "float"),
        beta=(beta, "scalar"),
        label_smoothing=(label_smoothing, ("scalar", "...")),
        logit_offset=(logit_offset, (None, "scalar", "...")),
    )
    if policy_chosen_logps.dim() > 1:  # e.g. token log-probs [B, T] that were never summed
        shape = list(policy_chosen_logps.shape)
        raise ShapeError(f"dpo_loss: policy_chosen_logps must have shape [B] (or [] for one pair), got {shape}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    flip_rates = torch.as_tensor(label_smoothing, dtype=torch.float64)
    smallest, largest = (float(flip_rates.min()), float(flip_rates.max())) if flip_rates.numel() else (0.0, 0.0)
    if largest and loss_type not in ("cdpo", "robust"):
        raise ValueError(f"dpo_loss: label_smoothing applies to 'cdpo' and 'robust', not {loss_type!r}")
    if not 0.0 <= smallest <= largest <= 0.5 or (loss_type == "robust" and largest == 0.5):
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5] (robust: [0, 0.5)), got {label_smoothing}")
    if loss_type == "ipo" and (beta <= 0 or logit_offset is not None):
        raise ValueError("dpo_loss: 'ipo' needs beta > 0 (its target is 1/(2β)) and takes no logit_offset")
    # BEGIN SOLUTION
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    z = beta * h if logit_offset is None else beta * h - logit_offset
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(z)
    elif loss_type == "cdpo":
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # "hinge" (loss_type was validated above)
        losses = F.relu(1 - z)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards
    # END SOLUTION


def dpop_penalty(policy_chosen_logps, ref_chosen_logps, lam=50.0):
    """DPO-Positive's penalty (Pal et al. 2024, "Smaug"): λ·max(0, log π_ref(y_w) − log π(y_w)).

    Plain DPO can lower log π(y_w) as long as log π(y_l) falls faster; DPOP charges every nat the
    chosen response loses below the reference. It enters DPO inside β:
    ``dpo_loss(..., logit_offset=beta * dpop_penalty(...))``, i.e. z = β(h − penalty).
    Summed log-probs, [B] float -> [B]; ``lam`` a scalar; not detached (the penalty is part of
    the loss).
    """
    check_shapes(
        "dpop_penalty",
        policy_chosen_logps=(policy_chosen_logps, "B", "float"),
        ref_chosen_logps=(ref_chosen_logps, "B", "float"),
        lam=(lam, "scalar"),
    )
    return lam * F.relu(ref_chosen_logps - policy_chosen_logps)


def rdpo_length_margin(chosen_lengths, rejected_lengths, alpha):
    """R-DPO's length term (Park et al. 2024): α·(|y_w| − |y_l|), with |y| in response tokens.

    Subtracted from the DPO logit (``dpo_loss(..., logit_offset=rdpo_length_margin(...))``), so
    z = βh − α(|y_w| − |y_l|): a longer chosen response must earn a larger h, which removes the
    incentive to win preferences by being verbose. Lengths [B] (int or float), ``alpha`` a
    scalar -> [B] float.
    """
    check_shapes(
        "rdpo_length_margin",
        chosen_lengths=(chosen_lengths, "B"),
        rejected_lengths=(rejected_lengths, "B"),
        alpha=(alpha, "scalar"),
    )
    length_difference = chosen_lengths - rejected_lengths
    if not length_difference.is_floating_point():  # token counts arrive as integers
        length_difference = length_difference.to(torch.get_default_dtype())
    return alpha * length_difference


def simpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, beta=2.0, gamma=0.5):
    """SimPO (Meng et al. 2024): reference-free, length-normalised DPO with a target margin.

        L = −log σ( β·avg log π(y_w) − β·avg log π(y_l) − γ ),   avg log π(y) = (1/|y|) log π(y|x)

    The implicit reward is r(y) = β·avg log π(y): no reference model, and averaging keeps length
    from buying reward. γ is the target reward margin in reward (logit) units, as in the paper's
    equation and TRL's ``simpo_gamma``. The SimPO authors' code configures the ratio
    ``gamma_beta_ratio`` = γ/β instead: their ρ is our ``gamma = beta * ρ`` (ρ = 0.5, β = 2 -> γ = 1).

    Args:
        policy_chosen_avg_logps, policy_rejected_avg_logps: length-averaged log π_θ, [B].
        beta: β > 0 (typically 2.0–2.5, larger than DPO's since averages are small). gamma: γ ≥ 0.

    Returns:
        (losses [B], chosen_rewards [B], rejected_rewards [B]); rewards β·avg log π, detached.

    Hint: it is dpo_loss's sigmoid with the reference log-probs replaced by 0 and a margin.
    """
    check_shapes(
        "simpo_loss",
        policy_chosen_avg_logps=(policy_chosen_avg_logps, "B", "float"),
        policy_rejected_avg_logps=(policy_rejected_avg_logps, "B", "float"),
        beta=(beta, "scalar"),
        gamma=(gamma, "scalar"),
    )
    # BEGIN SOLUTION
    chosen_rewards = beta * policy_chosen_avg_logps
    rejected_rewards = beta * policy_rejected_avg_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()
    # END SOLUTION


def log1mexp(x):
    """log(1 − eˣ) for x ≤ 0, accurate everywhere (Mächler 2012).

    Near 0, 1 − eˣ cancels catastrophically, so use log(−expm1(x)); far below 0, eˣ is tiny and
    log1p(−eˣ) keeps its digits. The switch is at x = −ln 2. Each branch is fed a safe input so
    the branch torch.where discards cannot send inf/NaN into the gradient. ``x`` any float
    tensor -> its shape.
    """
    check_shapes("log1mexp", x=(x, "...", "float"))
    near_zero = x > -math.log(2)
    switch = torch.full_like(x, -math.log(2))
    near = torch.log(-torch.expm1(torch.where(near_zero, x, switch)))
    far = torch.log1p(-torch.exp(torch.where(near_zero, switch, x)))
    return torch.where(near_zero, near, far)


def orpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, lam=0.1):
    """ORPO's odds-ratio term (Hong et al. 2024), reference-free.

        odds(y) = P(y) / (1 − P(y)) with P(y) = exp(avg log π(y)), so
        log odds(y) = avg log π(y) − log(1 − exp(avg log π(y)))
        L_OR = −λ · log σ( log odds(y_w) − log odds(y_l) )

    The full ORPO objective is NLL(y_w) + L_OR: the trainer adds the SFT term (mean token
    negative log-likelihood of the chosen response) itself, since it already has the token losses.

    Inputs are length-averaged log-probs (≤ 0). An average of exactly 0 means P(y) = 1 and infinite
    odds; it is clamped to −tiny (the dtype's smallest normal number) so a saturated model gives
    a large finite log-odds instead of inf − inf = NaN.

    Args:
        policy_chosen_avg_logps, policy_rejected_avg_logps: length-averaged log π_θ, [B].
        lam: λ ≥ 0, the weight of the odds-ratio term.

    Returns:
        (losses [B], log_odds_ratio [B]): λ-weighted odds-ratio losses, and
        log odds(y_w) − log odds(y_l) (detached, for logging).
    """
    check_shapes(
        "orpo_loss",
        policy_chosen_avg_logps=(policy_chosen_avg_logps, "B", "float"),
        policy_rejected_avg_logps=(policy_rejected_avg_logps, "B", "float"),
        lam=(lam, "scalar"),
    )

    def log_odds(avg_logps):
        avg_logps = avg_logps.clamp(max=-torch.finfo(avg_logps.dtype).tiny)
        return avg_logps - log1mexp(avg_logps)

    log_odds_ratio = log_odds(policy_chosen_avg_logps) - log_odds(policy_rejected_avg_logps)
    losses = -lam * F.logsigmoid(log_odds_ratio)
    return losses, log_odds_ratio.detach()


def kto_loss(
    policy_logps,
    ref_logps,
    desirable,
    kl_reference,
    beta=0.1,
    desirable_weight=1.0,
    undesirable_weight=1.0,
):
    """KTO (Ethayarajh et al. 2024): unpaired thumbs-up / thumbs-down feedback.

    With the implied reward r = log π(y|x) − log π_ref(y|x) and reference point z0:

        desirable y:    L = λ_D · (1 − σ(β(r − z0)))
        undesirable y:  L = λ_U · (1 − σ(β(z0 − r)))

    z0 = max(0, KL_est) is a batch estimate of KL(π‖π_ref) that acts as a baseline: a desirable
    response only earns by beating it. The trainer estimates it from *mismatched* pairs (prompt i
    with the completion of example i+1, so the pair carries no feedback signal):
    KL_est = mean_i [log π(y_{i+1}|x_i) − log π_ref(y_{i+1}|x_i)], computed under no_grad.
    Here it is detached and clamped at 0 again, so no gradient ever flows through z0.

    λ_D, λ_U rebalance the two kinds; the paper suggests λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3].

    Args:
        policy_logps, ref_logps: summed log π_θ(y|x), log π_ref(y|x), [B].
        desirable: [B] bool (or 0/1), True for thumbs-up.
        kl_reference: the KL estimate above, one number for the batch: a float or a 0-dim
            tensor (a [B] or [1] tensor raises; average per-example estimates first).
        beta: β ≥ 0. desirable_weight, undesirable_weight: λ_D, λ_U (scalars).

    Returns:
        (losses [B], rewards [B]); rewards β·r, detached. A batch may be all desirable or all
        undesirable.
    """
    check_shapes(
        "kto_loss",
        policy_logps=(policy_logps, "B", "float"),
        ref_logps=(ref_logps, "B", "float"),
        desirable=(torch.as_tensor(desirable), "B"),
        kl_reference=(kl_reference, "scalar"),
        beta=(beta, "scalar"),
        desirable_weight=(desirable_weight, "scalar"),
        undesirable_weight=(undesirable_weight, "scalar"),
    )
    desirable = torch.as_tensor(desirable, device=policy_logps.device).bool()
    z0 = torch.as_tensor(kl_reference, dtype=policy_logps.dtype, device=policy_logps.device)
    z0 = z0.detach().clamp(min=0)
    logratios = policy_logps - ref_logps
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, beta * logratios.detach()
