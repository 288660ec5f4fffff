"""The fused LM-head log-probs: the same numbers and gradients as the unfused path, without logits.

Core (``fused_head_logprobs``): float64 gradient checks against autograd through the naive
``log_softmax(F.linear(h, W, b) / τ)`` and against finite differences, many chunks, bf16 inputs,
and a check that no ``[N, V]`` tensor is ever allocated. Model level
(``fused_response_logprobs``): equal outputs and parameter gradients to ``response_logprobs``,
tied and untied heads, left and right padding.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import minirlhf.core.fused_logprobs as fused_module
from minirlhf.core.fused_logprobs import fused_head_logprobs
from minirlhf.core.logprobs import entropy_from_logits, gather_logprobs
from minirlhf.data.collate import collate_sft
from minirlhf.models.forward import fused_response_logprobs, response_logprobs


def random_head(rows=13, hidden=6, vocab=29, bias=True, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=generator, dtype=torch.float64).to(dtype)
    w = (2 * torch.randn(vocab, hidden, generator=generator, dtype=torch.float64)).to(dtype)
    b = torch.randn(vocab, generator=generator, dtype=torch.float64).to(dtype) if bias else None
    y = torch.randint(0, vocab, (rows,), generator=generator)
    return h, w, b, y


def naive(h, w, b, y, temperature=1.0):
    """The reference: full logits, a full log-softmax, autograd's gradients."""
    logp = torch.log_softmax(F.linear(h, w, b) / temperature, dim=-1)
    return logp.gather(-1, y[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def gradients(fn, tensors, seed=5):
    """Values and the gradients of ``Σ g·logp + Σ γ·H`` (random g, γ) w.r.t. ``tensors``."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    logp, entropy = fn(*tensors)
    generator = torch.Generator().manual_seed(seed)
    g, gamma = torch.randn(2, logp.shape[0], generator=generator, dtype=logp.dtype)
    grads = torch.autograd.grad((g * logp).sum() + (gamma * entropy).sum(), tensors)
    return logp.detach(), entropy.detach(), grads


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_head_equals_autograd_of_the_naive_path_float64(monkeypatch, temperature, bias):
    monkeypatch.setattr(fused_module, "_CHUNK_BYTES", 29 * 4 * 3)  # 3 rows per chunk: 5 chunks, a ragged last one
    h, w, b, y = random_head(bias=bias)
    inputs = [h, w] + ([b] if bias else [])

    def fused(h, w, b=None):
        return fused_head_logprobs(h, w, y, b, temperature, return_entropy=True)

    def reference(h, w, b=None):
        return naive(h, w, b, y, temperature)

    ours, theirs = gradients(fused, inputs), gradients(reference, inputs)
    assert ours[0].dtype == torch.float64 and ours[0].shape == (13,)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-12, atol=1e-12)
    for mine, expected in zip(ours[2], theirs[2]):  # hidden, weight (and bias)
        torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-12)


def test_fused_head_gradcheck_finite_differences(monkeypatch):
    monkeypatch.setattr(fused_module, "_CHUNK_BYTES", 7 * 8 * 2)  # 2 rows per chunk
    h, w, b, y = random_head(rows=5, hidden=3, vocab=7)

    def both(h, w, b):
        logp, entropy = fused_head_logprobs(h, w, y, b, temperature=0.8, return_entropy=True)
        return logp, entropy

    assert torch.autograd.gradcheck(both, [t.requires_grad_() for t in (h, w, b)])
    assert torch.autograd.gradcheck(lambda h, w: fused_head_logprobs(h, w, y), [h, w])  # log-probs alone


def test_fused_head_without_entropy_and_with_a_frozen_head():
    h, w, b, y = random_head()
    h = h.requires_grad_()
    logp = fused_head_logprobs(h, w, y, b)  # w, b frozen (LoRA, or a reference pass)
    torch.testing.assert_close(logp, naive(h, w, b, y)[0])
    (grad,) = torch.autograd.grad(logp.sum(), h)
    h_ref = h.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(naive(h_ref, w, b, y)[0].sum(), h_ref)
    torch.testing.assert_close(grad, expected)
    # the entropy's gradient alone, the log-prob output unused
    h2 = h.detach().clone().requires_grad_()
    _, entropy = fused_head_logprobs(h2, w, y, b, return_entropy=True)
    (grad,) = torch.autograd.grad(entropy.sum(), h2)
    h_ref = h.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(naive(h_ref, w, b, y)[1].sum(), h_ref)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_head_half_inputs_give_float32_log_probs(dtype):
    h, w, _, y = random_head(rows=9, hidden=16, vocab=3000, bias=False, dtype=dtype)
    logp, entropy = fused_head_logprobs(h, w, y, return_entropy=True)
    assert logp.dtype == entropy.dtype == torch.float32
    logits = F.linear(h, w)  # the same half-precision logits, then the float32 log-softmax
    torch.testing.assert_close(logp, gather_logprobs(logits[None], y[None])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, entropy_from_logits(logits[None])[0], rtol=1e-5, atol=1e-5)
    h = h.requires_grad_()
    w = w.requires_grad_()
    grad_h, grad_w = torch.autograd.grad(fused_head_logprobs(h, w, y).sum(), (h, w))
    assert grad_h.dtype == grad_w.dtype == dtype


def test_fused_head_follows_autocast_like_a_linear_head():
    h, w, _, y = random_head(rows=8, hidden=16, vocab=500, bias=False, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = fused_head_logprobs(h, w, y)
        unfused = gather_logprobs(F.linear(h, w)[None], y[None])[0]  # autocast makes bf16 logits
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, unfused, rtol=1e-5, atol=1e-5)
    assert (logp - naive(h.double(), w.double(), None, y)[0]).abs().max() > 1e-4  # bf16 matmul: the test can fail


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an op returns inside the ``with`` block."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_fused_head_never_builds_an_n_by_v_tensor(monkeypatch):
    rows, vocab = 64, 1000
    monkeypatch.setattr(fused_module, "_CHUNK_BYTES", 8 * vocab * 4)  # 8 rows per chunk
    h, w, b, y = random_head(rows=rows, hidden=4, vocab=vocab, dtype=torch.float32)
    h, w, b = (t.requires_grad_() for t in (h, w, b))
    with LargestTensor() as memory:
        logp, entropy = fused_head_logprobs(h, w, y, b, return_entropy=True)
        (logp.sum() + entropy.sum()).backward()
    assert memory.largest == 8 * vocab  # one chunk's logits: rows·V never exists
    with LargestTensor() as memory:
        naive(h, w, b, y)[0].sum().backward()
    assert memory.largest == rows * vocab  # the check can fail


def test_fused_head_rejects_bad_inputs():
    h, w, b, y = random_head()
    with pytest.raises(ValueError, match=r"weight must have shape \[V, D=\d+\]"):
        fused_head_logprobs(h, w[:, :3], y)
    with pytest.raises(ValueError, match=r"labels must have shape \[N=\d+\]"):
        fused_head_logprobs(h, w, y[:4])
    with pytest.raises(ValueError, match="token ids in"):
        fused_head_logprobs(h, w, torch.full_like(y, 29))
    with pytest.raises(ValueError, match=r"bias must be None or a tensor of shape \[V=\d+\]"):
        fused_head_logprobs(h, w, y, b[:3])
    with pytest.raises(ValueError, match="temperature"):
        fused_head_logprobs(h, w, y, temperature=0.0)


# --- model level: fused_response_logprobs ----------------------------------------------------------


def float64_model(tie_word_embeddings=True, vocab=300, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie_word_embeddings)
    return Qwen2ForCausalLM(config).double()


def padded_batches(vocab=300, seed=0):
    """The same three rows (prompt, response lengths differ), left- and right-padded."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for prompt_len, length in [(3, 11), (6, 8), (2, 5)]:
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "response_mask": [0] * prompt_len + [1] * (length - prompt_len)})
    return collate_sft(examples, 0, "left"), collate_sft(examples, 0, "right")


