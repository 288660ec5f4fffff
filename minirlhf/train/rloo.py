"""RLOO: REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024).

The simplest policy gradient that works for RLHF. Each response is one action with one reward;
there is no critic and no per-token credit assignment. The KL regulariser goes **into the
reward**, as a sequence-level term, so RLOO maximises exactly the KL-regularised objective
``E[r] − β·KL(π‖π_ref)`` (whose optimum is π_ref·e^{r/β}/Z)::

    R_i  = r(x, y_i) − β · Σ_t (log π_old(y_i,t) − log π_ref(y_i,t))       (k1 summed over y_i)
    Â_i  = R_i − (1/(G−1)) Σ_{j≠i} R_j                                       (leave-one-out)
    L(θ) = −(1/B) Σ_i Â_i · log π_θ(y_i | x_i),   log π_θ(y|x) = Σ_t log π_θ(y_t | x, y_<t)

The baseline of sample i is the mean reward of the *other* samples of its prompt, so it does not
depend on y_i and the gradient stays unbiased. One gradient step per rollout batch keeps the
update on-policy, so no importance ratio or clipping is needed (a second step on the same samples
would need PPO's ratio: that is what ``grpo``'s clipped loss adds).

Each iteration: 1. rollout (G samples per prompt); 2. reward; 3. log-probs under π_old and π_ref,
KL-penalised sequence rewards; 4. leave-one-out advantages; 5. one REINFORCE step.

    python -m minirlhf rloo                        # toy world: arithmetic prompts, reward "math"
    python -m minirlhf rloo --reward runs/rm/final --data prompts.jsonl --template prompt

From Python: ``train_rloo(RLOOArgs(...))`` returns the saved policy directory.
"""
import dataclasses
import sys
import typing

from minirlhf.core.grpo import rloo_advantages
from minirlhf.core.logprobs import sequence_logprobs
from minirlhf.core.masked import masked_sum
from minirlhf.models.forward import response_logprobs
from minirlhf.train import common
from minirlhf.train.rollout import (
    final_path, generate_rollouts, gold_metrics, response_metrics, run_iterations, select_rows, start_online_run,
)


@dataclasses.dataclass
class RLOOArgs(common.TrainArgs):
    """RLOO: REINFORCE with a leave-one-out baseline and the KL penalty in the reward."""

    reward: str = "math"
    """The reward: a rule name (math, gold) or a reward-model directory."""
    steps: int = 40
    """RLOO iterations (rollout + one gradient step)."""
    batch_size: int = 16
    """Prompts per rollout; each gets --group-size samples."""
    group_size: int = 4
    """G: samples per prompt (at least 2; the baseline averages the other G − 1)."""
    micro_batch_size: int = 0
    """Responses per forward/backward pass (0 = all at once); gradients are accumulated."""
    lr: float = 1e-4
    """AdamW learning rate (toy world; ~1e-6 for a 0.5B model)."""
    warmup_ratio: float = 0.0
    """Fraction of steps spent warming the learning rate up."""
    lr_schedule: typing.Literal["cosine", "linear", "constant"] = "constant"
    """Learning-rate schedule."""
    max_new_tokens: int = 16
    """Generation budget per response (tokens)."""
    temperature: float = 1.0
    """Sampling temperature (the log-probs use the same temperature)."""
    beta: float = 0.05
    """KL coefficient β of the sequence-level penalty in the reward."""
    system_prompt: typing.Optional[str] = None
    """System prompt put in front of every prompt (default: the template's)."""


def reinforce_loss(policy, batch, args):
    """``−mean_i Â_i · log π_θ(y_i|x_i)`` on one micro-batch; returns ``(loss, metrics)``."""
    logprobs, mask = response_logprobs(policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                       temperature=args.temperature)
    loss = -(batch["advantages"] * sequence_logprobs(logprobs, mask)).mean()
    return loss, {}


def train_rloo(args: RLOOArgs):
    """Run RLOO with ``args``; returns the saved policy directory (``<out>/final``, HF-loadable)."""
    # 1. Defaults (the toy world's SFT policy and arithmetic prompts).
    world = common.toy_world() if args.model is None or args.data is None else None
    args.model = args.model or str(world.sft_model)
    if args.data is None:
        args.data, args.template = str(world.math_prompts), args.template or "prompt"

    # 2. Run directory and seed; tokenizer, policy (from the checkpoint when resuming), frozen
    #    reference, reward, prompts; optimizer (one step per iteration).
    run = start_online_run(args, "rloo")
    policy, tokenizer, device = run.policy, run.tokenizer, run.device
    run.make_optimizer(policy)

    def one_iteration(iteration):
        guard = common.DivergenceGuard(lambda: run.save_checkpoint(iteration))
        # 1. Rollout; 2. reward; 3. KL-penalised sequence rewards.
        with common.autocast(device):
            rollout = generate_rollouts(policy, tokenizer, run.prompts.batch(iteration, device), args.max_new_tokens,
                                        n_per_prompt=args.group_size, temperature=args.temperature)
            scores = run.reward_fn(rollout)
            old_logprobs, ref_logprobs, mask = run.policy_and_reference_logprobs(rollout, args.temperature)
        sequence_kl = masked_sum(old_logprobs - ref_logprobs, mask, dim=-1)
        # 4. Leave-one-out advantages of the penalised rewards.
        advantages = rloo_advantages(scores - args.beta * sequence_kl, args.group_size)
        data = {k: rollout[k] for k in ("input_ids", "attention_mask", "response_mask")}
        data["advantages"] = advantages

        # 5. One REINFORCE step; micro-batches weigh by their share of the rows (a mean over rows).
        rows = list(range(len(scores)))
        micro = [(part, select_rows(data, part)) for part in common.micro_batches(rows, args.micro_batch_size)]
        weights = [len(part) / len(rows) for part, _ in micro]
        metrics = common.accumulate_gradients(micro, lambda b: reinforce_loss(policy, b, args), weights,
                                              device=device, guard=guard, step=iteration)
        metrics.update(common.optimizer_step(policy, run.optimizer, run.scheduler, args.max_grad_norm,
                                             guard=guard, step=iteration, example_ids=rows))
        metrics.update({
            "reward": float(scores.mean()),
            "kl": float(sequence_kl.mean()),
            "penalised_reward": float((scores - args.beta * sequence_kl).mean()),
            **response_metrics(rollout),
        })
        if run.prompts.is_toy:
            metrics.update(gold_metrics(rollout))
        return metrics

    policy.train()
    done = run_iterations(args, total=args.steps, start=run.start, one_iteration=one_iteration,
                          save_checkpoint=run.save_checkpoint, desc="rloo")
    return final_path(args, args.steps, done, policy, tokenizer)


def main(argv=None):
    args = common.parse_args(RLOOArgs, argv, prog="python -m minirlhf rloo")
    print(f"saved {train_rloo(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
