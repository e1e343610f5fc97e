"""The policy's current weights as a stream of `(checkpoint name, tensor)` pairs, for a rollout engine to load.

A rollout engine (vLLM) loads checkpoints, so it is handed the policy the way a checkpoint of the *base* model would
hold it, one tensor at a time, in the model's module order, without ever materialising a state dict:

- **Wrappers** (DDP, a DeepSpeed engine) are unwrapped (`.module`).
- **PEFT (LoRA)**: each LoRA layer is sent as its merged weight W₀ + Σ_active s·B·A (PEFT's own `get_delta_weight`)
  under the base model's name (`model.layers.0.self_attn.q_proj.weight`), never the LoRA factors; a
  `modules_to_save` copy is sent under the original module's name.
- **DeepSpeed ZeRO-3**: the parameters of one module (a LoRA layer together with its factors) are gathered at a time,
  read-only (`GatheredParameters(..., modifier_rank=None)`, a collective every rank runs in the same order), copied,
  and released before the next module; the whole model is never gathered. The copy is needed because the engine may
  hold a tensor until its layer's other weights arrive (vLLM buffers q/k/v before packing them), while DeepSpeed
  reuses the gathered storage.
- **Tied weights** are sent once, under their first name (as `named_parameters` and `save_pretrained` do).

Buffers are not sent: they are not trained (rotary tables are recomputed by the engine).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def unwrap(model):
    """The model inside DDP / DeepSpeed wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _is_zero3(params) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


@contextlib.contextmanager
def _gathered(params: list[torch.nn.Parameter]):
    """All of `params` in full for the duration (ZeRO-3: gathered read-only; otherwise a no-op)."""
    if params and _is_zero3(params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield True
    else:
        yield False


def _peft_parts(model):
    """(base model, LoRA layer classes, ModulesToSaveWrapper class, active adapter names) of a PEFT model, or None."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return None
    if not isinstance(model, PeftModel):
        return None
    return model.get_base_model(), BaseTunerLayer, ModulesToSaveWrapper


def _merged_lora_weight(layer) -> torch.Tensor:
    """W₀ + Σ_active s·B·A of a LoRA layer, in the base weight's dtype (the adapter's fp32 delta added in fp32)."""
    base = layer.get_base_layer().weight
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return base.detach().clone()  # merged: W already holds the delta; disabled: W₀ is what the policy uses
    weight = base.detach().float()
    for name in layer.active_adapters:
        if name in getattr(layer, "lora_A", {}):
            weight = weight + layer.get_delta_weight(name).detach().float()
    return weight.to(base.dtype)


def iter_policy_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields `(name, tensor)` for every parameter of `model` as its base checkpoint names it (see module docstring).

    Args:
        model: a transformers model, a PEFT model around one, or either inside DDP / a DeepSpeed engine, possibly
            ZeRO-3 partitioned (then every rank must consume the whole stream: each module's gather is a
            collective).

    Yields:
        `(name, tensor)` in module order; each tensor is detached, on the model's device and in its dtype.
    """
    model = unwrap(model)
    peft = _peft_parts(model)
    if peft is None:
        root, lora_cls, save_cls = model, (), ()
    else:
        root, lora_cls, save_cls = peft
    seen: set[int] = set()
    skip_under: list[str] = []  # prefixes of modules already sent as a whole (LoRA layers, modules_to_save)

    for prefix, module in root.named_modules():
        if any(prefix.startswith(s + ".") for s in skip_under):
            continue
        if lora_cls and isinstance(module, lora_cls) and hasattr(module, "get_delta_weight"):
            skip_under.append(prefix)
            params = list(module.parameters())
            base = module.get_base_layer()
            with _gathered(params):
                yield f"{prefix}.weight", _merged_lora_weight(module)
                if getattr(base, "bias", None) is not None:
                    yield f"{prefix}.bias", base.bias.detach().clone()
            seen.update(id(p) for p in params)
            continue
        if save_cls and isinstance(module, save_cls):
            skip_under.append(prefix)
            active = module.active_adapters[0] if getattr(module, "active_adapters", None) else None
            source = (module.modules_to_save[active] if active in getattr(module, "modules_to_save", {})
                      and not getattr(module, "disable_adapters", False) else module.original_module)
            params = list(module.parameters())
            with _gathered(params) as zero3:
                for name, p in source.named_parameters():
                    if id(p) not in seen:
                        yield f"{prefix}.{name}", p.detach().clone() if zero3 else p.detach()
            seen.update(id(p) for p in params)
            continue
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        with _gathered([p for _, p in own]) as zero3:
            for name, p in own:
                yield f"{prefix}.{name}" if prefix else name, p.detach().clone() if zero3 else p.detach()
        seen.update(id(p) for _, p in own)
