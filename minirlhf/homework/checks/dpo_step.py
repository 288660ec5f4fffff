"""Checks of the ``dpo_step`` exercise: ``pair_reference_logps`` and ``dpo_step`` (homework/steps.py),
on a tiny float64 Qwen2 model against brute force: each sequence alone, unpadded, full log-softmax."""
import torch
import torch.nn.functional as F

from minirlhf.homework.check import Check
from minirlhf.homework.checks.tiny_model import PAD, frozen, parameter_gradients, sgd, tiny_model, tiny_weights, weights_of

BETA, LR = 0.5, 0.5
# (prompt, chosen response, rejected response): token ids of the tiny vocabulary; 1 is EOS.
PAIRS = [([2, 3, 4], [5, 6, 1], [7, 1]), ([8, 9], [10, 11, 12, 1], [13, 14, 1]),
         ([3, 3, 5, 7], [2, 1], [9, 9, 9, 1]), ([6], [4, 4, 1], [5, 1])]


def examples():
    rows = []
    for prompt, chosen, rejected in PAIRS:
        rows.append({"chosen_input_ids": prompt + chosen, "chosen_response_mask": [0] * len(prompt) + [1] * len(chosen),
                     "rejected_input_ids": prompt + rejected,
                     "rejected_response_mask": [0] * len(prompt) + [1] * len(rejected)})
    return rows


def inputs():
    reference = tiny_weights(seed=0, scale=20.0)
    noise = tiny_weights(seed=1, scale=20.0)
    policy = {k: v + 0.3 * noise[k] for k, v in reference.items()}  # a policy that has moved
    return {"reference weights": reference, "policy weights": policy, "examples": examples(), "pad_id": PAD}


def brute_force_logps(model, ids, response_mask):
    """log π(y|x) of one unpadded sequence: Σ over response labels of log_softmax(logits[l − 1])[ids[l]]."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    logps = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logps[torch.tensor(response_mask[1:]).bool()].sum()


def brute_force_pairs(model, rows):
    chosen = torch.stack([brute_force_logps(model, r["chosen_input_ids"], r["chosen_response_mask"]) for r in rows])
    rejected = torch.stack([brute_force_logps(model, r["rejected_input_ids"], r["rejected_response_mask"]) for r in rows])
    return chosen, rejected


def reference_logps(f, x):
    reference = tiny_model(x["reference weights"])  # parameters that require grad: no_grad is the code's job
    chosen, rejected = f.pair_reference_logps(reference, x["examples"], x["pad_id"])
    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected,
            "no gradient": not chosen.requires_grad and not rejected.requires_grad}


def expect_reference_logps(x, got):
    with torch.no_grad():
        chosen, rejected = brute_force_pairs(tiny_model(x["reference weights"]), x["examples"])
    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected, "no gradient": True}


def cached_reference(x):
    with torch.no_grad():
        return brute_force_pairs(frozen(tiny_model(x["reference weights"])), x["examples"])


def one_step(f, x):
    policy = tiny_model(x["policy weights"])
    ref_chosen, ref_rejected = cached_reference(x)
    loss, metrics = f.dpo_step(policy, x["examples"], ref_chosen, ref_rejected, x["pad_id"], beta=BETA)
    return {"loss": loss, **{f"metrics[{k!r}]": v for k, v in metrics.items()},
            "parameter gradients": parameter_gradients(policy)}


def expect_one_step(x, got):
    """The step written out on unpadded rows; its gradient by autograd through that."""
    policy = tiny_model(x["policy weights"])
    ref_chosen, ref_rejected = cached_reference(x)
    chosen, rejected = brute_force_pairs(policy, x["examples"])
    chosen_rewards, rejected_rewards = BETA * (chosen - ref_chosen), BETA * (rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    loss.backward()
    margin = (chosen_rewards - rejected_rewards).detach()
    return {"loss": loss.detach(), "metrics['accuracy']": ((margin > 0).double() + 0.5 * (margin == 0).double()).mean(),
            "metrics['chosen_reward']": chosen_rewards.detach().mean(),
            "metrics['rejected_reward']": rejected_rewards.detach().mean(),
            "metrics['margin']": margin.mean(), "metrics['logps_chosen']": chosen.detach().mean(),
            "metrics['logps_rejected']": rejected.detach().mean(), "parameter gradients": parameter_gradients(policy)}


def three_steps(f, x):
    """Three SGD steps (lr 0.5) with the submission's step doing forward and backward."""
    policy = tiny_model(x["policy weights"])
    ref_chosen, ref_rejected = cached_reference(x)
    losses = []
    for _ in range(3):
        loss, _ = f.dpo_step(policy, x["examples"], ref_chosen, ref_rejected, x["pad_id"], beta=BETA)
        losses.append(float(loss))
        sgd(policy, LR)
    with torch.no_grad():
        chosen, rejected = brute_force_pairs(policy, x["examples"])
        final = -F.logsigmoid(BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    return {"losses": torch.tensor(losses, dtype=torch.float64), "loss after the three steps": final,
            "weights after the three steps": weights_of(policy)}


CHECKS = [
    Check("pair_reference_logps: summed log π_ref of 4 chosen and 4 rejected responses of different lengths, "
          "without gradient", inputs, reference_logps, expect_reference_logps,
          hint="collate_preference puts the chosen rows first: .chunk(2) splits chosen from rejected"),
    Check("dpo_step on a fixed batch: the loss and the six metrics", inputs, one_step,
          lambda x, got: {k: v for k, v in expect_one_step(x, got).items() if k != "parameter gradients"},
          hint="one forward over the [2B, L] batch; dpo_loss with the cached reference log-probs; .mean()"),
    Check("dpo_step on a fixed batch: the gradient of every parameter after backward", inputs, one_step,
          lambda x, got: {"parameter gradients": expect_one_step(x, got)["parameter gradients"]},
          hint="call loss.backward() once, on the mean loss over the pairs"),
    Check("three SGD steps (lr 0.5) with dpo_step: the loss falls along the reference's path, to the same weights",
          inputs, three_steps),
]
