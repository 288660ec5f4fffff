"""Log-probs from logits: gradient checks, brute-force references, padding invariance, edge cases.

The ``logprobs`` exercise's checks (minirlhf/homework/checks/logprobs.py) run here on the reference,
or on a student's folder with ``--impl``; the other tests are reference code. Peak memory is
measured by ``benchmarks/bench_logprobs.py``, not here.
"""
import math

import pytest
import torch

from minirlhf import entropy_from_logits, gather_logprobs, sequence_logprobs, shift_for_next_token
import minirlhf.core.logprobs as logprobs_module
from exercise_checks import exercise_tests

test_exercise_logprobs = exercise_tests("logprobs")


def brute_force_logprobs(logits, labels):
    """The reference: a full float64 log-softmax, then pick the label."""
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def brute_force_entropy(logits):
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def random_logits(*shape, dtype=torch.float32, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)


def random_labels(batch, length, vocab, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- gather_logprobs -----------------------------------------------------------------------------


def test_gather_logprobs_bf16_backward_matches_float32_math():
    logits, labels = random_logits(2, 3, 300, dtype=torch.bfloat16), random_labels(2, 3, 300)
    z = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(gather_logprobs(z, labels).sum(), z)
    expected = torch.nn.functional.one_hot(labels, 300) - torch.softmax(logits.float(), -1)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), expected, atol=0, rtol=2**-8)  # one bf16 rounding


def test_gather_logprobs_chunking_covers_every_position(monkeypatch):
    # With no chunk-size floor these rows split into many chunks, some inside one sequence.
    monkeypatch.setattr(logprobs_module, "_MIN_CHUNK_BYTES", 0)
    logits, labels = random_logits(3, 37, 2048), random_labels(3, 37, 2048)
    z = logits.clone().requires_grad_()
    logprobs = gather_logprobs(z, labels)
    torch.testing.assert_close(logprobs.double(), brute_force_logprobs(logits, labels), atol=2e-6, rtol=1e-6)
    (grad,) = torch.autograd.grad(logprobs.sum(), z)
    expected = torch.nn.functional.one_hot(labels, 2048) - torch.softmax(logits, -1)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("min_chunk_bytes", [0, logprobs_module._MIN_CHUNK_BYTES])
def test_temperature_log_probs_entropy_and_gradients_are_those_of_softmax_z_over_tau(monkeypatch, dtype,
                                                                                     min_chunk_bytes):
    """``gather_logprobs(z, y, τ)`` = log softmax(float32(z) / τ)_y and ``entropy_from_logits(z, τ)``,
    forward and backward (the chain rule's 1/τ), in one chunk or many."""
    monkeypatch.setattr(logprobs_module, "_MIN_CHUNK_BYTES", min_chunk_bytes)
    tau = 0.6
    logits, labels = random_logits(2, 5, 300, dtype=dtype), random_labels(2, 5, 300)
    exact = logits.double().requires_grad_()  # the upcast is exact; the division is what is checked
    expected_logps = torch.log_softmax(exact / tau, -1).gather(-1, labels[..., None]).squeeze(-1)
    expected_entropy = -(torch.softmax(exact / tau, -1) * torch.log_softmax(exact / tau, -1)).sum(-1)
    weights = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected_grads = [torch.autograd.grad((weights * expected).sum(), exact, retain_graph=True)[0]
                      for expected in (expected_logps, expected_entropy)]
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=3e-6, rtol=1e-5)
    for fn, expected, expected_grad in ((gather_logprobs, expected_logps, expected_grads[0]),
                                        (entropy_from_logits, expected_entropy, expected_grads[1])):
        z = logits.clone().requires_grad_()
        value = fn(z, labels, tau) if fn is gather_logprobs else fn(z, tau)
        torch.testing.assert_close(value.double(), expected.detach(), **tol)
        (grad,) = torch.autograd.grad((weights.to(value.dtype) * value).sum(), z)
        grad_tol = tol if dtype != torch.bfloat16 else dict(atol=1e-3, rtol=2**-7)  # one bf16 rounding
        torch.testing.assert_close(grad.double(), expected_grad, **grad_tol)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        gather_logprobs(logits, labels, 0.0)


def test_gather_logprobs_accepts_a_non_contiguous_shifted_view():
    logits, input_ids = random_logits(2, 9, 50), random_labels(2, 9, 50)
    shifted_logits, labels, _ = shift_for_next_token(logits, input_ids, torch.ones(2, 9))
    assert not shifted_logits.is_contiguous()
    expected = brute_force_logprobs(shifted_logits.contiguous(), labels)
    torch.testing.assert_close(gather_logprobs(shifted_logits, labels).double(), expected, atol=2e-6, rtol=1e-6)


def test_gather_logprobs_infinite_and_huge_logits():
    inf = float("inf")
    logits = torch.zeros(1, 4, 5)
    logits[0, 0] = torch.tensor([1.0, -inf, 2.0, -inf, 0.0])  # -inf on non-labels: probability 0
    logits[0, 1] = torch.tensor([-inf, 1.0, 2.0, 3.0, 4.0])  # -inf on the label: log-prob -inf
    logits[0, 2] = torch.tensor([1e30, 1e30, 1e30, -3e38, 1e30])  # huge: uniform over four
    logits[0, 3] = torch.tensor([3e38, -3e38, 0.0, 0.0, 0.0])  # the extremes of float32
    labels = torch.tensor([[2, 0, 1, 0]])
    z = logits.clone().requires_grad_()
    logprobs = gather_logprobs(z, labels)
    expected = torch.tensor([[2 - math.log(math.e + math.e**2 + 1), -inf, -math.log(4), 0.0]])
    torch.testing.assert_close(logprobs, expected)
    (grad,) = torch.autograd.grad(logprobs[:, [0, 2, 3]].sum(), z)
    assert not grad.isnan().any()
    torch.testing.assert_close(grad[0, 2], torch.tensor([-0.25, 0.75, -0.25, 0.0, -0.25]))
    torch.testing.assert_close(grad[0, 0, [1, 3]], torch.zeros(2))


