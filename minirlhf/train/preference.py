"""What DPO and KTO share: summed log-probs, π_ref's log-probs computed once, pair batches and
their implicit-reward metrics.

- **Reference log-probs once.** π_ref never changes, so log π_ref(y|x) of every training (and test)
  response is computed in one pass before training and cached per example (and saved in
  ``<out>/reference_logps.pt`` for ``--resume``); the reference model is then freed, so training
  holds one model. Reference-free losses (SimPO, ORPO) skip this.
- **One forward per pair batch.** Chosen and rejected rows are concatenated into one ``[2B, L]``
  batch (``collate_preference``); logits are computed only from the first response token on.
- **Implicit rewards.** β·(log π(y|x) − log π_ref(y|x)) of the chosen and the rejected response:
  their accuracy (ties ½) and margin are what to watch, with both summed log-probs.
"""
import math
import sys
from pathlib import Path

import torch

from minirlhf.core.dpo_losses import dpo_loss
from minirlhf.core.logprobs import sequence_logprobs
from minirlhf.core.reward_losses import pair_accuracy
from minirlhf.data.atomic import atomic_file
from minirlhf.data.collate import collate_preference, collate_sft, to_device
from minirlhf.models.forward import response_logprobs
from minirlhf.train.distributed import gathered, is_main, rank_range
from minirlhf.train.levers import reference_policy
from minirlhf.train.precision import Precision

# The toy world's ~1M-parameter SFT policy, for DPO and KTO alike (applied to the fields not set
# explicitly when no --model is given). A larger β than usual: with β = 0.1 both log-probs fall
# fast, responses double in length (the planted length bias) and the gold reward drops — a small
# β invites over-optimisation.
TOY_PRESET = dict(lr=1e-4, beta=0.5, batch_size=32, epochs=1.0, max_len=64, max_prompt_len=32, eval_every=25)


def sequence_logps(model, batch, logprobs=response_logprobs):
    """``(log π(y|x) [N], |y| [N])``: summed response log-probs and response lengths of a batch
    (one forward, logits from the first response token on; ``logprobs``: ``response_logprobs`` or
    ``fused_response_logprobs``, see ``levers.policy_logprobs``)."""
    token_logps, mask = logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    return sequence_logprobs(token_logps, mask), mask.sum(-1).float()


def pair_rows(examples):
    """Preference examples -> rows ``[chosen_0..chosen_{N-1}, rejected_0..rejected_{N-1}]``."""
    return [{"input_ids": e["chosen_input_ids"], "response_mask": e["chosen_response_mask"]} for e in examples] + [
        {"input_ids": e["rejected_input_ids"], "response_mask": e["rejected_response_mask"]} for e in examples
    ]


@torch.no_grad()
def reference_logps(model, rows, pad_id, batch_size, device, precision=None):
    """Summed log π_ref(y|x) of ``rows`` (dicts with ``input_ids``/``response_mask`` lists), ``[N]``
    float32 on the CPU: computed once, before training, ``batch_size`` rows per forward, under
    ``precision``'s autocast (default: ``--precision auto``'s). Under torchrun each rank computes its
    part of the batches and every rank receives all of them."""
    model.eval()
    out = []
    for k in rank_range(math.ceil(len(rows) / batch_size)):
        batch = to_device(collate_sft(rows[k * batch_size : (k + 1) * batch_size], pad_id), device)
        with (precision or Precision("auto", device)).autocast():
            out.append(sequence_logps(model, batch)[0].float().cpu())
    out = gathered(out)
    return torch.cat(out) if out else torch.zeros(0)


def cached_reference_logps(args, resume_from, rows, pad_id, precision, policy):
    """``{split: log π_ref [N]}`` for the ``rows`` of each split: read back from
    ``<out>/reference_logps.pt`` when resuming, else computed with π_ref (``levers.reference_policy``:
    with LoRA ``policy``'s base model, else ``args.ref_model`` or ``args.model`` in the compute
    dtype, freed afterwards), ``--micro-batch-size`` rows per forward, and saved there atomically
    (by rank 0). A cache that does not load or does not match the rows (one float per row, finite)
    is computed again, with a warning."""
    cache = Path(args.out) / "reference_logps.pt"
    if resume_from and cache.exists():
        problem = None
        try:
            ref = torch.load(cache, map_location="cpu", weights_only=True)
            sizes = {split: len(split_rows) for split, split_rows in rows.items()}
            if not isinstance(ref, dict) or {k: v.shape for k, v in ref.items()} != {k: (n,) for k, n in sizes.items()}:
                problem = f"it does not hold one log-prob per example of {sizes}"
            elif not all(torch.isfinite(v).all() for v in ref.values()):
                problem = "it holds NaN/inf"
        except Exception as err:  # a damaged file raises anything from OSError to UnpicklingError
            problem = f"{type(err).__name__}: {str(err)[:100]}"
        if problem is None:
            return ref
        print(f"warning: {cache} is unusable ({problem}); computing the reference log-probs again", file=sys.stderr)
    reference = reference_policy(args, policy, precision.device, precision.dtype)
    rows_per_pass = args.micro_batch_size or args.batch_size
    ref = {split: reference_logps(reference, split_rows, pad_id, rows_per_pass, precision.device, precision)
           for split, split_rows in rows.items()}
    del reference
    if is_main():
        with atomic_file(cache, "wb") as f:
            torch.save(ref, f)
    return ref


def pair_batch(examples, ids, pad_id, device, ref=None):
    """Pairs ``ids`` of ``examples`` as one ``[2b, L]`` chosen+rejected batch on ``device``, with
    their cached ``ref_chosen_logps``/``ref_rejected_logps`` ``[b]`` when ``ref`` (the split's
    ``[2N]`` reference log-probs, chosen then rejected) is given."""
    batch = collate_preference([examples[i] for i in ids], pad_id)
    if ref is not None:
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref.view(2, -1).T[ids].T
    return to_device(batch, device)


def implicit_reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    """What to watch on a pair batch: implicit-reward accuracy (ties ½), chosen and rejected
    rewards and their margin, and both summed log-probs (both fall while the margin grows)."""
    return {
        "accuracy": pair_accuracy(chosen_rewards, rejected_rewards),
        "chosen_reward": chosen_rewards.mean(),
        "rejected_reward": rejected_rewards.mean(),
        "margin": (chosen_rewards - rejected_rewards).mean(),
        "logps_chosen": chosen_logps.detach().mean(),
        "logps_rejected": rejected_logps.detach().mean(),
    }


def sigmoid_dpo_metrics(model, batch, beta):
    """``(loss, implicit_reward_metrics)`` of plain sigmoid DPO on a chosen+rejected batch with
    cached reference log-probs (how KTO's policy is judged on preference pairs)."""
    logps, _ = sequence_logps(model, batch)
    chosen_logps, rejected_logps = logps.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen_logps, rejected_logps, batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta, "sigmoid")
    return losses.mean(), implicit_reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
