"""Memory levers of the trained policy, set up from the arguments: LoRA, gradient checkpointing,
the fused LM head, and π_ref without a second copy of the weights.

- ``--gradient-checkpointing``: a decoder layer keeps only its input during the forward and runs
  again during the backward, so the activations kept for the backward shrink from every
  intermediate of every layer to one ``[B, L, D]`` tensor per layer, for about one more forward
  pass of compute. The numbers are the same (``tests/test_train_levers.py``).
- ``--lora-rank r``: the base weights are frozen, held in the compute dtype (bf16 on a GPU: 2 bytes
  per parameter instead of float32's 4 + gradient 4 + AdamW 8), and only LoRA adapters train
  (``models/lora.py``). π_ref is then the same model with its adapters switched off
  (``BaseModelView``): one copy of the base weights serves both. Checkpoints hold the adapters;
  the final model is the merged one, plus the adapters in ``final/adapter``.
- ``--fused-head``: the policy's training log-probs come from ``fused_response_logprobs``, which
  never builds the ``[B, T, V]`` logits.
"""
from minirlhf.errors import MinirlhfError
from minirlhf.models.forward import fused_response_logprobs, response_logprobs
from minirlhf.models.lora import BaseModelView, LoRAConfig, apply_lora, load_adapter
from minirlhf.models.policy import load_policy, make_reference
from minirlhf.train.distributed import world_size
from minirlhf.train.runtime import TRAIN_DTYPE


def lora_settings(args):
    """The ``LoRAConfig`` of ``--lora-rank``, ``--lora-alpha`` and ``--lora-targets``."""
    targets = tuple(name.strip() for name in args.lora_targets.split(",") if name.strip())
    if not targets:
        raise MinirlhfError("--lora-targets: give the module names to adapt, e.g. q_proj,v_proj")
    return LoRAConfig(r=args.lora_rank, alpha=args.lora_alpha, target_modules=targets)


def load_trained_policy(args, resume_from, device, dtype):
    """The policy to train, from checkpoint ``resume_from`` when resuming.

    Full fine-tuning: float32 weights of ``resume_from or args.model``. LoRA: ``args.model``'s
    weights frozen in ``dtype`` (the compute dtype) with adapters, new (seeded by ``args.seed``)
    or read back from ``resume_from``. Gradient checkpointing on with ``--gradient-checkpointing``.
    """
    if args.lora_rank and args.fsdp:
        raise MinirlhfError("--lora-rank with --fsdp: FSDP shards what trains, and with LoRA that is a few "
                            "megabytes of adapters; run LoRA without --fsdp (DDP)")
    if args.fused_head and world_size() > 1:
        raise MinirlhfError("--fused-head calls the model's backbone and head directly, around DDP/FSDP's "
                            "forward (which syncs gradients); use it in one process")
    if not args.lora_rank:
        policy = load_policy(str(resume_from or args.model), dtype=TRAIN_DTYPE, device=device,
                             keep_dropout=args.keep_dropout)
    else:
        policy = load_policy(args.model, dtype=dtype, device=device, keep_dropout=args.keep_dropout)
        apply_lora(policy, lora_settings(args), seed=args.seed)
        if resume_from:
            load_adapter(policy, resume_from)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    return policy


def enable_gradient_checkpointing(model):
    """Recompute each decoder layer in the backward (non-reentrant ``torch.utils.checkpoint``) of a
    Hugging Face model, or of a reward/value model's backbone; returns ``model``.

    Only in ``train()`` mode: evaluation, sampling and reference passes run as before. The
    non-reentrant checkpoint also passes gradients to LoRA adapters whose layer inputs do not
    require grad (the reentrant one needed PEFT's ``enable_input_require_grads``).
    """
    target = getattr(model, "backbone", model)
    if not getattr(target, "supports_gradient_checkpointing", False):
        raise MinirlhfError(f"--gradient-checkpointing: {type(target).__name__} does not support it")
    if hasattr(target, "activation_checkpointing_enable"):  # its name since transformers 5.x
        target.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def reference_policy(args, policy, device, dtype):
    """π_ref: with LoRA (and no ``--ref-model``) the policy's base model, ``BaseModelView(policy)``;
    else ``--ref-model`` or ``--model`` loaded frozen in ``dtype`` (the compute dtype)."""
    ref_model = getattr(args, "ref_model", None)
    if args.lora_rank and not ref_model:
        return BaseModelView(policy)
    return make_reference(load_policy(ref_model or args.model, dtype=dtype, device=device))


def policy_logprobs(args):
    """The function that computes the policy's per-token log-probs in a training forward:
    ``fused_response_logprobs`` with ``--fused-head``, else ``response_logprobs`` (same arguments)."""
    return fused_response_logprobs if getattr(args, "fused_head", False) else response_logprobs
