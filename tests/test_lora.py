"""LoRA: the formula, its init, gradients only on A and B, exact merge, adapters off = the base model,
PEFT-compatible files, a merged export plain transformers loads, and agreement with ``peft``
(skipped where ``peft`` is not installed)."""
import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from minirlhf.errors import MinirlhfError
from minirlhf.models.forward import fused_response_logprobs, response_logprobs
from minirlhf.models.lora import (
    DEFAULT_TARGET_MODULES,
    LoRAConfig,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    load_adapter,
    lora_config,
    lora_modules,
    merge_lora,
    save_adapter,
    save_merged,
    unmerge_lora,
)

CONFIG = LoRAConfig(r=4, alpha=8.0)


def base_model(seed=0, tie_word_embeddings=True):
    """A tiny float64 Qwen2 (tied embeddings like Qwen2.5-0.5B) in eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie_word_embeddings)
    return Qwen2ForCausalLM(config).double().eval()


def adapted(model, config=CONFIG, seed=0):
    """``apply_lora`` on a copy, with random (non-zero) B so the adapters change the outputs."""
    model = apply_lora(copy.deepcopy(model), config, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=generator, dtype=m.lora_B.dtype))
    return model


def input_ids(seed=0):
    return torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_linear_is_the_formula_and_starts_at_the_base_layer():
    linear = torch.nn.Linear(6, 5, dtype=torch.float64)
    lora = LoRALinear(copy.deepcopy(linear), r=3, alpha=6.0)
    x = torch.randn(4, 6, dtype=torch.float64)
    assert lora.lora_A.shape == (3, 6) and lora.lora_B.shape == (5, 3) and lora.scaling == 2.0
    assert (lora.lora_B == 0).all() and lora.lora_A.abs().max() > 0
    assert lora.lora_A.abs().max() <= 1 / math.sqrt(6)  # Kaiming-uniform(a=√5) bound, as nn.Linear's init
    assert torch.equal(lora(x), linear(x))  # B = 0: exactly the base layer
    with torch.no_grad():
        lora.lora_B.normal_()
    expected = x @ linear.weight.T + linear.bias + 2.0 * x @ lora.lora_A.T @ lora.lora_B.T  # W x + b + (α/r) B A x
    torch.testing.assert_close(lora(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lora.delta_weight(), 2.0 * lora.lora_B @ lora.lora_A)


def test_lora_dropout_acts_on_the_update_only_in_train_mode():
    linear = torch.nn.Linear(64, 8, dtype=torch.float64)
    lora = LoRALinear(linear, r=2, alpha=2.0, dropout=0.5)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(16, 64, dtype=torch.float64)
    exact = linear(x) + x @ lora.delta_weight().T
    torch.testing.assert_close(lora.eval()(x), exact)
    train_out = lora.train()(x)
    assert not torch.allclose(train_out, exact)


def test_apply_lora_wraps_the_targets_and_leaves_the_model_at_the_base_model():
    model = base_model()
    lora_model = apply_lora(copy.deepcopy(model), CONFIG)
    names = list(lora_modules(lora_model))
    assert len(names) == 2 * len(DEFAULT_TARGET_MODULES)
    assert {name.rsplit(".", 1)[-1] for name in names} == set(DEFAULT_TARGET_MODULES)
    assert lora_config(lora_model) == CONFIG
    ids = input_ids()
    assert torch.equal(logits(lora_model, ids), logits(model, ids))  # B = 0
    with pytest.raises(MinirlhfError, match="already has LoRA"):
        apply_lora(lora_model, CONFIG)
    with pytest.raises(MinirlhfError, match="no nn.Linear named"):
        apply_lora(copy.deepcopy(model), LoRAConfig(target_modules=("c_attn",)))


def test_only_the_lora_matrices_get_gradients():
    model = apply_lora(base_model().train(), CONFIG)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith(("lora_A", "lora_B")) for name in trainable)
    model(input_ids=input_ids()).logits.pow(2).mean().backward()
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            assert p.grad.abs().max() > 0
        elif name.endswith("lora_A"):
            assert p.grad.abs().max() == 0  # ∂L/∂A = (α/r) Bᵀ g xᵀ = 0 while B = 0
        else:
            assert p.grad is None, name


def test_merge_then_forward_equals_the_unmerged_forward_and_unmerge_restores_w():
    model = adapted(base_model())
    ids = input_ids()
    unmerged = logits(model, ids)
    weights = {name: m.base_layer.weight.clone() for name, m in lora_modules(model).items()}
    merge_lora(model)
    assert all(m.merged for m in lora_modules(model).values())
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-12, atol=1e-12)
    merge_lora(model)  # idempotent
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-12, atol=1e-12)
    with pytest.raises(MinirlhfError, match="unmerge_lora first"):
        with adapters_disabled(model):
            pass
    unmerge_lora(model)
    for name, m in lora_modules(model).items():
        torch.testing.assert_close(m.base_layer.weight, weights[name], rtol=0, atol=1e-15)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-12, atol=1e-12)


def test_adapters_disabled_is_the_base_model_exactly_and_restores_them():
    model = base_model()
    lora_model = adapted(model)
    ids = input_ids()
    with_adapters = logits(lora_model, ids)
    assert not torch.allclose(with_adapters, logits(model, ids))
    with adapters_disabled(lora_model):
        assert torch.equal(logits(lora_model, ids), logits(model, ids))
    assert torch.equal(logits(lora_model, ids), with_adapters)
    with pytest.raises(RuntimeError, match="boom"):
        with adapters_disabled(lora_model):
            raise RuntimeError("boom")
    assert torch.equal(logits(lora_model, ids), with_adapters)


def test_save_load_round_trip_in_peft_layout(tmp_path):
    model = base_model()
    lora_model = adapted(model)
    save_adapter(lora_model, tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[key].shape == (4, 32)
    assert tensors[key.replace("self_attn.q_proj.lora_A", "mlp.down_proj.lora_B")].shape == (32, 4)
    assert len(tensors) == 2 * 2 * len(DEFAULT_TARGET_MODULES)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    ids = input_ids()
    loaded = load_adapter(copy.deepcopy(model), tmp_path / "adapter")  # adapters applied from the config
    assert torch.equal(logits(loaded, ids), logits(lora_model, ids))
    again = load_adapter(apply_lora(copy.deepcopy(model), CONFIG, seed=7), tmp_path / "adapter")  # into adapters
    assert torch.equal(logits(again, ids), logits(lora_model, ids))


def test_load_adapter_reports_mismatches(tmp_path):
    model = base_model()
    save_adapter(adapted(model), tmp_path / "r4")
    with pytest.raises(MinirlhfError, match=r"lora_A.weight has shape \[4, 32\].*r = 4.*r = 8"):
        load_adapter(apply_lora(copy.deepcopy(model), LoRAConfig(r=8)), tmp_path / "r4")
    with pytest.raises(MinirlhfError, match="missing"):
        load_adapter(apply_lora(copy.deepcopy(model), LoRAConfig(r=4, target_modules=("q_proj", "lm_head"))),
                     tmp_path / "r4")
    with pytest.raises(MinirlhfError, match="adapter_config.json: cannot read"):
        load_adapter(copy.deepcopy(model), tmp_path / "nowhere")


def test_merged_export_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    lora_model = adapted(base_model())
    save_merged(lora_model, tmp_path / "merged")
    stored = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any("lora" in key or "base_layer" in key for key in stored)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64).eval()
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # still tied
    ids = input_ids()
    torch.testing.assert_close(logits(plain, ids), logits(lora_model, ids), rtol=1e-12, atol=1e-12)
    assert not any(m.merged for m in lora_modules(lora_model).values())  # the live adapters are untouched
    save_merged(lora_model, tmp_path / "merged-bf16", dtype=torch.bfloat16)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-bf16").eval()
    assert plain.dtype == torch.bfloat16 and plain.lm_head.weight is plain.model.embed_tokens.weight
    torch.testing.assert_close(logits(plain, ids).double(), logits(lora_model, ids), rtol=0, atol=0.1)


def test_fused_log_probs_and_the_adapters_off_reference_with_lora():
    model = base_model()
    lora_model = adapted(model).train()
    ids = input_ids()
    attention_mask = torch.ones_like(ids)
    response_mask = torch.zeros_like(ids)
    response_mask[:, 3:] = 1
    grads = []
    for fn in (response_logprobs, fused_response_logprobs):
        lora_model.zero_grad(set_to_none=True)
        logp, mask = fn(lora_model, ids, attention_mask, response_mask)
        (logp * mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in lora_model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and all(n.endswith(("lora_A", "lora_B")) for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-12)
    with torch.no_grad(), adapters_disabled(lora_model):
        reference, mask = fused_response_logprobs(lora_model, ids, attention_mask, response_mask)
    expected, _ = response_logprobs(model, ids, attention_mask, response_mask)
    torch.testing.assert_close(reference * mask, expected.detach() * mask, rtol=1e-12, atol=1e-12)


# --- against peft (optional) ---------------------------------------------------------------------


def test_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = base_model()
    ours = adapted(model)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=CONFIG.r, lora_alpha=CONFIG.alpha, lora_dropout=0.0, target_modules=list(CONFIG.target_modules)))
    with torch.no_grad():  # the same A and B in both
        for name, m in lora_modules(ours).items():
            layer = theirs.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(m.lora_A)
            layer.lora_B["default"].weight.copy_(m.lora_B)
    ids = input_ids()
    expected = logits(ours, ids)
    torch.testing.assert_close(logits(theirs.eval(), ids), expected, rtol=1e-12, atol=1e-12)
    # peft loads our files, and we load peft's
    save_adapter(ours, tmp_path / "ours")
    peft_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(peft_loaded, ids), expected, rtol=1e-12, atol=1e-12)
    theirs.save_pretrained(tmp_path / "theirs")
    ours_loaded = load_adapter(copy.deepcopy(model), tmp_path / "theirs")
    torch.testing.assert_close(logits(ours_loaded, ids), expected, rtol=1e-12, atol=1e-12)
    # the same merged weights
    merged = theirs.merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), logits(merge_lora(ours), ids), rtol=1e-12, atol=1e-12)
