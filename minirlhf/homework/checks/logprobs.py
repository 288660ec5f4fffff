"""Checks of the ``logprobs`` exercise: ``shift_for_next_token``, ``gather_logprobs`` (its forward
``_chunk_logprobs``) and ``sequence_logprobs`` (core/logprobs.py)."""
import torch

from minirlhf.homework.check import Check, gradients, leaves, random

NAN, INF = float("nan"), float("inf")
FLOAT32 = {"logprobs": dict(rtol=1e-6, atol=2e-6)}  # float32 inputs: float32 accuracy, no more
HALF = {"logprobs": dict(rtol=1e-6, atol=1e-5)}  # half inputs: float32 accuracy on the rounded values


def labels(batch, length, vocab, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def brute_force(x, got):
    """A full float64 log-softmax, then pick the label."""
    logprobs = torch.log_softmax(x["logits"].double(), -1).gather(-1, x["labels"].unsqueeze(-1)).squeeze(-1)
    return {"logprobs": logprobs, "dtype": "torch.float64" if x["logits"].dtype == torch.float64 else "torch.float32"}


def gather(f, x):
    logprobs = f.gather_logprobs(x["logits"], x["labels"])
    return {"logprobs": logprobs, "dtype": str(logprobs.dtype)}


def gather_backward(f, x):
    inputs = leaves(x, ["logits"])
    logprobs = f.gather_logprobs(x["logits"], x["labels"])
    grads = gradients({"logprobs": logprobs}, {"logprobs": x["w"]}, inputs)
    grad = grads["∂L/∂logits"]
    return grads | {"gradient dtype": None if grad is None else str(grad.dtype)}


def analytic_backward(x, got):
    """∂/∂z_j of Σ w · log softmax(z)_y = w · (1[j = y] − softmax(z)_j)."""
    logits = x["logits"]
    onehot = torch.nn.functional.one_hot(x["labels"], logits.shape[-1]).double()
    grad = x["w"].double().unsqueeze(-1) * (onehot - torch.softmax(logits.double(), -1))
    return {"∂L/∂logits": grad, "gradient dtype": str(logits.dtype)}


def logits_case(vocab, dtype, seed=0, batch=3, length=6):
    return lambda: {"logits": random(batch, length, vocab, seed=seed, scale=3.0, dtype=dtype),
                    "labels": labels(batch, length, vocab)}


def backward_case(dtype):
    return lambda: {"logits": random(3, 4, 11, seed=0, scale=3.0, dtype=dtype), "labels": labels(3, 4, 11),
                    "w": random(3, 4, seed=2, dtype=torch.float32)}


TOKENS = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
GARBAGE = torch.tensor([[-1.0, -INF, NAN], [-2.0, -3.0, -INF]])

CHECKS = [
    Check("shift: 'a b c' with prompt 'a': logits[:, l] predict input_ids[:, l + 1], the mask follows the labels",
          lambda: {"input_ids": torch.tensor([[5, 6, 7]]), "response_mask": torch.tensor([[0, 1, 1]]),
                   "logits": torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)},
          run=lambda f, x: dict(zip(("logits", "labels", "mask"),
                                    f.shift_for_next_token(x["logits"], x["input_ids"], x["response_mask"]))),
          expect=lambda x, got: {"logits": x["logits"][:, :2], "labels": torch.tensor([[6, 7]]),
                                 "mask": torch.tensor([[1, 1]])},
          hint="the last logit predicts nothing in the sequence; the first token is predicted by nothing"),
    Check("shift: two rows, left- and right-padded, V = 5",
          lambda: {"input_ids": torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 0]]),
                   "response_mask": torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]),
                   "logits": random(2, 5, 5, seed=3)},
          run=lambda f, x: dict(zip(("logits", "labels", "mask"),
                                    f.shift_for_next_token(x["logits"], x["input_ids"], x["response_mask"]))),
          expect=lambda x, got: {"logits": x["logits"][:, :-1], "labels": x["input_ids"][:, 1:],
                                 "mask": x["response_mask"][:, 1:]}),
    *[Check(f"gather_logprobs, float32 logits, V = {vocab}: the brute-force float64 log_softmax",
            logits_case(vocab, torch.float32), gather, brute_force, tol=FLOAT32,
            hint="subtract the row's max before exp: exp of a large logit overflows")
      for vocab in (1, 3, 1000)],
    *[Check(f"gather_logprobs, {str(dtype)[6:]} logits (V = 5000): float32 log-probs, accurate to float32",
            logits_case(5000, dtype), gather, lambda x, got: brute_force(x, got) | {"dtype": "torch.float32"},
            tol=HALF, hint="the chunk arrives upcast to float32: keep the arithmetic in its dtype")
      for dtype in (torch.bfloat16, torch.float16)],
    Check("gather_logprobs, float64 logits (V = 7): float64 log-probs", logits_case(7, torch.float64, batch=2, length=5),
          gather, brute_force),
    *[Check(f"gather_logprobs backward, {str(dtype)[6:]} logits: ∂/∂z_j = w · (1[j = y] − softmax(z)_j)",
            backward_case(dtype), gather_backward, analytic_backward,
            tol={"∂L/∂logits": dict(rtol=1e-5, atol=1e-6)})
      for dtype in (torch.float32, torch.float64)],
    Check("gather_logprobs: huge logits (1e4) do not overflow",
          lambda: {"logits": torch.tensor([[[1e4, 1e4 - 1, 0.0], [-1e4, 0.0, 1e4]]], dtype=torch.float64),
                   "labels": torch.tensor([[1, 2]])}, gather, brute_force),
    Check("sequence_logprobs: the sum over the masked tokens",
          lambda: {"token_logprobs": TOKENS, "mask": torch.tensor([[1, 1, 0], [0, 0, 1]])},
          run=lambda f, x: {"sequence log-probs": f.sequence_logprobs(x["token_logprobs"], x["mask"])},
          expect=lambda x, got: {"sequence log-probs": torch.tensor([-3.0, -6.0])}),
    Check("sequence_logprobs(average=True) with a bool mask: the mean over the masked tokens",
          lambda: {"token_logprobs": TOKENS, "mask": torch.tensor([[1, 1, 0], [0, 0, 1]]).bool()},
          run=lambda f, x: {"sequence log-probs": f.sequence_logprobs(x["token_logprobs"], x["mask"], average=True)},
          expect=lambda x, got: {"sequence log-probs": torch.tensor([-1.5, -6.0])}),
    *[Check(f"sequence_logprobs(average={average}): an all-masked row is 0; -inf and NaN in the padding are ignored",
            lambda: {"token_logprobs": GARBAGE, "mask": torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])},
            run=lambda f, x, average=average: {
                "sequence log-probs": f.sequence_logprobs(x["token_logprobs"], x["mask"], average=average)},
            expect=lambda x, got, average=average: {"sequence log-probs": torch.tensor([0.0, -2.5 if average else -5.0])},
            hint="select with torch.where (0 · -inf is NaN) and clamp the count to at least 1")
      for average in (False, True)],
    Check("sequence_logprobs: gradient w.r.t. the token log-probs is the mask (sum) or mask / n (average)",
          lambda: {"token_logprobs": random(3, 4, seed=5), "mask": torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]]),
                   "w": random(3, seed=6)},
          run=lambda f, x: gradients(
              {"sum": f.sequence_logprobs(leaves(x, ["token_logprobs"])["token_logprobs"], x["mask"])},
              {"sum": x["w"]}, {"token_logprobs": x["token_logprobs"]}),
          expect=lambda x, got: {"∂L/∂token_logprobs": x["w"][:, None] * x["mask"].double()}),
]
