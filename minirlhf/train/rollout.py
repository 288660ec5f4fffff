"""Rollouts: sample responses from the policy and lay them out as a training batch.

PPO, GRPO, RLOO and online DPO all start each iteration the same way: take a batch of prompts,
let the current policy write a response to each (``n_per_prompt`` of them for the group methods),
and hand the result to the loss as one ``[B, L]`` batch::

    input_ids       [B, L]  prompt (left-padded to P columns) ++ response (right-padded to N)
    attention_mask  [B, L]  1 = real token: the prompt's own tokens and the response up to EOS
    response_mask   [B, L]  1 = generated token up to *and including* the first EOS; 0 for the
                            prompt, left padding, and everything after the EOS

The sampling loop is written by hand (rather than ``model.generate``) so that every step is
visible: one forward pass over the prompts fills the KV cache, then each new token is a forward
pass over a single column that reads the cache. Position ids follow the repository convention
``attention_mask.cumsum(-1) - 1``, so a left-padded prompt samples exactly what it would unpadded.

The rest of this file is what the four online trainers share around their own update: the prompt
set they cycle through, their common setup (``start_online_run``: models, reward, optimizer,
resume, checkpoints), log-probs over a rollout in micro-batches, the toy world's gold reward for
logging, and the iteration loop with its logging and checkpoints.
"""
import dataclasses
import sys
import typing
from pathlib import Path

import torch

from minirlhf.models.forward import position_ids_from_attention_mask, response_logprobs
from minirlhf.models.policy import load_policy, load_tokenizer, make_reference
from minirlhf.train import common
from minirlhf.train.rewards import load_reward


def eos_token_ids(model, tokenizer):
    """The token ids that end a response.

    Chat models often stop on more than one token (Qwen2.5: ``<|im_end|>`` and ``<|endoftext|>``);
    the model's ``generation_config.eos_token_id`` (an int or a list) names them, and the
    tokenizer's ``eos_token_id`` is always included.
    """
    ids = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids.update([config_eos] if isinstance(config_eos, int) else config_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id and the model's generation_config names none")
    return sorted(ids)


@torch.no_grad()
def sample_responses(model, prompt_ids, prompt_mask, max_new_tokens, stop_ids, pad_token_id,
                     temperature=1.0, generator=None):
    """Sample up to ``max_new_tokens`` tokens per prompt with a KV cache.

    At each step ``y_t ~ softmax(logits_t / temperature)`` (``temperature=0`` is greedy argmax).

    Shapes: ``prompt_ids``, ``prompt_mask`` ``[B, P]``, left-padded. Returns
    ``(response_ids [B, N], response_mask [B, N])`` with ``N ≤ max_new_tokens`` (the loop stops
    once every row has produced a stop token). ``response_mask`` is 1 up to and including the
    first stop token of each row; later positions hold ``pad_token_id`` and mask 0. A row that
    never stops keeps all ``N`` tokens (its response was cut at the budget).
    """
    batch_size = prompt_ids.shape[0]
    attention_mask = prompt_mask.long()
    stop = torch.tensor(stop_ids, device=prompt_ids.device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=prompt_ids.device)
    tokens, alive = [], []

    # 1. Prefill: one pass over the prompts fills the cache and gives the first token's logits
    #    (only the last column's: at Qwen's 151,936-token vocabulary the others would cost GBs).
    outputs = model(input_ids=prompt_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_attention_mask(attention_mask), use_cache=True,
                    logits_to_keep=1)
    for _ in range(max_new_tokens):
        # 2. Sample the next token from the last position's distribution.
        logits = outputs.logits[:, -1, :].float()
        if temperature == 0:
            next_token = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        # 3. Rows that already stopped emit padding; the token that stops a row still counts.
        next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
        tokens.append(next_token)
        alive.append(~finished)
        finished = finished | torch.isin(next_token, stop)
        if bool(finished.all()):
            break
        # 4. Decode one column: the new token reads the cache; its position is the number of
        #    real tokens before it. Finished rows keep decoding padding that is thrown away.
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=-1)
        outputs = model(input_ids=next_token[:, None], attention_mask=attention_mask,
                        position_ids=attention_mask.sum(-1, keepdim=True) - 1,
                        past_key_values=outputs.past_key_values, use_cache=True)
    return torch.stack(tokens, dim=1), torch.stack(alive, dim=1).long()


