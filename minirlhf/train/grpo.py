"""GRPO (Shao et al. 2024, DeepSeekMath): PPO without a critic; the baseline is the group.

For each prompt, sample a *group* of G responses and score each one (a rule such as "is the final
number right?" or a reward model). A response's advantage is its reward relative to its group,
the same for all of its tokens::

    Â_i = (r_i − mean(r_group)) / (std(r_group) + ε)          --scale std   (GRPO)
    Â_i =  r_i − mean(r_group)                                --scale none  (Dr. GRPO)

and the loss is PPO's clipped surrogate plus a KL penalty *in the loss* (not in the reward)::

    ℓ_{i,t} = −min(ρ_{i,t} Â_i, clip(ρ_{i,t}, 1−ε, 1+ε) Â_i) + β · k3_{i,t},
    k3 = π_ref/π − log(π_ref/π) − 1

reduced over tokens by ``--aggregation`` (``sequence_mean`` = GRPO paper, ``token_mean`` = DAPO,
``fixed_length`` = Dr. GRPO: see ``minirlhf/core/aggregation.py`` for each one's length bias).

Each iteration of the loop in ``train_grpo``:

1. **Checkpoint** every ``--save-every`` iterations and at the end; **stop** after the last.
2. **Rollout.** ``batch_size`` prompts, G samples each (rows ``g·G … g·G+G−1`` share a prompt;
   under torchrun each rank samples its share of the prompts, so a group never spans ranks);
   one reward per response (``--reward math`` = verifiable accuracy, or an RM path); log-probs of
   the samples under π_old (= the sampling policy) and π_ref.
3. **Group advantages** (``group_advantages``); groups whose G rewards are all equal carry no
   signal and get Â = 0 (logged as ``zero_advantage_groups``).
4. **Update.** ``ppo_epochs`` passes over shuffled minibatches of ``grpo_loss``. With one epoch
   and one minibatch (the defaults) the update is exactly on-policy: ρ = 1 and the clip is idle.
5. **Log** the reward, its spread within groups, KL and lengths (the gold reward in the toy world).

**What the k3 term optimises.** k3 is an unbiased *estimate* of KL(π‖π_ref), but as a loss on
samples from π its gradient is ``E_π[(1 − π_ref/π) ∇log π] = −Σ_y π_ref(y) ∇log π(y)``, the
gradient of the *reverse* KL(π_ref‖π). So GRPO's fixed point maximises
``E_π[r] − β·KL(π_ref‖π)`` — close to, but not, the Gibbs policy π_ref·e^{r/β}/Z that PPO (KL in
the reward) converges to. ``tests/test_optimum_rl.py`` shows both on the exact bandit world.

    python -m minirlhf grpo                        # toy world: arithmetic prompts, rule reward "math"
    python -m minirlhf grpo --model Qwen/Qwen2.5-0.5B-Instruct --data gsm8k.jsonl --template prompt \\
        --reward math --group-size 8 --batch-size 16 --lr 1e-6 --max-new-tokens 256 --scale none

From Python: ``train_grpo(GRPOArgs(...))`` returns the saved policy directory.
"""
import dataclasses
import sys
import typing

import torch

from minirlhf.core.grpo import group_advantages, grpo_loss
from minirlhf.core.masked import masked_sum
from minirlhf.data.prompts import PromptSet
from minirlhf.errors import MinirlhfError
from minirlhf.models.forward import rollout_logprobs
from minirlhf.models.policy import load_tokenizer
from minirlhf.models.sampling import generate_rollouts
from minirlhf.toy.measure import gold_summary, is_toy_prompt
from minirlhf.train.args import PolicyTrainArgs, parse_args
from minirlhf.train.batches import micro_batches, response_tokens, select_rows
from minirlhf.train.checkpoints import (
    checkpoint_due, final_path, last_step, load_training_state, prepare_run, save_checkpoint,
)
from minirlhf.train.distributed import data_parallel_weights, gathered, per_rank, rank_share
from minirlhf.train.metrics import TrainingLog, average, response_metrics
from minirlhf.train.optim import DivergenceGuard, backward_weighted, make_optimizer, make_scheduler, optimizer_step
from minirlhf.train.parallel import data_parallel, gradient_sync
from minirlhf.train.rewards import load_reward
from minirlhf.train.levers import load_trained_policy, policy_logprobs, reference_policy
from minirlhf.train.precision import Precision
from minirlhf.train.runtime import select_device
from minirlhf.train.toy_world import load_toy_world


