"""PPO for RLHF (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022): a policy, a critic,
a reward model, and a frozen reference that the policy is kept close to.

The objective is the KL-regularised reward, maximised with per-token credit assignment::

    max_θ  E_{x, y~π_θ} [ r_φ(x, y) ] − β · KL(π_θ(·|x) ‖ π_ref(·|x))

Each iteration:

1. **Rollout.** Sample one response per prompt from π_θ (KV-cached sampling, ``rollout.py``).
2. **Score.** The reward model gives one scalar ``r_φ(x, y)`` per response (the *proxy* reward);
   in the toy world the *gold* reward r*(x, y) is logged next to it, never trained on.
3. **Log-probs and values of the rollout** under π_θ (= π_old), π_ref and the critic V_ψ.
4. **KL-shaped rewards.** ``r_t = −β·kl_t`` on every response token, plus ``r_φ(x, y)`` on the
   last one (``kl_shaped_rewards``; ``kl_t = log π_old − log π_ref``, estimator k1, by default).
5. **Advantages.** GAE over the response tokens (``gae_advantages``), then whitened over the
   batch (``masked_whiten``): PPO's step size should not depend on the reward model's scale.
6. **Update.** ``ppo_epochs`` passes over the rollout in shuffled minibatches; each minimises
   ``L = L_clip(π_θ) + c_v · L_value(V_ψ) − c_H · H(π_θ) [+ c_ptx · NLL_SFT(π_θ)]``
   (``ppo_policy_loss``, ``ppo_value_loss``; entropy bonus; the optional ptx term of InstructGPT
   keeps the policy fluent on demonstration data).
7. **KL controller** (optional, Ziegler et al.): ``β ← β·(1 + K·e)``,
   ``e = clip(KL/KL_target − 1, ±0.2)``, ``K = batch_size / horizon``.

**The critic** is initialised from the reward model when the reward is a reward model
(``--critic-init reward_model``, as InstructGPT: its head already predicts something like the final
score), else from the policy's backbone with a fresh head. It is a separate network from the
policy; both are updated by one AdamW at the same learning rate.

**Over-optimisation.** The reward model is a proxy. Pushed with a small β, PPO finds what the proxy
pays for and the truth does not (in the toy world: filler words, a planted length bias): the
proxy score rises while the gold reward falls (Gao et al. 2023). ``out/train.csv`` logs ``reward``
(proxy), ``gold`` and ``kl``; ``minirlhf.eval.overoptimisation`` plots them.

    python -m minirlhf ppo --reward runs/rm/final                 # toy world, toy SFT policy
    python -m minirlhf ppo --model Qwen/Qwen2.5-0.5B-Instruct --reward RM_DIR --data prompts.jsonl \\
        --template prompt --lr 1e-6 --max-new-tokens 128 --batch-size 64 --minibatch-size 16

From Python: ``train_ppo(PPOArgs(reward=..., out=...))`` returns the saved policy directory.
"""
import dataclasses
import sys
import typing
from pathlib import Path

import torch

from minirlhf.core.gae import gae_advantages
from minirlhf.core.kl import kl_shaped_rewards
from minirlhf.core.masked import masked_mean, masked_whiten, masked_sum
from minirlhf.core.ppo_losses import ppo_policy_loss, ppo_value_loss
from minirlhf.errors import MinirlhfError
from minirlhf.models.forward import response_logprobs
from minirlhf.models.value_model import ValueModel
from minirlhf.train import common
from minirlhf.train.rewards import RewardModelReward
from minirlhf.train.rollout import (
    final_path, generate_rollouts, gold_metrics, response_metrics, run_iterations, select_rows, start_online_run,
)


@dataclasses.dataclass
class PPOArgs(common.TrainArgs):
    """PPO with a value model and KL-shaped per-token rewards."""

    reward: typing.Optional[str] = None
    """The reward: a reward-model directory (from `python -m minirlhf rm`) or a rule name
    (math, gold). Default: gold on the toy world's prompts; required with --data."""
    steps: int = 40
    """PPO iterations (rollout + update); prompts are cycled through in seeded order."""
    batch_size: int = 32
    """Prompts (= responses) per rollout."""
    minibatch_size: int = 16
    """Responses per optimizer step; batch_size / minibatch_size steps per PPO epoch."""
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