def test_gather_logprobs_rejects_bad_inputs():
    logits = random_logits(2, 3, 5)
    expected = r"gather_logprobs: labels must have shape \[B=2, T=3\] \(B, T as in logits\), got \[2, 4\]"
    with pytest.raises(ValueError, match=expected):
        gather_logprobs(logits, random_labels(2, 4, 5))
    with pytest.raises(ValueError, match="ignore index"):
        gather_logprobs(logits, torch.full((2, 3), -100))
    with pytest.raises(ValueError, match="labels must be a long"):
        gather_logprobs(logits, random_labels(2, 3, 5).int())


# --- entropy_from_logits -------------------------------------------------------------------------


def test_entropy_gradcheck_float64():
    logits = random_logits(2, 3, 6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(entropy_from_logits, (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_matches_brute_force(dtype):
    logits = random_logits(3, 37, 2048, dtype=dtype)
    entropy = entropy_from_logits(logits)
    assert entropy.dtype == torch.float32 and entropy.shape == (3, 37)
    torch.testing.assert_close(entropy.double(), brute_force_entropy(logits), atol=1e-5, rtol=1e-5)


def test_entropy_backward_is_minus_p_times_logp_plus_h():
    logits = random_logits(2, 3, 9)
    z = logits.clone().requires_grad_()
    grad_out = random_logits(2, 3, seed=3)
    (grad,) = torch.autograd.grad(entropy_from_logits(z), z, grad_out)
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1, keepdim=True)
    torch.testing.assert_close(grad, -grad_out.unsqueeze(-1) * logp.exp() * (logp + entropy))


def test_entropy_limits_uniform_one_hot_and_infinities():
    vocab, inf = 8, float("inf")
    logits = torch.zeros(1, 4, vocab)
    logits[0, 1] = torch.tensor([50.0] + [-50.0] * (vocab - 1))  # (nearly) one-hot
    logits[0, 2] = torch.tensor([0.0, 0.0] + [-inf] * (vocab - 2))  # uniform over two, 0·log 0 = 0
    logits[0, 3] = 1e30  # huge and equal: uniform
    z = logits.clone().requires_grad_()
    entropy = entropy_from_logits(z)
    torch.testing.assert_close(entropy, torch.tensor([[math.log(vocab), 0.0, math.log(2), math.log(vocab)]]))
    (grad,) = torch.autograd.grad(entropy.sum(), z)
    assert not grad.isnan().any()
    torch.testing.assert_close(grad[0, [0, 2, 3]], torch.zeros(3, vocab))  # uniform is a maximum


# --- shift_for_next_token and sequence_logprobs --------------------------------------------------


def test_shift_rejects_misaligned_shapes():
    with pytest.raises(ValueError, match=r"logits must have shape \[B=1, L=3, V\]"):
        shift_for_next_token(torch.zeros(1, 2, 4), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"mask must have shape \[B=1, L=3\]"):
        shift_for_next_token(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 2))


@pytest.fixture(scope="module")
def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).double().eval()


def _pad_batch(sequences, prompt_lengths, side, pad_id=0):
    """``input_ids``, ``attention_mask``, ``response_mask`` ``[B, L]`` padded on ``side``."""
    length = max(len(s) for s in sequences)
    rows = []
    for tokens, prompt_len in zip(sequences, prompt_lengths):
        ids = torch.tensor(tokens)
        attention = torch.ones(len(tokens), dtype=torch.long)
        response = (torch.arange(len(tokens)) >= prompt_len).long()
        pad = length - len(tokens)
        padding = (0, pad) if side == "right" else (pad, 0)
        rows.append([torch.nn.functional.pad(x, padding, value=v) for x, v in ((ids, pad_id), (attention, 0), (response, 0))])
    return [torch.stack(column) for column in zip(*rows)]


def _sequence_logprobs_of(model, input_ids, attention_mask, response_mask, average=False):
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits, labels, mask = shift_for_next_token(logits, input_ids, response_mask)
    return sequence_logprobs(gather_logprobs(logits, labels), mask, average=average)


@pytest.mark.parametrize("average", [False, True])
def test_left_and_right_padding_give_identical_sequence_logprobs(tiny_qwen2, average):
    sequences = [[3, 14, 15, 92, 65, 35], [8, 9, 79], [32, 38, 46, 26]]
    prompt_lengths = [2, 1, 3]
    right = _sequence_logprobs_of(tiny_qwen2, *_pad_batch(sequences, prompt_lengths, "right"), average=average)
    left = _sequence_logprobs_of(tiny_qwen2, *_pad_batch(sequences, prompt_lengths, "left"), average=average)
    alone = torch.cat(
        [_sequence_logprobs_of(tiny_qwen2, *_pad_batch([s], [p], "right"), average=average)
         for s, p in zip(sequences, prompt_lengths)]
    )  # fmt: skip
    torch.testing.assert_close(left, right)
    torch.testing.assert_close(left, alone)
    assert (right < 0).all()
