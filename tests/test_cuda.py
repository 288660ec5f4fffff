"""What only a GPU can check: bf16/fp16 autocast numerics, the fused head and LoRA on CUDA, and the
allocator's view of memory. Skipped without CUDA; ``benchmarks/gpu_check.py`` runs them (``-m cuda``)."""
import copy

import pytest
import torch

from minirlhf import entropy_from_logits, gather_logprobs
from minirlhf.core.fused_logprobs import fused_head_logprobs
from minirlhf.data.collate import collate_sft
from minirlhf.models.forward import fused_response_logprobs, response_logprobs
from minirlhf.models.lora import LoRAConfig, adapters_disabled, apply_lora, lora_modules, merge_lora

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")


def cuda_model(vocab=5000, seed=0):
    """A small float32 Qwen2 on the GPU (float32 master weights, as the trainers hold them)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).to(CUDA)


def padded_batch(vocab=5000, padding_side="left", seed=0):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for prompt_len, length in [(5, 40), (12, 33), (3, 20), (20, 48)]:
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "response_mask": [0] * prompt_len + [1] * (length - prompt_len)})
    return {k: v.to(CUDA) for k, v in collate_sft(examples, 0, padding_side).items()}


def logps_and_grads(fn, model, batch, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype):
        logp, mask, entropy = fn(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                 return_entropy=True)
    mask = mask.bool()
    torch.where(mask, logp + 0.1 * entropy, 0.0).sum().backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters()}
    return torch.where(mask, logp, 0.0).detach(), torch.where(mask, entropy, 0.0).detach(), grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_equals_unfused_under_autocast(dtype):
    model = cuda_model()
    batch = padded_batch()
    unfused = logps_and_grads(response_logprobs, model, batch, dtype)
    fused = logps_and_grads(fused_response_logprobs, model, batch, dtype)
    assert fused[0].dtype == unfused[0].dtype == torch.float32
    # The same half-precision logits feed both float32 log-softmaxes: equal up to the matmul's rounding.
    torch.testing.assert_close(fused[0], unfused[0], rtol=0, atol=2e-2)
    torch.testing.assert_close(fused[1], unfused[1], rtol=0, atol=2e-2)
    for name, grad in unfused[2].items():
        cosine = torch.nn.functional.cosine_similarity(fused[2][name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.999, (name, cosine.item())


def test_fused_head_follows_cuda_autocast_and_keeps_float32_gradients():
    generator = torch.Generator(device=CUDA).manual_seed(0)
    hidden = torch.randn(300, 128, device=CUDA, generator=generator, requires_grad=True)
    weight = torch.randn(5000, 128, device=CUDA, generator=generator, requires_grad=True)
    labels = torch.randint(0, 5000, (300,), device=CUDA, generator=generator)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logp = fused_head_logprobs(hidden, weight, labels)
        reference = gather_logprobs(torch.nn.functional.linear(hidden, weight)[None], labels[None])[0]
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, reference, rtol=0, atol=1e-2)
    logp.sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32


def test_log_probs_are_float32_and_accurate_for_bf16_logits_on_cuda():
    generator = torch.Generator(device=CUDA).manual_seed(0)
    logits = (3 * torch.randn(2, 64, 151936, device=CUDA, generator=generator)).to(torch.bfloat16)
    labels = torch.randint(0, 151936, (2, 64), device=CUDA, generator=generator)
    logp, entropy = gather_logprobs(logits, labels), entropy_from_logits(logits)
    assert logp.dtype == entropy.dtype == torch.float32
    exact = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(logp.double(), exact.gather(-1, labels[..., None])[..., 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy.double(), -(exact.exp() * exact).sum(-1), rtol=0, atol=1e-4)


def test_response_logprobs_are_float32_under_bf16_autocast():
    model = cuda_model()
    batch = padded_batch()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for fn in (response_logprobs, fused_response_logprobs):
            logp, _ = fn(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
            assert logp.dtype == torch.float32


def test_gather_logprobs_peak_extra_memory_on_cuda():
    """The allocator's exact figure (no RSS slack): one float32 chunk, ≤ 0.15× the logits."""
    logits = torch.randn(2, 1024, 151936, device=CUDA, dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 151936, (2, 1024), device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    logp = gather_logprobs(logits, labels)
    (grad,) = torch.autograd.grad(logp.sum(), logits)
    extra = torch.cuda.max_memory_allocated() - held - grad.numel() * grad.element_size()
    assert extra <= 0.15 * logits.numel() * logits.element_size(), extra


def test_fused_head_needs_less_memory_than_the_unfused_path_on_cuda():
    model = cuda_model(vocab=151936)
    batch = padded_batch(vocab=151936)
    peaks = {}
    for name, fn in (("unfused", response_logprobs), ("fused", fused_response_logprobs)):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logp, mask = fn(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        torch.where(mask.bool(), logp, 0.0).sum().backward()
        peaks[name] = torch.cuda.max_memory_allocated() - held
    assert peaks["fused"] < 0.75 * peaks["unfused"], peaks


def test_lora_on_cuda_starts_at_the_base_model_and_trains_float32_adapters():
    base = cuda_model()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(r=8, alpha=16.0))
    batch = padded_batch()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, base(input_ids=batch["input_ids"]).logits)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(std=0.02)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logp, mask = fused_response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        torch.where(mask.bool(), logp, 0.0).sum().backward()
        with torch.no_grad(), adapters_disabled(model):
            reference = model(input_ids=batch["input_ids"]).logits
        expected = base(input_ids=batch["input_ids"]).logits
    assert torch.equal(reference, expected)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert name.endswith(("lora_A", "lora_B")) and p.dtype == p.grad.dtype == torch.float32
        else:
            assert p.grad is None
    with torch.no_grad():
        unmerged = model(input_ids=batch["input_ids"]).logits
        merged = merge_lora(model)(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_the_sampler_on_cuda_draws_torch_multinomials_and_looks_every_few_tokens():
    """On a GPU the sampler looks at which rows stopped every ``CHECK_EVERY["other"]`` tokens (one host
    sync each) and drops them from the batch and cache: the tokens are still those of
    ``torch.multinomial`` on the whole batch with the same CUDA generator, and each response mask
    ends at its row's first stop token."""
    from fixtures import multinomial_sampling_reference
    from minirlhf.models.sampling import sample_responses

    model = cuda_model(vocab=300, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0)  # larger weights: continuations differ from row to row
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 300, (6, 7), generator=generator).to(CUDA)
    mask = torch.ones_like(prompts)
    mask[0, :3] = 0  # one left-padded row
    stops = list(range(0, 300, 11))
    expected = multinomial_sampling_reference(model, prompts, mask, 20, stops, 0, 1.0,
                                              torch.Generator(CUDA).manual_seed(3))
    tokens, valid = sample_responses(model, prompts, mask, 20, stops, 0, 1.0, torch.Generator(CUDA).manual_seed(3))
    assert torch.equal(tokens, expected)
    stopped = torch.isin(tokens, torch.tensor(stops, device=CUDA)) & valid.bool()
    lengths = valid.sum(-1)
    assert len(set(lengths.tolist())) > 1
    for row in range(6):
        n = int(lengths[row])
        assert valid[row, :n].all() and (n == tokens.shape[1] or stopped[row, n - 1])
