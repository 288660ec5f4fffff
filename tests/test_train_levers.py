"""The trainers' memory levers (issue 13): gradient checkpointing, LoRA, fp16 loss scaling, the fused
head, the float32 reward head, entropy without gradient, the final model's dtype.

Each test runs a tiny model for a few steps on the CPU and checks a property that fails when the
lever is wired wrong: the same numbers with and without checkpointing (and the layers really run
twice), π_ref = adapters off = the base model, exact resume with adapters, a skipped fp16 step.
"""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from fixtures import write_jsonl
from minirlhf.models.forward import response_logprobs, rollout_logprobs
from minirlhf.models.lora import BaseModelView, load_adapter, lora_modules
from minirlhf.models.policy import load_policy, load_tokenizer
from minirlhf.models.reward_model import RewardModel
from minirlhf.toy.language import all_prompts
from minirlhf.train.checkpoints import latest_checkpoint
from minirlhf.train.dpo import DPOArgs, train_dpo
from minirlhf.train.grpo import GRPOArgs, train_grpo
from minirlhf.train.levers import load_trained_policy, reference_policy
from minirlhf.train.metrics import read_metrics
from minirlhf.train.optim import DivergenceGuard, backward_weighted, make_optimizer, make_scheduler, optimizer_step
from minirlhf.train.precision import LossScaler, choose_precision
from minirlhf.train.sft import SFTArgs, sft_loss, train_sft

QUIET = dict(progress=False, tensorboard=False, seed=0)
DPO = dict(max_len=64, batch_size=8, epochs=1, lr=1e-2, warmup_ratio=0.0, lr_schedule="constant", beta=0.5, **QUIET)


def batch_of(tokenizer, texts, device="cpu"):
    """A left-padded batch whose second half of every row is the response."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:12] for t in texts]
    length = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(r)) + r for r in rows])
    attention = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    response = torch.tensor([[0] * (length - len(r) // 2) + [1] * (len(r) // 2) for r in rows])
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response}


@pytest.fixture(scope="module")
def texts():
    return [p.text for p in all_prompts()[:4]]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    records = [{"prompt": p.text} for p in all_prompts()[::97][:8]]
    return str(write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", records))


def with_random_adapters(model, seed=1):
    """Give every LoRA B a random value, so that the adapted model differs from its base."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=generator) * 0.05)
    return model


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(qwen2_checkpoint, tiny_tokenizer, texts, lora_rank):
    batch = batch_of(tiny_tokenizer, texts)
    results = []
    for checkpointing in (False, True):
        args = SFTArgs(model=str(qwen2_checkpoint), lora_rank=lora_rank, gradient_checkpointing=checkpointing)
        model = load_trained_policy(args, None, "cpu", torch.float32).train()
        if lora_rank:
            with_random_adapters(model)
        calls = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        loss, _ = sft_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing recomputes the layer in the backward
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and all(n.endswith(("lora_A", "lora_B")) for n in grads_a) == bool(lora_rank)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# LoRA: π_ref is the base model, training, resume, merged export
# ---------------------------------------------------------------------------------------------


def test_the_reference_of_a_lora_policy_is_the_separately_loaded_base_model(qwen2_checkpoint, tiny_tokenizer, texts):
    args = GRPOArgs(model=str(qwen2_checkpoint), lora_rank=4)
    policy = with_random_adapters(load_trained_policy(args, None, "cpu", torch.float32)).train()
    reference = reference_policy(args, policy, "cpu", torch.float32)
    assert isinstance(reference, BaseModelView)
    batch = batch_of(tiny_tokenizer, texts)
    base = load_policy(str(qwen2_checkpoint)).eval()
    ref_logprobs, mask = rollout_logprobs(reference, batch, micro_batch_size=3)
    torch.testing.assert_close(ref_logprobs, rollout_logprobs(base, batch)[0], rtol=1e-5, atol=1e-6)
    assert (rollout_logprobs(policy, batch)[0] - ref_logprobs)[mask.bool()].abs().max() > 1e-3  # adapters on again
    assert policy.training  # the view restored the policy's mode
    assert all(p.dtype == torch.bfloat16 for n, p in load_trained_policy(args, None, "cpu", torch.bfloat16)
               .named_parameters() if "lora_" not in n)  # frozen base weights in the compute dtype


