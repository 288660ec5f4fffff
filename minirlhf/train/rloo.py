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

Each iteration of the loop in ``train_rloo``: 1. checkpoint, stop after the last; 2. rollout (G
samples per prompt), reward, log-probs under π_old and π_ref; 3. KL-penalised sequence rewards and
their leave-one-out advantages; 4. one REINFORCE step; 5. log.

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
from minirlhf.data.prompts import PromptSet
from minirlhf.models.forward import rollout_logprobs
from minirlhf.models.policy import load_tokenizer
from minirlhf.models.sampling import generate_rollouts
from minirlhf.toy.measure import gold_summary, is_toy_prompt
from minirlhf.train.args import PolicyTrainArgs, parse_args
from minirlhf.train.batches import micro_batches, select_rows
from minirlhf.train.checkpoints import (
    checkpoint_due, final_path, last_step, load_training_state, prepare_run, save_checkpoint,
)
from minirlhf.train.distributed import data_parallel_weights, gathered, rank_share
from minirlhf.train.metrics import TrainingLog, response_metrics
from minirlhf.train.optim import DivergenceGuard, backward_weighted, make_optimizer, make_scheduler, optimizer_step
from minirlhf.train.parallel import data_parallel, gradient_sync
from minirlhf.train.rewards import load_reward
from minirlhf.train.levers import load_trained_policy, policy_logprobs, reference_policy
from minirlhf.train.precision import Precision
from minirlhf.train.runtime import select_device
from minirlhf.train.toy_world import load_toy_world


@dataclasses.dataclass
class RLOOArgs(PolicyTrainArgs):
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
    logprobs, mask = policy_logprobs(args)(policy, batch["input_ids"], batch["attention_mask"],
                                           batch["response_mask"], temperature=args.temperature)
    loss = -(batch["advantages"] * sequence_logprobs(logprobs, mask)).mean()
    return loss, {}


def train_rloo(args: RLOOArgs):
    """Run RLOO with ``args``; returns the saved policy directory (``<out>/final``, HF-loadable)."""
    # 1. Defaults (the toy world's SFT policy and arithmetic prompts), run directory, seed.
    world = load_toy_world() if args.model is None or args.data is None else None
    args.model = args.model or str(world.sft_model)
    if args.data is None:
        args.data, args.template = str(world.math_prompts), args.template or "prompt"
    args.template = args.template or "prompt"  # online trainers read prompt-only data
    resume_from = prepare_run(args, "rloo")
    device = select_device(args.device)
    precision = Precision(args.precision, device)

    # 2. Tokenizer, policy (from the checkpoint when resuming; LoRA, checkpointing), frozen reference
    #    (with LoRA: the policy's adapters off), reward, prompts.
    tokenizer = load_tokenizer(args.model)
    policy = load_trained_policy(args, resume_from, device, precision.dtype)
    reference = reference_policy(args, policy, device, precision.dtype)
    reward_fn = load_reward(args.reward, device=device, dtype=precision.dtype)
    prompts = PromptSet(args.data, tokenizer, args.template, args.batch_size, args.seed, args.max_prompt_len,
                        args.system_prompt)
    log_gold = all(map(is_toy_prompt, prompts.texts))

    # 3. Data parallelism (DDP, or FSDP2 with --fsdp; `policy` itself in one process): each rank samples
    #    its share of the prompts. Optimizer and schedule (one step per iteration); resume state.
    dp_policy = data_parallel(policy, args.fsdp, reshard_after_forward=False)
    optimizer = make_optimizer(policy.parameters(), args.lr, args.weight_decay)
    scheduler = make_scheduler(optimizer, args.steps, args.warmup_ratio, args.lr_schedule)
    start = load_training_state(resume_from, optimizer, scheduler, precision.scaler)["step"] if resume_from else 0
    last = last_step(args, args.steps)

    def save(done):
        return save_checkpoint(args.out, done, policy, tokenizer, optimizer, scheduler, scaler=precision.scaler)

    # 4. The loop; `iteration` iterations are done at the top of each pass.
    policy.train()
    with TrainingLog(args, start, args.steps, last, desc="rloo") as log:
        for iteration in range(start, last + 1):
            # 4.1 Checkpoint; stop.
            if checkpoint_due(args, iteration, start, last):
                save(iteration)
            if iteration == last:
                break
            guard = DivergenceGuard(lambda: save(iteration))
            # 4.2 Rollout; reward; log-probs under π_old and π_ref.
            with precision.autocast():
                rollout = generate_rollouts(policy, tokenizer, prompts.batch(iteration, device, rank_share),
                                            args.max_new_tokens, n_per_prompt=args.group_size, temperature=args.temperature)
                scores = reward_fn(rollout)
                old_logprobs, mask = rollout_logprobs(policy, rollout, args.micro_batch_size, args.temperature)
                ref_logprobs, _ = rollout_logprobs(reference, rollout, args.micro_batch_size, args.temperature)
            # 4.3 KL-penalised sequence rewards and their leave-one-out advantages.
            sequence_kl = masked_sum(old_logprobs - ref_logprobs, mask, dim=-1)
            advantages = rloo_advantages(scores - args.beta * sequence_kl, args.group_size)
            data = {k: rollout[k] for k in ("input_ids", "attention_mask", "response_mask")}
            data["advantages"] = advantages
            # 4.4 One REINFORCE step; micro-batches weigh by their share of the rows of all ranks (a mean
            #     over rows).
            rows = list(range(len(scores)))
            micro = [(part, select_rows(data, part)) for part in micro_batches(rows, args.micro_batch_size)]
            weights = data_parallel_weights([len(part) for part, _ in micro])
            metrics = {}
            for k, ((ids, batch), weight) in enumerate(zip(micro, weights)):
                with gradient_sync(dp_policy, last=k == len(micro) - 1):  # ranks average gradients once per step
                    with precision.autocast():
                        loss, loss_metrics = reinforce_loss(dp_policy, batch, args)
                    backward_weighted(loss, loss_metrics, weight, metrics, guard=guard, step=iteration, example_ids=ids,
                                      scaler=precision.scaler)
            metrics.update(optimizer_step(policy, optimizer, scheduler, args.max_grad_norm, guard=guard, step=iteration,
                                          example_ids=rows, scaler=precision.scaler))
            # 4.5 Log.
            metrics.update({
                "reward": float(scores.mean()),
                "kl": float(sequence_kl.mean()),
                "penalised_reward": float((scores - args.beta * sequence_kl).mean()),
                **response_metrics(rollout),
            })
            if log_gold:
                metrics.update(gold_summary(gathered(rollout["prompts"]), gathered(rollout["responses"])))
            log.train(iteration + 1, metrics)
    return final_path(args, policy, tokenizer, last, args.steps)


def main(argv=None):
    args = parse_args(RLOOArgs, argv, prog="python -m minirlhf rloo")
    print(f"saved {train_rloo(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
