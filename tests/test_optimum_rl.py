"""Exact optima of the online RL losses on the bandit world (``minirlhf.toy.bandit``).

The bandit has a few prompts x and single-token responses y, so a policy is a table of logits
θ[x, y] and π = softmax(θ). The KL-regularised objective

    J(π) = E_x [ E_{y~π} r(x, y) − β KL(π(·|x) ‖ π_ref(·|x)) ]

has the closed-form maximiser π*(y|x) = π_ref(y|x) e^{r(x,y)/β} / Z(x). Each test trains the
table with the library's own loss functions on *sampled* responses (a batch of one-token rollouts,
``T = 1``) and checks where it ends up:

- PPO (``kl_shaped_rewards`` with k1 → ``gae_advantages`` → ``ppo_policy_loss`` + a tabular
  critic trained with ``ppo_value_loss``) converges to π*.
- GRPO with the KL in the reward (group advantages of ``r − β·k1``, ``grpo_loss`` with β = 0)
  converges to π*; so does RLOO (``rloo_advantages`` of the same penalised reward).
- GRPO with the k3 penalty *in the loss* (``grpo_loss`` with β > 0, the GRPO paper's form) does
  **not**: its gradient is that of the reverse KL(π_ref‖π), so it converges to the maximiser of
  E_π r − β KL(π_ref‖π), computed here independently. The test pins both facts.

Why the Gibbs-policy tests can be tight: at π*, the KL-shaped reward r − β log(π*/π_ref) equals
β log Z(x) for *every* y, so once the baseline has caught up every sampled advantage is exactly
0 — the sampling noise vanishes at the optimum. The reverse-KL fixed point has no such property
(its advantages are nonzero, only their expected gradient cancels), so that test decays the step
size and uses a looser tolerance.

With the KL in the reward, GRPO's std scaling does not move the fixed point (it rescales each
prompt's step, and every advantage is 0 at π* anyway); with β·k3 in the loss it would (it rescales
the reward term against the KL term per group), so that test uses ``scale=None`` (Dr. GRPO).
"""
import pytest
import torch

from minirlhf.core.gae import gae_advantages
from minirlhf.core.grpo import group_advantages, grpo_loss, rloo_advantages
from minirlhf.core.kl import kl_shaped_rewards
from minirlhf.core.ppo_losses import ppo_policy_loss, ppo_value_loss
from minirlhf.toy.bandit import make_bandit

BETA = 0.5
GIBBS_TOLERANCE = 2e-3  # max |π(y|x) − π*(y|x)| over the table
REVERSE_KL_TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def world():
    return make_bandit(num_prompts=3, num_actions=5, seed=0)


def reverse_kl_optimum(world, beta):
    """argmax_π E_π r − β KL(π_ref‖π) per prompt, by its stationarity condition.

    On the simplex, ∂/∂π_y [Σ π r + β Σ π_ref log π] = r_y + β π_ref(y)/π(y) = λ for all y, so
    π(y) = β π_ref(y) / (λ − r_y) with λ > max_y r_y chosen so that Σ_y π(y) = 1 (the sum falls
    monotonically in λ: bisection).
    """
    ref, r = world.ref_policy, world.rewards
    low = r.max(dim=-1, keepdim=True).values
    high = low + beta + 1.0  # Σ β π_ref / (λ − r) ≤ β / (λ − max r) < 1 here
    for _ in range(200):
        mid = (low + high) / 2
        too_big = (beta * ref / (mid - r)).sum(-1, keepdim=True) > 1
        low, high = torch.where(too_big, mid, low), torch.where(too_big, high, mid)
    policy = beta * ref / (high - r)
    return policy / policy.sum(-1, keepdim=True)


def rollout(world, theta, samples_per_prompt, generator):
    """One-token rollouts: every prompt ``samples_per_prompt`` times (grouped), y ~ π_θ.

    Returns prompts, actions ``[N]`` and the ``[N, 1]`` tensors the losses take: old and
    reference log-probs, the mask (all ones: every response is its one token), and r(x, y) ``[N]``.
    """
    prompts = torch.arange(world.num_prompts).repeat_interleave(samples_per_prompt)
    with torch.no_grad():
        actions = world.sample_actions(torch.softmax(theta, -1), prompts, generator)
        old_logprobs = torch.log_softmax(theta, -1)[prompts, actions][:, None]
    ref_logprobs = world.ref_policy.log()[prompts, actions][:, None]
    return prompts, actions, old_logprobs, ref_logprobs, torch.ones_like(old_logprobs), world.rewards[prompts, actions]


def optimizer_with_decay(params, lr, steps):
    optimizer = torch.optim.Adam(params, lr=lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)