@dataclasses.dataclass
class GRPOArgs(PolicyTrainArgs):
    """GRPO: group-relative advantages, no critic, k3 KL in the loss."""

    reward: str = "math"
    """The reward: a rule name (math = the final number equals the answer; gold = the toy
    world's gold reward) or a reward-model directory."""
    steps: int = 60
    """GRPO iterations (rollout + update)."""
    batch_size: int = 8
    """Prompts per rollout; each gets --group-size samples."""
    group_size: int = 16
    """G: samples per prompt (at least 2)."""
    minibatch_size: int = 0
    """Responses per optimizer step (0 = all batch_size × group_size responses: one on-policy step)."""
    micro_batch_size: int = 0
    """Responses per forward/backward pass inside a minibatch (0 = the whole minibatch)."""
    ppo_epochs: int = 1
    """Passes over each rollout (μ in the GRPO paper)."""
    lr: float = 1e-3
    """AdamW learning rate (toy world; ~1e-6 for a 0.5B model)."""
    warmup_ratio: float = 0.0
    """Fraction of optimizer steps spent warming the learning rate up."""
    lr_schedule: typing.Literal["cosine", "linear", "constant"] = "constant"
    """Learning-rate schedule over all optimizer steps."""
    max_new_tokens: int = 16
    """Generation budget per response (tokens); also max_len of --aggregation fixed_length."""
    temperature: float = 1.0
    """Sampling temperature (the log-probs use the same temperature)."""
    beta: float = 0.04
    """Weight β of the k3 KL penalty in the loss (0 = no KL term, as DAPO / Dr. GRPO)."""
    clip_eps: float = 0.2
    """Clip range ε of the ratio."""
    scale: typing.Literal["std", "none"] = "std"
    """Advantage scaling: std = divide by the group's std (GRPO), none = only centre (Dr. GRPO)."""
    aggregation: typing.Literal["sequence_mean", "token_mean", "fixed_length"] = "sequence_mean"
    """How token losses are averaged: per sequence then over sequences (GRPO), over all tokens
    (DAPO), or summed / (responses × max_new_tokens) (Dr. GRPO)."""
    system_prompt: typing.Optional[str] = None
    """System prompt put in front of every prompt (default: the template's)."""


def micro_batch_weights(micro, aggregation):
    """``w_k`` for gradient accumulation: each micro-batch's share of what the loss averages over.

    ``sequence_mean`` averages over the rows that have response tokens, ``token_mean`` over
    response tokens, ``fixed_length`` over rows (its normaliser ``B · max_len`` counts rows). So
    ``Σ_k w_k L_k`` equals the loss of the whole minibatch (under torchrun: of every rank's share).
    """
    if aggregation == "token_mean":
        counts = [response_tokens(b) for _, b in micro]
    elif aggregation == "sequence_mean":
        counts = [float(b["response_mask"].bool().any(-1).sum()) for _, b in micro]
    else:
        counts = [float(len(b["input_ids"])) for _, b in micro]
    return data_parallel_weights(counts)


def grpo_step_loss(policy, batch, args):
    """``grpo_loss`` on one micro-batch of a rollout; returns ``(loss, metrics)``."""
    logprobs, mask = policy_logprobs(args)(policy, batch["input_ids"], batch["attention_mask"],
                                           batch["response_mask"], temperature=args.temperature)
    loss, clip_fraction, kl = grpo_loss(
        logprobs, batch["old_logprobs"], batch["ref_logprobs"], batch["advantages"], mask,
        clip_eps=args.clip_eps, beta=args.beta, aggregation=args.aggregation, max_len=args.max_new_tokens,
    )
    return loss, {"clip_fraction": clip_fraction, "kl_k3_token": kl}


