"""The exact bandit world: RLHF where the optimum is known in closed form.

A handful of prompts x, each answered by one of a few single-token actions y. Given a reference
policy π_ref(y|x) and a reward r(x, y) (tables), the KL-regularised objective

    J(π) = E_x [ E_{y~π(·|x)} r(x, y) − β KL(π(·|x) ‖ π_ref(·|x)) ]        (x uniform)

is maximised by

    π*(y|x) = π_ref(y|x) exp(r(x, y)/β) / Z(x),    Z(x) = Σ_y π_ref(y|x) exp(r(x, y)/β),

with optimal value J(π*) = β E_x log Z(x). DPO on pairs labelled by the Bradley-Terry model of r,
and PPO / GRPO on this objective, must all converge to π*: the trainers' exact-optimum tests use
this world with tabular policies (a logits table ``[P, A]``).

All tensors are ``[P, A]`` (prompts × actions) float64 unless stated; policies are row-stochastic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BanditWorld:
    """``ref_policy`` π_ref ``[P, A]`` (rows sum to 1) and ``rewards`` r ``[P, A]``."""

    ref_policy: torch.Tensor
    rewards: torch.Tensor

    @property
    def num_prompts(self) -> int:
        return self.rewards.shape[0]

    @property
    def num_actions(self) -> int:
        return self.rewards.shape[1]

    def optimal_policy(self, beta: float) -> torch.Tensor:
        """π*(y|x) = π_ref(y|x) e^{r(x,y)/β} / Z(x), ``[P, A]`` (computed in log space)."""
        return torch.softmax(self.ref_policy.log() + self.rewards / beta, dim=-1)

    def optimal_value(self, beta: float) -> torch.Tensor:
        """J(π*) = β E_x log Z(x), a scalar."""
        return beta * torch.logsumexp(self.ref_policy.log() + self.rewards / beta, dim=-1).mean()

    def kl_regularised_objective(self, policy: torch.Tensor, beta: float, per_prompt: bool = False) -> torch.Tensor:
        """J(π) = E_x[ Σ_y π(y|x) r(x,y) − β Σ_y π(y|x) log(π(y|x)/π_ref(y|x)) ].

        ``policy`` ``[P, A]``; returns a scalar (mean over the uniform prompts) or ``[P]`` with
        ``per_prompt``. Differentiable in ``policy``; 0·log 0 is taken as 0.
        """
        expected_reward = (policy * self.rewards).sum(-1)
        log_ratio = torch.where(policy > 0, policy.log() - self.ref_policy.log(), torch.zeros_like(policy))
        kl = (policy * log_ratio).sum(-1)
        value = expected_reward - beta * kl
        return value if per_prompt else value.mean()

    def sample_prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` prompt indices, uniform, ``[n]`` long."""
        return torch.randint(self.num_prompts, (n,), generator=generator, device=self.rewards.device)

    def sample_actions(self, policy: torch.Tensor, prompts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One action per prompt from ``policy[prompts]``, ``[n]`` long."""
        return torch.multinomial(policy[prompts], 1, generator=generator).squeeze(-1)

    def sample_preference_pairs(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` labelled pairs ``(prompts, chosen, rejected)``, each ``[n]`` long.

        x uniform; y1 ~ π_ref(·|x) and y2 ~ π_ref(·|x, y ≠ y1) (distinct, so every pair of actions
        has positive probability and DPO's population optimum is exactly π*); then y1 is chosen
        with the Bradley-Terry probability P(y1 ≻ y2) = σ(r(x,y1) − r(x,y2)).
        """
        prompts = self.sample_prompts(n, generator)
        ref = self.ref_policy[prompts]
        first = torch.multinomial(ref, 1, generator=generator).squeeze(-1)
        others = ref.scatter(-1, first[:, None], 0.0)
        second = torch.multinomial(others, 1, generator=generator).squeeze(-1)
        margin = self.rewards[prompts, first] - self.rewards[prompts, second]
        first_wins = torch.rand(n, generator=generator, dtype=margin.dtype, device=margin.device) < torch.sigmoid(margin)
        chosen = torch.where(first_wins, first, second)
        rejected = torch.where(first_wins, second, first)
        return prompts, chosen, rejected


def make_bandit(num_prompts: int = 3, num_actions: int = 5, seed: int = 0, reward_scale: float = 2.0,
                dtype: torch.dtype = torch.float64) -> BanditWorld:
    """A random bandit: π_ref = softmax(N(0, 1) logits), r ~ U(0, reward_scale), fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    ref_logits = torch.randn(num_prompts, num_actions, generator=g, dtype=dtype)
    rewards = reward_scale * torch.rand(num_prompts, num_actions, generator=g, dtype=dtype)
    return BanditWorld(ref_policy=torch.softmax(ref_logits, dim=-1), rewards=rewards)
