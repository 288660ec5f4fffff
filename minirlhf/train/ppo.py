"""PPO for RLHF (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022): a policy, a critic,
a reward model, and a frozen reference that the policy is kept close to.

    max_θ  E_{x, y~π_θ} [ r_φ(x, y) ] − β · KL(π_θ(·|x) ‖ π_ref(·|x))

Each iteration of the loop in ``train_ppo`` (the same steps as the file reads):

1. **Checkpoint** every ``--save-every`` iterations and at the end; **stop** after the last.
2. **Rollout.** One response per prompt from π_θ (the KV-cached sampler, ``models/sampling.py``).
3. **Score.** The reward model gives one scalar ``r_φ(x, y)`` per response (the *proxy* reward);
   in the toy world the *gold* reward r*(x, y) is logged next to it, never trained on.
4. **Log-probs and values of the rollout** under π_θ (= π_old), π_ref and the critic V_ψ.
5. **KL-shaped rewards** ``r_t = −β·kl_t`` on every response token, plus ``r_φ(x, y)`` on the
   last one (``kl_t = log π_old − log π_ref``, estimator k1 by default); **GAE** advantages
   (``gae_advantages``), whitened over the batch: the step size should not depend on the RM's scale.
6. **Update.** ``ppo_epochs`` passes over the rollout in shuffled minibatches of ``ppo_loss``:
   ``L_clip(π_θ) + c_v · L_value(V_ψ) − c_H · H(π_θ) [+ c_ptx · NLL_SFT(π_θ)]`` (the optional ptx
   term of InstructGPT keeps the policy fluent on demonstration data).
7. **KL controller** (optional, Ziegler et al.): ``β ← β·(1 + K·e)``,
   ``e = clip(KL/KL_target − 1, ±0.2)``, ``K = batch_size / horizon``; then **log**.

**The critic** is initialised from the reward model when the reward is one (``--critic-init
reward_model``, as InstructGPT), else from the policy's backbone with a fresh head; one AdamW
updates both at the same learning rate.

**Over-optimisation.** The reward model is a proxy. Pushed with a small β, PPO finds what the proxy
pays for and the truth does not (in the toy world: filler words, a planted length bias): the
proxy score rises while the gold reward falls (Gao et al. 2023). ``out/train.csv`` logs ``reward``
(proxy), ``gold`` and ``kl``; ``minirlhf.eval.overoptimisation`` plots them.

    python -m minirlhf ppo --reward runs/rm/final                 # toy world, toy SFT policy
    python -m minirlhf ppo --model Qwen/Qwen2.5-0.5B-Instruct --reward RM_DIR --data prompts.jsonl \\
        --template prompt --lr 1e-6 --max-new-tokens 128 --batch-size 64 --minibatch-size 16
"""
import dataclasses
import sys
import typing
from pathlib import Path

import torch

from minirlhf.core.gae import gae_advantages
from minirlhf.core.kl import kl_shaped_rewards
from minirlhf.core.masked import masked_mean, masked_sum
from minirlhf.core.ppo_losses import ppo_policy_loss, ppo_value_loss
from minirlhf.data.datasets import load_sft_data
from minirlhf.data.prompts import PromptSet
from minirlhf.errors import MinirlhfError
from minirlhf.models.forward import rollout_logprobs
from minirlhf.models.policy import load_tokenizer
from minirlhf.models.sampling import generate_rollouts
from minirlhf.models.value_model import ValueModel
from minirlhf.toy.measure import gold_summary, is_toy_prompt
from minirlhf.train.args import PolicyTrainArgs, parse_args
from minirlhf.train.batches import micro_batches, ptx_batch, response_tokens, select_rows
from minirlhf.train.checkpoints import (
    checkpoint_due, final_path, last_step, load_training_state, prepare_run, save_checkpoint, save_model,
)
from minirlhf.train.kl_control import adapt_kl_coef
from minirlhf.train.distributed import (data_parallel_weights, gathered, global_masked_whiten, mean_over_ranks,
                                        per_rank, rank_share)
from minirlhf.train.metrics import TrainingLog, average, response_metrics
from minirlhf.train.optim import DivergenceGuard, backward_weighted, make_optimizer, make_scheduler, optimizer_step
from minirlhf.train.parallel import data_parallel, full_state_dict, gradient_sync, load_full_state_dict
from minirlhf.train.rewards import RewardModelReward, load_reward
from minirlhf.train.levers import enable_gradient_checkpointing, load_trained_policy, policy_logprobs, reference_policy
from minirlhf.train.precision import Precision
from minirlhf.train.runtime import TRAIN_DTYPE, select_device
from minirlhf.train.toy_world import load_toy_world