def train_grpo(args: GRPOArgs):
    """Run GRPO with ``args``; returns the saved policy directory (``<out>/final``, HF-loadable)."""
    # 1. Defaults (the toy world's SFT policy and arithmetic prompts), run directory, seed.
    world = load_toy_world() if args.model is None or args.data is None else None
    args.model = args.model or str(world.sft_model)
    if args.data is None:
        args.data, args.template = str(world.math_prompts), args.template or "prompt"
    num_responses = args.batch_size * args.group_size
    minibatch_size = args.minibatch_size or num_responses
    if num_responses % minibatch_size:
        raise MinirlhfError(f"--minibatch-size {minibatch_size} must divide batch_size × group_size = {num_responses}")
    args.template = args.template or "prompt"  # online trainers read prompt-only data
    resume_from = prepare_run(args, "grpo")
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
    #    its share of the prompts and steps on its share of every minibatch. Optimizer and schedule
    #    (counted in optimizer steps); resume state.
    dp_policy = data_parallel(policy, args.fsdp, reshard_after_forward=False)
    rank_responses = per_rank(args.batch_size) * args.group_size
    rank_minibatch = per_rank(minibatch_size, "--minibatch-size")
    optimizer = make_optimizer(policy.parameters(), args.lr, args.weight_decay)
    updates = args.ppo_epochs * num_responses // minibatch_size
    scheduler = make_scheduler(optimizer, args.steps * updates, args.warmup_ratio, args.lr_schedule)
    start = load_training_state(resume_from, optimizer, scheduler, precision.scaler)["step"] if resume_from else 0
    last = last_step(args, args.steps)

    def save(done):
        return save_checkpoint(args.out, done, policy, tokenizer, optimizer, scheduler, scaler=precision.scaler)

    # 4. The loop; `iteration` iterations are done at the top of each pass.
    policy.train()
    with TrainingLog(args, start, args.steps, last, desc="grpo") as log:
        for iteration in range(start, last + 1):
            # 4.1 Checkpoint; stop.
            if checkpoint_due(args, iteration, start, last):
                save(iteration)
            if iteration == last:
                break
            guard = DivergenceGuard(lambda: save(iteration))
            # 4.2 Rollout: G samples per prompt; one reward per response; log-probs of the samples
            #     under the sampling policy and the reference.
            with precision.autocast():
                rollout = generate_rollouts(policy, tokenizer, prompts.batch(iteration, device, rank_share),
                                            args.max_new_tokens, n_per_prompt=args.group_size,
                                            temperature=args.temperature)
                rewards = reward_fn(rollout)
                old_logprobs, mask = rollout_logprobs(policy, rollout, args.micro_batch_size, args.temperature)
                ref_logprobs, _ = rollout_logprobs(reference, rollout, args.micro_batch_size, args.temperature)
            # 4.3 Group-relative advantages: one number per response, shared by its tokens.
            advantages = group_advantages(rewards, args.group_size, scale=None if args.scale == "none" else "std")
            data = {k: rollout[k] for k in ("input_ids", "attention_mask", "response_mask")}
            data.update(old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages)
            # 4.4 Clipped-surrogate + β·k3 updates over shuffled minibatches.
            update_metrics = []
            for _ in range(args.ppo_epochs):
                order = torch.randperm(rank_responses).tolist()
                for first in range(0, rank_responses, rank_minibatch):
                    rows = order[first : first + rank_minibatch]
                    micro = [(part, select_rows(data, part)) for part in micro_batches(rows, args.micro_batch_size)]
                    weights = micro_batch_weights(micro, args.aggregation)
                    metrics = {}
                    for k, ((ids, batch), weight) in enumerate(zip(micro, weights)):
                        with gradient_sync(dp_policy, last=k == len(micro) - 1):  # ranks average gradients once
                            with precision.autocast():
                                loss, loss_metrics = grpo_step_loss(dp_policy, batch, args)
                            backward_weighted(loss, loss_metrics, weight, metrics, guard=guard, step=iteration,
                                              example_ids=ids, scaler=precision.scaler)
                    metrics.update(optimizer_step(policy, optimizer, scheduler, args.max_grad_norm, guard=guard,
                                                  step=iteration, example_ids=rows, scaler=precision.scaler))
                    update_metrics.append(metrics)
            # 4.5 Log.
            grouped = rewards.view(-1, args.group_size)
            metrics = {**average(update_metrics), "reward": float(rewards.mean()),
                       "reward_std_in_group": float(grouped.std(dim=-1).mean()),
                       "zero_advantage_groups": float((grouped == grouped[:, :1]).all(dim=-1).float().mean()),
                       "kl": float(masked_sum(old_logprobs - ref_logprobs, mask) / len(rewards)),
                       **response_metrics(rollout)}
            if args.reward == "math":
                metrics["accuracy"] = metrics["reward"]
            if log_gold:  # over every rank's samples
                metrics.update(gold_summary(gathered(rollout["prompts"]), gathered(rollout["responses"])))
            log.train(iteration + 1, metrics)
    return final_path(args, policy, tokenizer, last, args.steps)


def main(argv=None):
    args = parse_args(GRPOArgs, argv, prog="python -m minirlhf grpo")
    print(f"saved {train_grpo(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