def test_dpo_with_lora_trains_resumes_exactly_and_exports_a_merged_model(toy, tmp_path):
    base = dict(model=toy["model"], data=str(toy["data"].pref_train), eval_data=str(toy["data"].pref_train),
                lora_rank=4, lora_alpha=8.0, lora_targets="q_proj,v_proj,down_proj", eval_every=3, **DPO)
    straight = train_dpo(DPOArgs(out=str(tmp_path / "a"), **base))
    rows, evals = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "a", "eval")
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # B = 0: the policy starts at π_ref exactly
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.01  # the training pairs' loss falls
    # A checkpoint holds the adapters (PEFT layout), not the base weights.
    checkpoint = tmp_path / "a" / "checkpoints" / "step-000006"
    assert (checkpoint / "adapter_model.safetensors").exists() and not (checkpoint / "model.safetensors").exists()
    # Resume: the same adapters, the same metrics.
    train_dpo(DPOArgs(out=str(tmp_path / "b"), stop_at_step=3, **base))
    resumed = train_dpo(DPOArgs(out=str(tmp_path / "b"), resume=True, **base))
    for a, b in zip(AutoModelForCausalLM.from_pretrained(straight).state_dict().values(),
                    AutoModelForCausalLM.from_pretrained(resumed).state_dict().values()):
        assert torch.equal(a, b)
    assert read_metrics(tmp_path / "b") == rows and read_metrics(tmp_path / "b", "eval") == read_metrics(tmp_path / "a", "eval")
    # The merged export is a plain model equal to base + adapters, and not the base model.
    merged = AutoModelForCausalLM.from_pretrained(straight).eval()
    adapted = load_adapter(load_policy(toy["model"]), straight / "adapter").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
    assert (merged(ids).logits - load_policy(toy["model"])(ids).logits).abs().max() > 1e-3