@torch.no_grad()
def generate_rollouts(model, tokenizer, prompt_batch, max_new_tokens, n_per_prompt=1, temperature=1.0,
                      generator=None):
    """Sample ``n_per_prompt`` responses to each prompt and return them as one training batch.

    ``prompt_batch``: ``input_ids``, ``attention_mask`` ``[B0, P]`` (left-padded, as
    ``collate_prompts`` makes them), and optionally lists ``prompts`` (texts) and ``answers``.
    Each prompt is repeated ``n_per_prompt`` times *consecutively*, so rows
    ``g·G … g·G + G − 1`` answer prompt ``g`` (the layout ``group_advantages`` expects).
    Returns a dict with ``B = B0 · n_per_prompt`` rows:

    - ``input_ids``, ``attention_mask``, ``response_mask``: ``[B, L]``, ``L = P + N`` (module
      docstring);
    - ``responses``: the decoded response texts (special tokens such as EOS dropped);
    - ``ended`` ``[B]`` bool: the response stopped with EOS (False = cut at the budget);
    - ``response_length`` ``[B]``: number of response tokens, EOS included;
    - ``prompts``, ``answers`` (when given) and ``prompt_index`` ``[B]``, repeated per row.

    The model samples in eval mode (no dropout) and is put back in its previous mode.
    """
    was_training = model.training
    model.eval()
    prompt_ids = prompt_batch["input_ids"].repeat_interleave(n_per_prompt, dim=0)
    prompt_mask = prompt_batch["attention_mask"].long().repeat_interleave(n_per_prompt, dim=0)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = eos_token_ids(model, tokenizer)
    response_ids, response_valid = sample_responses(
        model, prompt_ids, prompt_mask, max_new_tokens, stop_ids, pad_token_id, temperature, generator
    )
    model.train(was_training)

    is_stop = torch.isin(response_ids, torch.tensor(stop_ids, device=response_ids.device))
    response_length = response_valid.sum(-1)
    rollout = {
        "input_ids": torch.cat([prompt_ids, response_ids], dim=1),
        "attention_mask": torch.cat([prompt_mask, response_valid], dim=1),
        "response_mask": torch.cat([torch.zeros_like(prompt_mask), response_valid], dim=1),
        "responses": tokenizer.batch_decode(
            [row[:n].tolist() for row, n in zip(response_ids, response_length.tolist())],
            skip_special_tokens=True,
        ),
        "ended": (is_stop & response_valid.bool()).any(dim=-1),
        "response_length": response_length,
        "prompt_index": torch.arange(len(prompt_ids), device=prompt_ids.device) // n_per_prompt,
    }
    for key in ("prompts", "answers"):
        if prompt_batch.get(key) is not None:
            rollout[key] = [value for value in prompt_batch[key] for _ in range(n_per_prompt)]
    return rollout


# ---------------------------------------------------------------------------------------------
# What the online trainers share around their update
# ---------------------------------------------------------------------------------------------