def step(fn, model, batch, temperature):
    """Masked log-probs and entropies, and every parameter's gradient of a loss that uses both."""
    model.zero_grad(set_to_none=True)
    logp, mask, entropy = fn(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                             temperature=temperature, return_entropy=True)
    weights = (batch["input_ids"][:, 1:] % 7 - 3).to(logp.dtype)  # per token, so padding cannot change the loss
    mask = mask.bool()
    (torch.where(mask, weights * logp + 0.3 * entropy, 0.0)).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return torch.where(mask, logp, 0.0).detach(), torch.where(mask, entropy, 0.0).detach(), mask, grads


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_response_logprobs_equal_the_unfused_path(tie_word_embeddings, temperature):
    model = float64_model(tie_word_embeddings)
    left, right = padded_batches()
    results = {}
    for padding, batch in (("left", left), ("right", right)):
        for name, fn in (("unfused", response_logprobs), ("fused", fused_response_logprobs)):
            results[padding, name] = step(fn, model, batch, temperature)
    for padding in ("left", "right"):
        unfused, fused = results[padding, "unfused"], results[padding, "fused"]
        assert fused[0].shape == unfused[0].shape and fused[0].dtype == torch.float64
        torch.testing.assert_close(fused[0], unfused[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fused[1], unfused[1], rtol=1e-12, atol=1e-12)
        assert fused[2].equal(unfused[2])
        assert set(fused[3]) == set(unfused[3])
        for name in fused[3]:  # every parameter, the (tied) embedding included
            torch.testing.assert_close(fused[3][name], unfused[3][name], rtol=1e-10, atol=1e-12, msg=name)
    # left and right padding: the same numbers for every row's real tokens
    left_result, right_result = results["left", "fused"], results["right", "fused"]
    for row in range(3):
        left_values = left_result[0][row][left_result[2][row]]
        right_values = right_result[0][row][right_result[2][row]]
        torch.testing.assert_close(left_values, right_values, rtol=1e-12, atol=1e-12)
    for name in left_result[3]:
        torch.testing.assert_close(left_result[3][name], right_result[3][name], rtol=1e-10, atol=1e-12)


def test_fused_response_logprobs_returns_zero_outside_the_mask_and_float32_for_float32_models():
    model = float64_model().float()
    left, _ = padded_batches()
    logp, mask = fused_response_logprobs(model, left["input_ids"], left["attention_mask"], left["response_mask"])
    assert logp.dtype == torch.float32 and logp.shape == mask.shape == (3, 10)
    assert (logp[~mask.bool()] == 0).all() and (logp[mask.bool()] < 0).all()
    # no response token at all: zeros, and a backward that runs (zero gradients)
    logp, mask, entropy = fused_response_logprobs(model, left["input_ids"], left["attention_mask"],
                                                  torch.zeros_like(left["response_mask"]), return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    assert not logp.any() and not entropy.any() and not model.lm_head.weight.grad.any()


def test_fused_response_logprobs_refuses_post_processed_logits():
    model = float64_model()
    model.config.final_logit_softcapping = 30.0
    left, _ = padded_batches()
    with pytest.raises(ValueError, match="plain nn.Linear LM head"):
        fused_response_logprobs(model, left["input_ids"], left["attention_mask"], left["response_mask"])