def test_grpo_with_lora_starts_at_zero_kl_trains_and_resumes_exactly(qwen2_checkpoint, prompt_file, tmp_path):
    def make(out, **kw):
        return GRPOArgs(model=str(qwen2_checkpoint), data=prompt_file, template="prompt", reward="gold", steps=3,
                        batch_size=2, group_size=3, lr=3e-2, max_new_tokens=6, lora_rank=4, out=str(out), **QUIET, **kw)

    straight = train_grpo(make(tmp_path / "a"))
    rows = read_metrics(tmp_path / "a")
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] != 0.0  # π_ref = adapters off = π_θ until B moves
    base, trained = (AutoModelForCausalLM.from_pretrained(p) for p in (qwen2_checkpoint, straight))
    assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), trained.state_dict().values()))
    train_grpo(make(tmp_path / "b", stop_at_step=1))
    resumed = AutoModelForCausalLM.from_pretrained(train_grpo(make(tmp_path / "b", resume=True)))
    for a, b in zip(trained.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert read_metrics(tmp_path / "b") == rows


def test_lora_is_refused_with_fsdp_and_the_reward_model_trainer_has_no_lora_flags():
    from minirlhf.errors import MinirlhfError
    from minirlhf.train.rm import RMArgs

    with pytest.raises(MinirlhfError, match="--fsdp"):
        load_trained_policy(SFTArgs(model="unused", lora_rank=4, fsdp=True), None, "cpu", torch.float32)
    assert not hasattr(RMArgs(), "lora_rank")


# ---------------------------------------------------------------------------------------------
# Precision: fp16 loss scaling, the float32 reward head
# ---------------------------------------------------------------------------------------------


def test_precision_auto_is_bf16_on_a_gpu_that_has_it_else_fp16_and_fp32_on_the_cpu(monkeypatch):
    assert choose_precision("auto", "cpu") == "fp32" and choose_precision("fp16", "cpu") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_precision("auto", "cuda") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision("auto", "cuda") == "bf16"


def test_an_overflowing_fp16_gradient_skips_the_step_counts_it_and_halves_the_scale():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = make_optimizer(model.parameters(), lr=0.1)
    scheduler = make_scheduler(optimizer, 10, schedule="constant")
    scaler, guard = LossScaler("cpu"), DivergenceGuard(lambda: None)
    scale = scaler.metrics()["loss_scale"]

    def step(poison):
        loss = model(torch.ones(2, 4)).pow(2).mean()
        totals = backward_weighted(loss, {}, 1.0, {}, guard=guard, step=0, example_ids=[0], scaler=scaler)
        torch.testing.assert_close(model.bias.grad, scale * 2 * model(torch.ones(1, 4)).detach()[0])  # scaled by S
        if poison:
            model.weight.grad[0, 0] = float("inf")
        return totals, optimizer_step(model, optimizer, scheduler, 1.0, guard=guard, step=0, example_ids=[0],
                                      scaler=scaler)

    before = [p.detach().clone() for p in model.parameters()]
    _, metrics = step(poison=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # skipped, not a divergence
    assert metrics["skipped_steps"] == 1 and metrics["loss_scale"] == scale / 2
    scale /= 2
    _, metrics = step(poison=False)
    assert not torch.equal(before[0], model.weight) and metrics["skipped_steps"] == 1
    restored = LossScaler("cpu")
    restored.load_state_dict(scaler.state_dict())
    assert restored.metrics() == scaler.metrics()


def test_dpo_in_fp16_logs_the_loss_scale_and_resumes_exactly(toy, tmp_path):
    base = dict(model=toy["model"], data=str(toy["data"].pref_train), eval_data=str(toy["data"].pref_test),
                precision="fp16", **DPO)
    train_dpo(DPOArgs(out=str(tmp_path / "a"), **base))
    rows = read_metrics(tmp_path / "a")
    assert {"loss_scale", "skipped_steps"} <= set(rows[0]) and rows[0]["loss_scale"] == 65536.0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    train_dpo(DPOArgs(out=str(tmp_path / "b"), stop_at_step=3, **base))
    train_dpo(DPOArgs(out=str(tmp_path / "b"), resume=True, **base))
    assert read_metrics(tmp_path / "b") == rows  # the scaler's state came back from the checkpoint


def test_the_reward_head_runs_in_float32_under_bf16_autocast(qwen2_checkpoint, tiny_tokenizer, texts):
    model = RewardModel.from_causal_lm(str(qwen2_checkpoint), dtype=torch.bfloat16).eval()
    assert model.score_head.weight.dtype == torch.float32
    batch = batch_of(tiny_tokenizer, texts)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model.token_scores(batch["input_ids"], batch["attention_mask"])
        hidden = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)).last_hidden_state
    expected = hidden.double() @ model.score_head.weight.double().T
    torch.testing.assert_close(scores.double(), expected[..., 0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Entropy without gradient, the fused head, micro-batched evaluation, the final dtype
# ---------------------------------------------------------------------------------------------


def test_entropy_is_computed_without_gradient_when_it_is_not_trained(tiny_policy, tiny_tokenizer, texts):
    batch = batch_of(tiny_tokenizer, texts)
    args = (tiny_policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    logprobs, _, entropy = response_logprobs(*args, return_entropy=True, entropy_grad=False)
    assert logprobs.requires_grad and not entropy.requires_grad
    torch.testing.assert_close(entropy, response_logprobs(*args, return_entropy=True)[2].detach())


def test_fused_head_checkpointing_and_micro_batched_evaluation_train_like_the_plain_path(toy, tmp_path):
    # lr 1e-3: Adam turns a float-rounding difference in a near-zero gradient into up to lr of
    # movement, and the levers sum in another order; a wrong gradient still moves weights by ~lr.
    base = dict(model=toy["model"], data=str(toy["data"].pref_train), eval_data=str(toy["data"].pref_test),
                stop_at_step=3, eval_every=3, **{**DPO, "lr": 1e-3})
    plain = train_dpo(DPOArgs(out=str(tmp_path / "plain"), **base))
    levers = train_dpo(DPOArgs(out=str(tmp_path / "levers"), fused_head=True, gradient_checkpointing=True,
                               micro_batch_size=3, **base))
    for a, b in zip(AutoModelForCausalLM.from_pretrained(plain).state_dict().values(),
                    AutoModelForCausalLM.from_pretrained(levers).state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for split in ("train", "eval"):
        for a, b in zip(read_metrics(tmp_path / "plain", split), read_metrics(tmp_path / "levers", split), strict=True):
            assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5) for k in a)


@pytest.mark.parametrize("save_fp32", [False, True])
def test_the_final_model_is_saved_in_the_base_models_dtype(toy, tmp_path, save_fp32):
    model_dir = tmp_path / "bf16-model"
    load_policy(toy["model"]).to(torch.bfloat16).save_pretrained(model_dir)
    load_tokenizer(toy["model"]).save_pretrained(model_dir)
    final = train_sft(SFTArgs(model=str(model_dir), data=str(toy["data"].sft_train), out=str(tmp_path / "run"),
                              batch_size=48, max_len=64, save_fp32=save_fp32, **QUIET))
    expected = torch.float32 if save_fp32 else torch.bfloat16
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {expected}
    assert json.loads((final / "config.json").read_text())["dtype"] == str(expected).removeprefix("torch.")
    with safe_open(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # checkpoints resume exactly
    assert AutoModelForCausalLM.from_pretrained(final).dtype == expected
