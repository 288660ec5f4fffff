"""LoRA, written by hand: train a low-rank update of frozen weights (Hu et al. 2021).

For a frozen linear layer ``h = W x + b`` (``W`` ``[out, in]``), LoRA trains two small matrices::

    h = W x + b + (α / r) · B A x          A [r, in], B [out, r], r ≪ min(in, out)

so the weight the model uses is ``W + ΔW`` with ``ΔW = (α/r) B A``, a matrix of rank ≤ r. Only A
and B get gradients and AdamW states: at r = 16 on Qwen2.5-0.5B's seven projections per layer
that is 8.8M trainable parameters instead of 494M (``benchmarks/memory_table.py``).

- **Init.** ``B = 0``, so ``ΔW = 0`` and the adapted model starts *exactly* at the base model.
  ``A`` is random (Kaiming-uniform, as ``nn.Linear`` initialises its own weight; PEFT's default):
  were both zero, ``∂L/∂B = (α/r) g (A x)ᵀ`` and ``∂L/∂A = (α/r) Bᵀ g xᵀ`` would both vanish and
  nothing would ever move. With ``A`` random, ``B`` moves first, then ``A``.
- **Scaling α/r.** ``B A x`` sums r terms, so its size grows with r; dividing by r keeps the
  update's scale (and a good learning rate) roughly the same when r changes. ``α`` sets it.
- **The reference policy for free.** π_ref is the base model, which is the same network with the
  adapters switched off: ``with adapters_disabled(model): ...`` computes log π_ref with the *one*
  copy of the base weights that the policy already holds (DPO, PPO and GRPO need no second model).
- **Merge.** ``W ← W + (α/r) B A`` gives a plain model with no extra matmuls (``merge_lora``);
  ``unmerge_lora`` subtracts it again (exact up to one rounding of ``W``'s dtype).
- **Files.** ``save_adapter`` writes PEFT's layout — ``adapter_model.safetensors`` with keys
  ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` and ``adapter_config.json`` — so
  ``peft.PeftModel.from_pretrained(base, dir)`` loads our adapters and ``load_adapter`` loads
  PEFT's. ``save_merged`` writes the merged model as a plain Hugging Face checkpoint.
"""
import contextlib
import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from minirlhf.errors import MinirlhfError

# Qwen2's (and Llama's, Mistral's) attention and MLP projections.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass
class LoRAConfig:
    """What ``apply_lora`` needs; saved as PEFT's ``adapter_config.json``."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple = DEFAULT_TARGET_MODULES


class LoRALinear(nn.Module):
    """``h = W x + b + (α/r) · B A dropout(x)`` around a frozen ``nn.Linear`` (``base_layer``).

    Shapes: ``x`` ``[..., in]`` -> ``[..., out]``; ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``.
    ``A`` and ``B`` are kept in float32 (float64 for a float64 base) even over a bf16 base, so
    AdamW's small updates are not rounded away; under autocast their matmuls run in bf16 like the
    rest. Dropout (on the LoRA branch's input only) is active in ``train()`` mode.
    """

    def __init__(self, base_layer, r, alpha, dropout=0.0, generator=None):
        super().__init__()
        if type(base_layer) is not nn.Linear:
            raise MinirlhfError(f"LoRA: can only adapt nn.Linear layers, got {type(base_layer).__name__}")
        if r < 1:
            raise MinirlhfError(f"LoRA: rank r must be >= 1, got {r}")
        self.base_layer = base_layer.requires_grad_(False)
        self.r, self.alpha, self.scaling, self.dropout_p = r, alpha, alpha / r, dropout
        weight = base_layer.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        a = torch.empty(r, base_layer.in_features, dtype=dtype)  # drawn on the CPU: the same A on any device
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, dtype=dtype, device=weight.device))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True  # False inside ``adapters_disabled``
        self.merged = False

    def forward(self, x):
        out = self.base_layer(x)
        if self.merged or not self.enabled:
            return out
        update = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)  # B A x
        return out + (update * self.scaling).to(out.dtype)

    def delta_weight(self):
        """``ΔW = (α/r) B A``, ``[out, in]``, in float32 (float64 for a float64 adapter)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self):
        """``W ← W + ΔW``: the LoRA branch is then skipped (the same outputs, one matmul)."""
        if not self.merged:
            weight = self.base_layer.weight
            weight.copy_(weight.to(self.lora_A.dtype) + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """``W ← W − ΔW``: back to the frozen base weight and the separate branch."""
        if self.merged:
            weight = self.base_layer.weight
            weight.copy_(weight.to(self.lora_A.dtype) - self.delta_weight())
            self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}, enabled={self.enabled}"