def train_ppo(world, steps=150, samples_per_prompt=256, epochs=4, lr=0.1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    theta = world.ref_policy.log().clone().requires_grad_(True)  # start at π_ref, like RLHF
    values = torch.zeros(world.num_prompts, dtype=theta.dtype, requires_grad=True)  # tabular critic V(x)
    optimizer, scheduler = optimizer_with_decay([theta, values], lr, steps)
    for _ in range(steps):
        prompts, actions, old_logprobs, ref_logprobs, mask, score = rollout(world, theta, samples_per_prompt, generator)
        rewards, _ = kl_shaped_rewards(score, old_logprobs, ref_logprobs, mask, BETA, "k1")
        old_values = values.detach()[prompts][:, None]
        advantages, returns = gae_advantages(rewards, old_values, mask, gamma=1.0, lam=1.0)
        for _ in range(epochs):
            logprobs = torch.log_softmax(theta, -1)[prompts, actions][:, None]
            policy_loss, _, _ = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
            value_loss, _ = ppo_value_loss(values[prompts][:, None], old_values, returns, mask, clip_range=0.2)
            optimizer.zero_grad()
            (policy_loss + value_loss).backward()
            optimizer.step()
        scheduler.step()
    return torch.softmax(theta.detach(), -1)


def train_group(world, advantage_fn, kl_in_loss, steps=150, samples_per_prompt=256, lr=0.1, seed=0):
    """GRPO-style training: one on-policy ``grpo_loss`` step per rollout.

    ``kl_in_loss``: β·k3 in the loss (GRPO paper) on the plain reward; otherwise the reward is
    penalised, ``r − β·(log π_old − log π_ref)``, and the loss has β = 0.
    """
    generator = torch.Generator().manual_seed(seed)
    theta = world.ref_policy.log().clone().requires_grad_(True)
    optimizer, scheduler = optimizer_with_decay([theta], lr, steps)
    for _ in range(steps):
        prompts, actions, old_logprobs, ref_logprobs, mask, score = rollout(world, theta, samples_per_prompt, generator)
        if not kl_in_loss:
            score = score - BETA * (old_logprobs - ref_logprobs).squeeze(-1)
        advantages = advantage_fn(score, samples_per_prompt)
        logprobs = torch.log_softmax(theta, -1)[prompts, actions][:, None]
        loss, _, _ = grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps=0.2,
                               beta=BETA if kl_in_loss else 0.0, aggregation="sequence_mean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return torch.softmax(theta.detach(), -1)


def dr_grpo_advantages(rewards, group_size):
    return group_advantages(rewards, group_size, scale=None)


def grpo_advantages(rewards, group_size):
    return group_advantages(rewards, group_size, scale="std")


def test_reverse_kl_optimum_differs_from_gibbs(world):
    # The two fixed points must be far apart for the k3 test below to mean anything.
    gibbs, reverse = world.optimal_policy(BETA), reverse_kl_optimum(world, BETA)
    assert torch.allclose(reverse.sum(-1), torch.ones(world.num_prompts, dtype=reverse.dtype))
    assert (gibbs - reverse).abs().max() > 5 * REVERSE_KL_TOLERANCE


def test_ppo_with_kl_shaped_rewards_converges_to_gibbs_policy(world):
    policy = train_ppo(world)
    optimum = world.optimal_policy(BETA)
    assert (policy - optimum).abs().max() < GIBBS_TOLERANCE
    assert world.optimal_value(BETA) - world.kl_regularised_objective(policy, BETA) < 1e-5


@pytest.mark.parametrize("advantage_fn", [grpo_advantages, dr_grpo_advantages], ids=["std", "no_std"])
def test_grpo_with_kl_in_reward_converges_to_gibbs_policy(world, advantage_fn):
    policy = train_group(world, advantage_fn, kl_in_loss=False)
    assert (policy - world.optimal_policy(BETA)).abs().max() < GIBBS_TOLERANCE


def test_rloo_with_kl_in_reward_converges_to_gibbs_policy(world):
    policy = train_group(world, rloo_advantages, kl_in_loss=False)
    assert (policy - world.optimal_policy(BETA)).abs().max() < GIBBS_TOLERANCE


def test_grpo_with_k3_in_loss_converges_to_reverse_kl_optimum(world):
    policy = train_group(world, dr_grpo_advantages, kl_in_loss=True, steps=300)
    assert (policy - reverse_kl_optimum(world, BETA)).abs().max() < REVERSE_KL_TOLERANCE
    assert (policy - world.optimal_policy(BETA)).abs().max() > 4 * REVERSE_KL_TOLERANCE