class AdaptiveKLController:
    """Ziegler et al. (2019): ``β ← β·(1 + K·e)`` with ``e = clip(KL/KL_target − 1, −0.2, 0.2)``
    and ``K = n / horizon`` for ``n`` responses seen this update."""

    def __init__(self, beta, target, horizon):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n):
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n / self.horizon


def ppo_loss(policy, critic, batch, args):
    """The loss of one micro-batch of a rollout; returns ``(loss, metrics)``.

    ``batch``: ``input_ids``, ``attention_mask``, ``response_mask`` ``[B, L]`` and the rollout's
    ``old_logprobs``, ``old_values``, ``advantages``, ``returns`` ``[B, T]`` (plus ``ptx_*``
    tensors for the ptx term). All token means are over the micro-batch's response tokens.
    """
    logprobs, mask, entropy = response_logprobs(
        policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
        temperature=args.temperature, return_entropy=True,
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
        ptx_logprobs, ptx_mask = response_logprobs(
            policy, batch["ptx_input_ids"], batch["ptx_attention_mask"], batch["ptx_response_mask"]
        )
        ptx_loss = masked_mean(-ptx_logprobs, ptx_mask)
        loss = loss + args.ptx_coef * ptx_loss
        metrics["ptx_loss"] = ptx_loss.detach()
    return loss, metrics


def train_ppo(args: PPOArgs):
    """Run PPO with ``args``; returns the saved policy directory (``<out>/final``, HF-loadable;
    the critic is saved next to it in ``<out>/critic``)."""
    # 1. Defaults (the toy world's SFT policy, prompts and gold reward).
    world = common.toy_world() if args.model is None or args.data is None else None
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

    # 2. Run directory and seed; tokenizer, policy (from the checkpoint when resuming), frozen
    #    reference, reward, prompts; the critic and the ptx data.
    run = start_online_run(args, "ppo")
    policy, tokenizer, device = run.policy, run.tokenizer, run.device
    if args.critic_init == "reward_model" and isinstance(run.reward_fn, RewardModelReward):
        critic = ValueModel.from_pretrained(args.reward, dtype=common.TRAIN_DTYPE, device=device)
    else:
        critic = ValueModel.from_causal_lm(args.model, dtype=common.TRAIN_DTYPE, device=device, seed=args.seed)
    ptx = _ptx_examples(args, tokenizer) if args.ptx_coef > 0 else None

    # 3. One optimizer over policy and critic; the schedule counts optimizer steps. A checkpoint
    #    also holds the critic and the KL controller's β.
    if args.batch_size % args.minibatch_size:
        raise MinirlhfError(f"--batch-size {args.batch_size} must be a multiple of --minibatch-size {args.minibatch_size}")
    models = torch.nn.ModuleDict({"policy": policy, "critic": critic})
    extra = run.make_optimizer(models, updates_per_iteration=args.ppo_epochs * args.batch_size // args.minibatch_size)
    kl_controller = AdaptiveKLController(args.beta, args.target_kl, args.kl_horizon)
    if run.resume_from:
        critic.load_state_dict(extra["critic"])
        kl_controller.beta = extra["beta"]

    def save_checkpoint(done):
        return run.save_checkpoint(done, {"critic": critic.state_dict(), "beta": kl_controller.beta})

    def one_iteration(iteration):
        # A NaN/inf stops the run with a checkpoint of the weights before the failing step.
        guard = common.DivergenceGuard(lambda: save_checkpoint(iteration))
        # 1. Rollout: one response per prompt from the current policy.
        prompt_batch = run.prompts.batch(iteration, device)
        with common.autocast(device):
            rollout = generate_rollouts(policy, tokenizer, prompt_batch, args.max_new_tokens,
                                        temperature=args.temperature)
            # 2. Score with the reward (proxy); 3. log-probs under π_old and π_ref, values.
            scores = run.reward_fn(rollout)
            old_logprobs, ref_logprobs, mask = run.policy_and_reference_logprobs(rollout, args.temperature)
            with torch.no_grad():
                old_values = critic(rollout["input_ids"], rollout["attention_mask"])[:, :-1]
        # 4. KL-shaped per-token rewards; 5. GAE advantages, whitened over the batch.
        rewards, kl = kl_shaped_rewards(scores, old_logprobs, ref_logprobs, mask, kl_controller.beta, args.kl_estimator)
        advantages, returns = gae_advantages(rewards, old_values, mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, mask)
        data = {k: rollout[k] for k in ("input_ids", "attention_mask", "response_mask")}
        data.update({"old_logprobs": old_logprobs, "old_values": old_values,
                     "advantages": advantages, "returns": returns})

        # 6. PPO epochs over shuffled minibatches, gradient accumulation over micro-batches
        #    weighted by their share of the minibatch's response tokens (token-mean losses).
        update_metrics = []
        for _ in range(args.ppo_epochs):
            order = torch.randperm(args.batch_size).tolist()
            for start_row in range(0, args.batch_size, args.minibatch_size):
                rows = order[start_row : start_row + args.minibatch_size]
                micro = []
                for part in common.micro_batches(rows, args.micro_batch_size):
                    batch = select_rows(data, part)
                    if ptx is not None:
                        batch.update(_ptx_batch(ptx, tokenizer, len(part), device))
                    micro.append((part, batch))
                tokens = [float(b["response_mask"].sum()) for _, b in micro]
                weights = [n / sum(tokens) for n in tokens]
                metrics = common.accumulate_gradients(
                    micro, lambda b: ppo_loss(policy, critic, b, args), weights,
                    device=device, guard=guard, step=iteration,
                )
                metrics.update(common.optimizer_step(models, run.optimizer, run.scheduler, args.max_grad_norm,
                                                     guard=guard, step=iteration, example_ids=rows))
                update_metrics.append(metrics)

        # 7. Adapt β to the measured KL per response; log what happened.
        sequence_kl = float(masked_sum(kl, mask) / len(scores))
        if args.adaptive_kl:
            kl_controller.update(sequence_kl, args.batch_size)
        metrics = {k: sum(m[k] for m in update_metrics) / len(update_metrics) for k in update_metrics[0]}
        metrics.update({
            "reward": float(scores.mean()),
            "kl": sequence_kl,
            "shaped_reward": float(masked_sum(rewards, mask) / len(scores)),
            "beta": kl_controller.beta,
            **response_metrics(rollout),
        })
        if run.prompts.is_toy:
            metrics.update(gold_metrics(rollout))
        return metrics

    policy.train()
    critic.train()
    done = run_iterations(args, total=args.steps, start=run.start, one_iteration=one_iteration,
                          save_checkpoint=save_checkpoint, desc="ppo")
    if done == args.steps:
        common.write_dir_atomic(Path(args.out) / "critic", lambda tmp: critic.save_pretrained(tmp, tokenizer))
    return final_path(args, args.steps, done, policy, tokenizer)


def _ptx_examples(args, tokenizer):
    from minirlhf.data import load_sft_data

    examples, _ = load_sft_data(args.ptx_data, args.ptx_template or "sft", tokenizer, args.max_len,
                                args.max_prompt_len, args.system_prompt)
    return examples


def _ptx_batch(examples, tokenizer, n, device):
    """``n`` random SFT examples for the ptx term, as ``ptx_``-prefixed tensors."""
    from minirlhf.data import collate_sft

    rows = torch.randint(len(examples), (n,)).tolist()
    batch = common.to_device(collate_sft([examples[i] for i in rows], tokenizer.pad_token_id), device)
    return {f"ptx_{k}": batch[k] for k in ("input_ids", "attention_mask", "response_mask")}


def main(argv=None):
    args = common.parse_args(PPOArgs, argv, prog="python -m minirlhf ppo")
    print(f"saved {train_ppo(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