def prompt_text(prompt):
    """The user's request as text: the string itself, or the last user turn of a message list."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


class PromptSet:
    """The prompts an online trainer cycles through, ``batch_size`` per iteration.

    Iteration ``i`` uses the prompts ``BatchSchedule(n, batch_size, seed).batch(i)`` (each pass
    over the file in a fresh seeded order), so the prompts of an iteration depend only on
    ``(seed, i)`` and ``--resume`` continues exactly. ``is_toy`` says whether every prompt is a
    toy-world prompt, i.e. whether the gold reward can be logged.
    """

    def __init__(self, path, tokenizer, template, batch_size, seed, max_prompt_len, system_prompt=None):
        from minirlhf.data import load_prompt_data

        self.examples, report = load_prompt_data(path, template, tokenizer, max_prompt_len, system_prompt)
        print(report, file=sys.stderr)
        self.pad_id = tokenizer.pad_token_id
        self.schedule = common.BatchSchedule(len(self.examples), batch_size, 1.0, seed)
        self.is_toy = all(_is_toy_prompt(prompt_text(e["prompt"])) for e in self.examples)

    def batch(self, iteration, device):
        """Iteration ``iteration``'s prompts: ``input_ids``, ``attention_mask`` ``[B0, P]``
        (left-padded), ``prompts`` (the user requests as text) and ``answers`` (or None each)."""
        return prompt_batch([self.examples[i] for i in self.schedule.batch(iteration)], self.pad_id, device)


def prompt_batch(examples, pad_id, device):
    """Prompt examples (``load_prompt_data``) as one batch for ``generate_rollouts``:
    ``input_ids``, ``attention_mask`` ``[B0, P]`` (left-padded), ``prompts`` (the user requests as
    text) and ``answers`` (or None each), on ``device``."""
    from minirlhf.data import collate_prompts

    batch = collate_prompts(examples, pad_id)
    batch["prompts"] = [prompt_text(p) for p in batch.pop("prompt")]
    batch["answers"] = batch.pop("answer")
    return common.to_device(batch, device)


def _is_toy_prompt(text):
    from minirlhf.toy.language import parse_prompt

    try:
        parse_prompt(text)
        return True
    except ValueError:
        return False


def select_rows(batch, rows):
    """The rows ``rows`` (a list or long tensor) of every ``[B, ...]`` tensor in ``batch``."""
    rows = torch.as_tensor(rows)
    return {k: v[rows.to(v.device)] for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 0}


@torch.no_grad()
def rollout_logprobs(model, rollout, micro_batch_size=0, temperature=1.0):
    """``log π(y_t | x, y_<t)`` of a rollout's tokens under ``model``, without gradient.

    Runs ``response_logprobs`` over micro-batches of ``micro_batch_size`` rows (0 = all at once)
    and concatenates. Returns ``(token_logprobs, mask)``, both ``[B, T]``.
    """
    chunks = []
    for rows in common.micro_batches(list(range(len(rollout["input_ids"]))), micro_batch_size):
        part = select_rows(rollout, rows)
        chunks.append(response_logprobs(model, part["input_ids"], part["attention_mask"],
                                        part["response_mask"], temperature=temperature))
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])


@dataclasses.dataclass
class OnlineRun:
    """What an online trainer holds for its whole run; ``start_online_run`` builds it.

    ``policy`` is trained (loaded from ``resume_from`` when resuming); ``reference`` is a frozen
    copy of ``args.model``; ``reward_fn(rollout)`` returns one score per response ``[B]``;
    ``prompts`` gives each iteration's prompts. ``optimizer``, ``scheduler`` and ``start`` (the
    iterations already done) are set by ``make_optimizer``.
    """

    args: typing.Any
    device: torch.device
    resume_from: typing.Optional[Path]
    tokenizer: typing.Any
    policy: torch.nn.Module
    reference: torch.nn.Module
    reward_fn: typing.Callable
    prompts: PromptSet
    optimizer: typing.Optional[torch.optim.Optimizer] = None
    scheduler: typing.Any = None
    start: int = 0

    def make_optimizer(self, models, updates_per_iteration=1):
        """One AdamW over ``models``' parameters (the policy, plus PPO's critic) and a schedule over
        ``args.steps · updates_per_iteration`` optimizer steps. When resuming, restores their
        states and the RNGs and sets ``start``; returns the checkpoint's ``extra`` (``{}`` if none).
        """
        args = self.args
        self.optimizer = common.make_optimizer(models.parameters(), args.lr, args.weight_decay)
        self.scheduler = common.make_scheduler(self.optimizer, args.steps * updates_per_iteration,
                                               args.warmup_ratio, args.lr_schedule)
        if self.resume_from is None:
            return {}
        state = common.load_training_state(self.resume_from, self.optimizer, self.scheduler)
        self.start = state["step"]
        return state.get("extra") or {}

    def save_checkpoint(self, done, extra=None):
        """Checkpoint ``out/checkpoints/step-{done}``: policy, tokenizer, optimizer, scheduler and
        ``extra`` (what else the trainer needs to resume, e.g. PPO's critic). Returns its path."""
        return common.save_checkpoint(self.args.out, done, self.policy, self.tokenizer,
                                      self.optimizer, self.scheduler, extra)

    def policy_and_reference_logprobs(self, rollout, temperature=1.0):
        """``log π_old`` (the policy as it sampled) and ``log π_ref`` of the rollout's tokens, no
        gradient, in micro-batches of ``args.micro_batch_size``. Returns
        ``(old_logprobs, ref_logprobs, mask)``, all ``[B, T]``."""
        old_logprobs, mask = rollout_logprobs(self.policy, rollout, self.args.micro_batch_size, temperature)
        ref_logprobs, _ = rollout_logprobs(self.reference, rollout, self.args.micro_batch_size, temperature)
        return old_logprobs, ref_logprobs, mask


def start_online_run(args, algo):
    """The setup every online trainer shares, after it has filled in its defaults.

    Prepares the run directory (``args.json``, seed, the checkpoint to resume from), then loads
    the tokenizer, the frozen reference π_ref (``args.model``), the policy π_θ (from the checkpoint
    when resuming, else ``args.model``), the reward ``args.reward`` and the prompts
    ``args.data``. Returns an ``OnlineRun``; call its ``make_optimizer`` next.
    """
    args.template = args.template or "prompt"  # online trainers read prompt-only data
    resume_from = common.prepare_run(args, algo)
    device = common.select_device(args.device)
    tokenizer = load_tokenizer(args.model)
    reference = make_reference(load_policy(args.model, dtype=common.TRAIN_DTYPE, device=device))
    policy = load_policy(str(resume_from or args.model), dtype=common.TRAIN_DTYPE, device=device)
    reward_fn = load_reward(args.reward, device=device)
    prompts = PromptSet(args.data, tokenizer, args.template, args.batch_size, args.seed,
                        args.max_prompt_len, args.system_prompt)
    return OnlineRun(args, device, resume_from, tokenizer, policy, reference, reward_fn, prompts)


def gold_metrics(rollout):
    """Toy world only: mean gold reward r*(x, y), its helpful/harmless parts, and math accuracy.

    Math accuracy averages ``math_correct`` over the rollout's math prompts (absent when there are
    none). Not used for training: it is the truth the proxy reward is measured against.
    """
    from minirlhf.toy.language import gold_reward, harmless_score, helpful_score, math_correct, parse_prompt

    pairs = list(zip(rollout["prompts"], rollout["responses"]))
    n = len(pairs)
    metrics = {
        "gold": sum(gold_reward(p, r) for p, r in pairs) / n,
        "gold_helpful": sum(helpful_score(p, r) for p, r in pairs) / n,
        "gold_harmless": sum(harmless_score(p, r) for p, r in pairs) / n,
    }
    math_pairs = [(p, r) for p, r in pairs if parse_prompt(p).kind == "math"]
    if math_pairs:
        metrics["math_accuracy"] = sum(math_correct(p, r) for p, r in math_pairs) / len(math_pairs)
    return metrics


def response_metrics(rollout):
    """Length statistics of a rollout: mean response length (tokens) and fraction ended by EOS."""
    return {
        "response_length": float(rollout["response_length"].float().mean()),
        "ended_fraction": float(rollout["ended"].float().mean()),
    }


def run_iterations(args, *, total, start, one_iteration, save_checkpoint, desc):
    """The outer loop of an online trainer: ``metrics = one_iteration(i)`` for each iteration.

    Iterations ``start … last − 1`` run, ``last = min(total, args.stop_at_step)`` (0 = no stop).
    After each: log the metrics (``out/train.csv``, TensorBoard, tqdm postfix) every
    ``args.log_every`` iterations, and call ``save_checkpoint(iterations_done)`` every
    ``args.save_every`` iterations and once at the end. Returns the number of iterations done.
    """
    last = min(total, args.stop_at_step) if args.stop_at_step > 0 else total
    logger = common.MetricsLogger(args.out, start, tensorboard=args.tensorboard)
    bar = common.progress_bar(total, initial=start, desc=desc, enabled=args.progress)
    done = saved = start
    try:
        for iteration in range(start, last):
            metrics = one_iteration(iteration)
            done = iteration + 1
            if done % max(1, args.log_every) == 0 or done == last:
                logger.log(done, metrics)
                bar.set_postfix(common.postfix(metrics), refresh=False)
            bar.update(1)
            if args.save_every > 0 and done % args.save_every == 0:
                save_checkpoint(done)
                saved = done
        if saved != done or done == start:
            save_checkpoint(done)
    finally:
        bar.close()
        logger.close()
    return done


def final_path(args, total, done, policy, tokenizer):
    """What ``train_<algo>`` returns: ``out/final`` (the policy, HF-loadable) once all ``total``
    iterations are done, else the latest checkpoint (stopped early with ``--stop-at-step``)."""
    if done < total:
        return common.latest_checkpoint(args.out)
    return common.save_model(policy, tokenizer, Path(args.out) / "final")