@dataclasses.dataclass
class PPOArgs(PolicyTrainArgs):
    """PPO with a value model and KL-shaped per-token rewards."""

    reward: typing.Optional[str] = None
    """The reward: a reward-model directory (from `python -m minirlhf rm`) or a rule name
    (math, gold). Default: gold on the toy world's prompts; required with --data."""
    steps: int = 40
    """PPO iterations (rollout + update); prompts are cycled through in seeded order."""
    batch_size: int = 32
    """Prompts (= responses) per rollout."""
    minibatch_size: int = 16
    """Responses per optimizer step; batch_size / minibatch_size steps per PPO epoch (0 = the whole
    batch: one step per epoch)."""
    micro_batch_size: int = 0
    """Responses per forward/backward pass inside a minibatch (0 = the whole minibatch)."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    lr: float = 3e-4
    """AdamW learning rate of policy and critic (toy world; ~1e-6 for a 0.5B model)."""
    warmup_ratio: float = 0.0
    """Fraction of optimizer steps spent warming the learning rate up."""
    lr_schedule: typing.Literal["cosine", "linear", "constant"] = "constant"
    """Learning-rate schedule over all optimizer steps."""
    max_new_tokens: int = 32
    """Generation budget per response (tokens)."""
    temperature: float = 1.0
    """Sampling temperature; the log-probs use the same temperature, so the ratio compares the
    distribution the tokens were drawn from."""
    beta: float = 0.3
    """KL coefficient β of the KL-shaped reward (the initial value with --adaptive-kl). The toy
    world's RM is easy to over-optimise (β = 0.01 doubles the length and lowers the gold reward);
    0.02-0.1 is usual for real models."""
    kl_estimator: typing.Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward (k1 = log π − log π_ref, the classic choice)."""
    adaptive_kl: bool = False
    """Adapt β towards --target-kl (Ziegler et al. 2019's proportional controller)."""
    target_kl: float = 6.0
    """Target KL(π‖π_ref) per response, in nats, for --adaptive-kl."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller (responses); smaller reacts faster."""
    gamma: float = 1.0
    """Discount over response tokens."""
    lam: float = 0.95
    """GAE λ."""
    clip_eps: float = 0.2
    """PPO clip range ε of the policy ratio."""
    value_clip: float = 0.2
    """Clip range of the value change in the value loss."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    critic_init: typing.Literal["reward_model", "policy"] = "reward_model"
    """Initialise the critic from the reward model (when --reward is one) or the policy backbone."""
    ptx_coef: float = 0.0
    """Weight of the pretraining/SFT NLL term (InstructGPT's PPO-ptx); needs --ptx-data."""
    ptx_data: typing.Optional[str] = None
    """SFT file for the ptx term (default in the toy world: its SFT corpus)."""
    ptx_template: typing.Optional[str] = None
    """Template of --ptx-data (default: sft)."""
    system_prompt: typing.Optional[str] = None
    """System prompt put in front of every prompt (default: the template's)."""


def ppo_loss(policy, critic, batch, args):
    """The loss of one micro-batch of a rollout; returns ``(loss, metrics)``.

    ``batch``: ``input_ids``, ``attention_mask``, ``response_mask`` ``[B, L]`` and the rollout's
    ``old_logprobs``, ``old_values``, ``advantages``, ``returns`` ``[B, T]`` (plus ``ptx_*``
    tensors for the ptx term). All token means are over the micro-batch's response tokens.
    """
    logprobs, mask, entropy = policy_logprobs(args)(  # the entropy is only logged when its coefficient is 0
        policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
        temperature=args.temperature, return_entropy=True, entropy_grad=args.entropy_coef != 0,
    )
    values = critic(batch["input_ids"], batch["attention_mask"])[:, :-1]  # V(s_t) aligned with labels
    policy_loss, clip_fraction, approx_kl = ppo_policy_loss(
        logprobs, batch["old_logprobs"], batch["advantages"], mask, args.clip_eps
    )
    value_loss, value_clip_fraction = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, args.value_clip)
    entropy = masked_mean(entropy, mask)
    loss = policy_loss + args.vf_coef * value_loss - args.entropy_coef * entropy
    metrics = {
        "policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(), "entropy": entropy.detach(),
        "clip_fraction": clip_fraction, "value_clip_fraction": value_clip_fraction, "approx_kl": approx_kl,
    }
    if "ptx_input_ids" in batch:
        ptx_logprobs, ptx_mask = policy_logprobs(args)(
            policy, batch["ptx_input_ids"], batch["ptx_attention_mask"], batch["ptx_response_mask"]
        )
        ptx_loss = masked_mean(-ptx_logprobs, ptx_mask)
        loss = loss + args.ptx_coef * ptx_loss
        metrics["ptx_loss"] = ptx_loss.detach()
    return loss, metrics