def apply_lora(model, config=None, seed=0):
    """Freeze ``model`` and wrap each ``nn.Linear`` named in ``config.target_modules`` in a ``LoRALinear``.

    A module matches when the last part of its name is a target (``q_proj`` matches
    ``model.layers.3.self_attn.q_proj``), as in PEFT. In place; returns the model, whose only
    trainable parameters are then the ``lora_A``/``lora_B`` of every adapted layer. ``seed`` fixes
    the random ``A`` matrices.
    """
    config = config or LoRAConfig()
    if lora_modules(model):
        raise MinirlhfError("apply_lora: the model already has LoRA adapters")
    targets = [name for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in config.target_modules and isinstance(module, nn.Linear)]
    if not targets:
        raise MinirlhfError(f"apply_lora: no nn.Linear named any of {list(config.target_modules)} in "
                            f"{type(model).__name__}")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), config.r, config.alpha, config.dropout, generator))
    return model


def lora_modules(model):
    """``{module name: LoRALinear}`` of every adapted layer, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_config(model):
    """The ``LoRAConfig`` the model's adapters were made with (one r, α and dropout for all)."""
    modules = lora_modules(model)
    if not modules:
        raise MinirlhfError("the model has no LoRA adapters (apply_lora or load_adapter first)")
    settings = {(m.r, m.alpha, m.dropout_p) for m in modules.values()}
    if len(settings) > 1:
        raise MinirlhfError(f"LoRA adapters with different r/alpha/dropout: {sorted(settings)}")
    (r, alpha, dropout), = settings
    targets = tuple(dict.fromkeys(name.rsplit(".", 1)[-1] for name in modules))
    return LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=targets)


@contextlib.contextmanager
def adapters_disabled(model):
    """Inside the ``with`` block the model computes the base model exactly: π_ref from π_θ's weights.

    Every ``LoRALinear`` returns ``W x + b`` alone; the adapters come back on exit, even after an
    exception. Merged adapters cannot be switched off (their ``ΔW`` is inside ``W``): unmerge first.
    """
    modules = list(lora_modules(model).values())
    if any(m.merged for m in modules):
        raise MinirlhfError("adapters_disabled: the adapters are merged into the weights; call unmerge_lora first")
    states = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, state in zip(modules, states):
            m.enabled = state


class BaseModelView:
    """The base model of an adapted ``model``, without a copy: calling the view calls ``model`` in
    eval mode with its adapters switched off (``adapters_disabled``), then restores both.

    What the trainers use as π_ref with LoRA: ``response_logprobs(BaseModelView(policy), ...)`` is
    log π_ref. It holds no weights of its own (it is not an ``nn.Module``); ``eval()`` is a no-op,
    so code written for a separate reference model takes it unchanged.
    """

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        training = self.model.training
        self.model.eval()
        try:
            with adapters_disabled(self.model):
                return self.model(*args, **kwargs)
        finally:
            self.model.train(training)

    def eval(self):
        return self


def merge_lora(model):
    """``W ← W + (α/r) B A`` in every adapted layer (in place); returns the model."""
    for m in lora_modules(model).values():
        m.merge()
    return model


def unmerge_lora(model):
    """Undo ``merge_lora`` (in place); returns the model."""
    for m in lora_modules(model).values():
        m.unmerge()
    return model


def save_adapter(model, directory, base_model_name_or_path=None):
    """Write the adapters in PEFT's layout: ``adapter_model.safetensors`` + ``adapter_config.json``.

    Keys ``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and ``.lora_B.weight``
    (``[out, r]``). Written plainly, like ``save_pretrained``: wrap the call in
    ``data.atomic.write_dir_atomic`` for an all-or-nothing save (the trainers do). Returns the directory.
    """
    config, modules = lora_config(model), lora_modules(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in modules.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous()
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "target_modules": list(config.target_modules), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path or getattr(model.config, "_name_or_path", None),
    }
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2))
    return directory


def load_adapter(model, directory):
    """Load adapters saved by ``save_adapter`` (or PEFT) into ``model``; returns the model.

    A model without adapters gets them first (``apply_lora`` with the file's r, α, dropout and
    targets). Every adapted layer must find its ``lora_A``/``lora_B`` in the file with the right
    shape, and the file may hold nothing else: a mismatch names the file, the key and the shapes.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    if not lora_modules(model):
        apply_lora(model, config)
    path = directory / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(path))
    except (OSError, ValueError) as error:
        raise MinirlhfError(f"{path}: cannot read the adapter weights ({error})") from error
    modules = lora_modules(model)
    expected = {f"{_PEFT_PREFIX}{name}.{part}.weight": getattr(m, part)
                for name, m in modules.items() for part in ("lora_A", "lora_B")}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise MinirlhfError(f"{path}: adapter keys do not match the model's adapted layers; missing "
                            f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                            f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    with torch.no_grad():
        for key, parameter in expected.items():
            if tensors[key].shape != parameter.shape:
                raise MinirlhfError(f"{path}: {key} has shape {list(tensors[key].shape)}, the model expects "
                                    f"{list(parameter.shape)} (the file's r = {config.r}, the model's "
                                    f"adapters' r = {lora_config(model).r})")
            parameter.copy_(tensors[key])
    return model


def read_adapter_config(directory):
    """``LoRAConfig`` from ``<directory>/adapter_config.json`` (ours or PEFT's); clear errors otherwise."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise MinirlhfError(f"{path}: cannot read the adapter config ({error})") from error
    if raw.get("peft_type", "LORA") != "LORA" or raw.get("use_dora") or raw.get("use_rslora"):
        raise MinirlhfError(f"{path}: only plain LoRA adapters are supported (peft_type LORA, no DoRA/rsLoRA)")
    targets = raw.get("target_modules")
    if isinstance(targets, str) or not targets or raw.get("r") is None:
        raise MinirlhfError(f"{path}: expected 'r' and a list of 'target_modules', got {raw!r}")
    return LoRAConfig(r=int(raw["r"]), alpha=float(raw.get("lora_alpha", raw["r"])),
                      dropout=float(raw.get("lora_dropout", 0.0)), target_modules=tuple(targets))


def merged_state_dict(model, dtype=None, state=None):
    """The model's state dict as a plain model would have it, with ``W + ΔW`` for every adapted layer.

    ``<module>.base_layer.weight`` becomes ``<module>.weight`` (a new merged tensor; the live
    weights are not touched) and the LoRA matrices are dropped. ``dtype`` casts floating tensors
    (default: keep each one's dtype). ``state``: the state dict to start from (default
    ``model.state_dict()``; a sharded model without adapters passes its gathered whole tensors).
    """
    modules = lora_modules(model)
    if any(m.merged for m in modules.values()):
        raise MinirlhfError("merged_state_dict: the adapters are already merged; call unmerge_lora first")
    merged, cast = {}, {}  # cast: one converted copy per model tensor, so tied weights stay one tensor
    for key, tensor in (model.state_dict() if state is None else state).items():
        module_name, _, leaf = key.rpartition(".")
        owner = module_name.removesuffix(".base_layer")
        if owner in modules and module_name == owner:  # lora_A / lora_B
            continue
        if owner in modules and leaf == "weight":
            m = modules[owner]
            tensor = (tensor.to(m.lora_A.dtype) + m.delta_weight().detach()).to(dtype or tensor.dtype)
        elif dtype is not None and tensor.is_floating_point():
            tensor = cast.setdefault(tensor.data_ptr(), tensor.to(dtype))
        merged[f"{owner}.{leaf}" if owner in modules else key] = tensor
    return merged


def save_merged(model, directory, tokenizer=None, dtype=None, state=None):
    """Write ``W + ΔW`` as a plain Hugging Face checkpoint that ``AutoModelForCausalLM`` loads without minirlhf.

    ``config.json`` + ``model.safetensors`` via the model's own ``save_pretrained`` (tied
    embeddings stay tied), in ``dtype`` if given (e.g. the base model's bf16; the config says so
    too), plus the tokenizer if given. The adapters in memory are unchanged. A model without
    adapters is written as it is (in ``dtype``); ``state`` as in ``merged_state_dict``.
    """
    directory = Path(directory)
    model.save_pretrained(directory, state_dict=merged_state_dict(model, dtype, state))
    if dtype is not None:  # save_pretrained records the live parameters' dtype: record the file's
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        config_path.write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