def train_ppo(args: PPOArgs):
    """Run PPO with ``args``; returns the saved policy directory (``<out>/final``, HF-loadable;
    the critic is saved next to it in ``<out>/critic``)."""
    # 1. Defaults (the toy world's SFT policy, prompts and gold reward), and what they must satisfy.
    world = load_toy_world() if args.model is None or args.data is None else None
    args.model = args.model or str(world.sft_model)
    if args.data is None:
        args.data, args.template = str(world.prompts), args.template or "prompt"
        args.reward = args.reward or "gold"
        args.ptx_data = args.ptx_data or (str(world.sft_train) if args.ptx_coef > 0 else None)
    if args.reward is None:
        raise MinirlhfError("ppo needs --reward: a reward-model directory (train one with "
                            "`python -m minirlhf rm`) or a rule name (math, gold)")
    if args.ptx_coef > 0 and args.ptx_data is None:
        raise MinirlhfError("--ptx-coef > 0 needs --ptx-data (an SFT file)")
    minibatch_size = args.minibatch_size or args.batch_size
    if args.batch_size % minibatch_size:
        raise MinirlhfError(f"--batch-size {args.batch_size} must be a multiple of --minibatch-size {minibatch_size}")
    args.template = args.template or "prompt"  # online trainers read prompt-only data
    resume_from = prepare_run(args, "ppo")
    device = select_device(args.device)
    precision = Precision(args.precision, device)

    # 2. Tokenizer, policy (from the checkpoint when resuming; LoRA, checkpointing), frozen reference
    #    (with LoRA: the policy's adapters off), reward, prompts, critic, ptx data.
    tokenizer = load_tokenizer(args.model)
    policy = load_trained_policy(args, resume_from, device, precision.dtype)
    reference = reference_policy(args, policy, device, precision.dtype)
    reward_fn = load_reward(args.reward, device=device, dtype=precision.dtype)
    prompts = PromptSet(args.data, tokenizer, args.template, args.batch_size, args.seed, args.max_prompt_len,
                        args.system_prompt)
    log_gold = all(map(is_toy_prompt, prompts.texts))
    if args.critic_init == "reward_model" and isinstance(reward_fn, RewardModelReward):
        critic = ValueModel.from_pretrained(args.reward, dtype=TRAIN_DTYPE, device=device, keep_dropout=args.keep_dropout)
    else:
        critic = ValueModel.from_causal_lm(args.model, dtype=TRAIN_DTYPE, device=device, seed=args.seed, keep_dropout=args.keep_dropout)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(critic)
    ptx = None
    if args.ptx_coef > 0:
        ptx = load_sft_data(args.ptx_data, args.ptx_template or "sft", tokenizer, args.max_len,
                            args.max_prompt_len, args.system_prompt)[0]

    # 3. Data parallelism (each rank: its share of the prompts, then of every minibatch); one optimizer
    #    over policy and critic, its schedule in optimizer steps; resume state (+ the critic and β).
    dp_models = data_parallel(policy, args.fsdp, False), data_parallel(critic, args.fsdp, False)
    rank_batch, rank_minibatch = per_rank(args.batch_size), per_rank(minibatch_size, "--minibatch-size")
    models = torch.nn.ModuleDict({"policy": policy, "critic": critic})
    optimizer = make_optimizer(models.parameters(), args.lr, args.weight_decay)
    updates = args.ppo_epochs * args.batch_size // minibatch_size
    scheduler = make_scheduler(optimizer, args.steps * updates, args.warmup_ratio, args.lr_schedule)
    start, beta = 0, args.beta
    if resume_from:
        state = load_training_state(resume_from, optimizer, scheduler, precision.scaler)
        start, beta = state["step"], state["extra"]["beta"]
        load_full_state_dict(critic, state["extra"]["critic"])
    last = last_step(args, args.steps)

    def save(done):
        return save_checkpoint(args.out, done, policy, tokenizer, optimizer, scheduler,
                               {"critic": full_state_dict(critic), "beta": beta}, scaler=precision.scaler)

    # 4. The loop; `iteration` iterations are done at the top of each pass.
    policy.train()
    critic.train()
    with TrainingLog(args, start, args.steps, last, desc="ppo") as log:
        for iteration in range(start, last + 1):
            # 4.1 Checkpoint; stop.
            if checkpoint_due(args, iteration, start, last):
                save(iteration)
            if iteration == last:
                break
            guard = DivergenceGuard(lambda: save(iteration))
            # 4.2 Rollout; 4.3 score (proxy); 4.4 log-probs under π_old and π_ref, values.
            with precision.autocast():
                rollout = generate_rollouts(policy, tokenizer, prompts.batch(iteration, device, rank_share),
                                            args.max_new_tokens, temperature=args.temperature)
                scores = reward_fn(rollout)
                old_logprobs, mask = rollout_logprobs(policy, rollout, args.micro_batch_size, args.temperature)
                ref_logprobs, _ = rollout_logprobs(reference, rollout, args.micro_batch_size, args.temperature)
                with torch.no_grad():
                    old_values = critic(rollout["input_ids"], rollout["attention_mask"])[:, :-1]
            # 4.5 KL-shaped per-token rewards; GAE advantages, whitened over the batch of all ranks.
            rewards, kl = kl_shaped_rewards(scores, old_logprobs, ref_logprobs, mask, beta, args.kl_estimator)
            advantages, returns = gae_advantages(rewards, old_values, mask, args.gamma, args.lam)
            data = {k: rollout[k] for k in ("input_ids", "attention_mask", "response_mask")}
            data.update(old_logprobs=old_logprobs, old_values=old_values, returns=returns,
                        advantages=global_masked_whiten(advantages, mask))
            # 4.6 PPO epochs over shuffled minibatches; micro-batches weighted by response tokens.
            update_metrics = []
            for _ in range(args.ppo_epochs):
                order = torch.randperm(rank_batch).tolist()
                for first in range(0, rank_batch, rank_minibatch):
                    rows = order[first : first + rank_minibatch]
                    micro = [(part, select_rows(data, part)) for part in micro_batches(rows, args.micro_batch_size)]
                    if ptx is not None:  # InstructGPT's ptx term: random SFT examples beside each micro-batch
                        for part, batch in micro:
                            batch.update(ptx_batch(ptx, tokenizer.pad_token_id, len(part), device))
                    weights = data_parallel_weights([response_tokens(batch) for _, batch in micro])
                    metrics = {}
                    for k, ((ids, batch), weight) in enumerate(zip(micro, weights)):
                        with gradient_sync(dp_models, last=k == len(micro) - 1):  # ranks average gradients once
                            with precision.autocast():
                                loss, loss_metrics = ppo_loss(*dp_models, batch, args)
                            backward_weighted(loss, loss_metrics, weight, metrics, guard=guard, step=iteration,
                                              example_ids=ids, scaler=precision.scaler)
                    metrics.update(optimizer_step(models, optimizer, scheduler, args.max_grad_norm, guard=guard,
                                                  step=iteration, example_ids=rows, scaler=precision.scaler))
                    update_metrics.append(metrics)
            # 4.7 Adapt β to the measured KL per response (of all ranks: β stays the same on each); log.
            sequence_kl = mean_over_ranks(float(masked_sum(kl, mask) / len(scores)))
            if args.adaptive_kl:
                beta = adapt_kl_coef(beta, sequence_kl, args.target_kl, args.batch_size, args.kl_horizon)
            metrics = {**average(update_metrics), "reward": float(scores.mean()), "kl": sequence_kl,
                       "shaped_reward": float(masked_sum(rewards, mask) / len(scores)), "beta": beta,
                       **response_metrics(rollout)}
            if log_gold:
                metrics.update(gold_summary(gathered(rollout["prompts"]), gathered(rollout["responses"])))
            log.train(iteration + 1, metrics)
    if last == args.steps:
        save_model(critic, tokenizer, Path(args.out) / "critic")
    return final_path(args, policy, tokenizer, last, args.steps)


def main(argv=None):
    args = parse_args(PPOArgs, argv, prog="python -m minirlhf ppo")
    print(f"saved {train_ppo(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
