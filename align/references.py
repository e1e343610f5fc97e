"""The reference manager: the one object the trainer asks for reference log-probs.

A reference *kind* is a `Reference` subclass registered by name; the config's `reference:` section picks one and
gives its parameters (`reference: {kind: frozen, name_or_path: ...}`). The trainer only calls the interface:

    reference.prepare(accelerator)          # once, after the accelerator exists (device placement, ZeRO-3 sharding)
    reference.logps(policy, batch)          # PairLogps under no_grad, for a SharedPromptCollator batch
    reference.on_step_end(policy, step)     # after every optimizer step (TR-DPO moves the reference here)
    reference.state_dict() / load_state_dict(state)   # carried by every checkpoint

Kinds here: `frozen` (a frozen copy of the initial policy, or another model) and `peft_disabled` (the policy's
base model with its LoRA adapter switched off: no second model in memory). `auto` picks `peft_disabled` for a
LoRA policy and `frozen` otherwise. Later kinds (`tr_dpo`, `soup`, `precomputed`) register the same way.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from align.errors import ConfigError
from align.logps import PairLogps, pair_logps
from align.modeling import ModelConfig, is_peft_model, load_causal_lm

REFERENCES: dict[str, type["Reference"]] = {}


def register_reference(kind: str):
    def decorator(cls):
        cls.kind = kind
        REFERENCES[kind] = cls
        return cls

    return decorator


class Reference(abc.ABC):
    """Base class of reference kinds. Subclasses set `Params` (a documented dataclass) and implement `logps`."""

    kind: ClassVar[str]

    @dataclass
    class Params:
        pass

    def __init__(self, params, *, policy, model_config: ModelConfig):
        self.params = params
        self.accelerator = None

    def prepare(self, accelerator) -> None:
        self.accelerator = accelerator

    @abc.abstractmethod
    def logps(self, policy, batch: dict) -> PairLogps:
        """Reference token log-probs of a `SharedPromptCollator` batch (no gradient)."""

    def on_step_end(self, policy, step: int) -> None:
        """Called after optimizer step `step` (1-based, counts optimizer steps, not micro-batches)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def reference_params(kind: str, params: dict[str, Any]):
    """Validates `params` for reference `kind`; errors name the key (`reference.<key>`)."""
    if kind not in REFERENCES:
        raise ConfigError(f"reference.kind: unknown kind '{kind}'; known: auto, {', '.join(sorted(REFERENCES))}")
    from align.config import from_dict  # the shared validator: value types and __post_init__ errors as dotted keys

    return from_dict(REFERENCES[kind].Params, params, "reference.", owner=f"reference kind '{kind}'")


def resolve_kind(kind: str, policy) -> str:
    if kind == "auto":
        return "peft_disabled" if is_peft_model(policy) else "frozen"
    return kind


def build_reference(kind: str, params: dict[str, Any], *, policy, model_config: ModelConfig) -> Reference:
    kind = resolve_kind(kind, policy)
    params = reference_params(kind, params)  # validates the kind too, before it is looked up
    return REFERENCES[kind](params, policy=policy, model_config=model_config)


@register_reference("frozen")
class FrozenReference(Reference):
    """A separate frozen model: by default the policy's initial weights, loaded again from the same path."""

    @dataclass
    class Params:
        name_or_path: str | None = field(
            default=None,
            metadata={"help": "Model to use as the reference (Hub id or folder). Default: the policy's "
                              "`model.name_or_path`, i.e. a frozen copy of the initial policy."},
        )

    def __init__(self, params, *, policy, model_config):
        super().__init__(params, policy=policy, model_config=model_config)
        # Loading from the path (rather than deep-copying the policy) also works under ZeRO-3, where the policy's
        # parameters are already partitioned when the reference is built.
        self.model = load_causal_lm(model_config, params.name_or_path).eval().requires_grad_(False)

    def prepare(self, accelerator) -> None:
        super().prepare(accelerator)
        if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
            from trl.models.utils import prepare_deepspeed

            # ZeRO-3 shards the reference like the policy; other stages keep a full copy per rank.
            self.model = prepare_deepspeed(self.model, accelerator)
        else:
            self.model = accelerator.prepare_model(self.model, evaluation_mode=True)

    @torch.no_grad()
    def logps(self, policy, batch) -> PairLogps:
        return pair_logps(self.model, batch)


@register_reference("peft_disabled")
class PeftDisabledReference(Reference):
    """The LoRA policy's base model with the adapter disabled: the reference costs no extra memory."""

    def __init__(self, params, *, policy, model_config):
        super().__init__(params, policy=policy, model_config=model_config)
        if not is_peft_model(policy):
            raise ConfigError("reference.kind: 'peft_disabled' needs a LoRA policy (set model.lora)")

    @torch.no_grad()
    def logps(self, policy, batch) -> PairLogps:
        peft_model = self.accelerator.unwrap_model(policy) if self.accelerator is not None else policy
        # Run the (possibly DDP/DeepSpeed-wrapped) policy itself so wrappers see a normal forward.
        with peft_model.disable_adapter() if is_peft_model(peft_model) else contextlib.nullcontext():
            return pair_logps(policy, batch)


# --- TR-DPO ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def soft_update_reference(reference: list[torch.Tensor], policy: list[torch.Tensor], alpha: float) -> None:
    """θ_ref ← α·θ + (1 − α)·θ_ref, in place, for matching lists of fp32 tensors (TR-DPO, METHODS §2).

    `torch.lerp` computes `end − (end − start)(1 − w)` for w ≥ 0.5, so α = 1 gives θ_ref == θ bit-exactly; α = 0
    leaves θ_ref untouched (the copy is skipped).
    """
    if alpha == 0.0:
        return
    if alpha == 1.0:
        torch._foreach_copy_(reference, policy)
    else:
        torch._foreach_lerp_(reference, policy, alpha)


@register_reference("tr_dpo")
class TRDPOReference(FrozenReference):
    """TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"): every `tau` optimizer
    steps the reference moves toward the policy, θ_ref ← α·θ + (1 − α)·θ_ref.

    The paper's soft update is `tau: 1` with α ∈ (0, 1); its hard update is `alpha: 1` every `tau` steps. TRL's
    `sync_ref_model` uses the same two knobs (`ref_model_mixup_alpha` = alpha, `ref_model_sync_steps` = tau;
    defaults 0.6 and 512 since TRL 0.16, 0.9 and 64 before): with both at their defaults it is a soft mix every 512
    steps, a hybrid of the paper's two schedules. Only parameters move; buffers are untouched.

    Mixing is done in fp32 on an fp32 master copy of the reference when the weights are in bf16/fp16: otherwise a
    small α rounds away and the reference never moves (METHODS §2, precision). The moved reference (master copy and
    update count) is part of every checkpoint.
    """

    @dataclass
    class Params:
        name_or_path: str | None = field(
            default=None, metadata={"help": "Initial reference (default: the policy's initial weights)."})
        alpha: float = field(
            default=0.6, metadata={"help": "Mixing weight α ∈ [0, 1]: 1 is a hard update (copy the policy), 0 never "
                                           "moves. TRL: ref_model_mixup_alpha."})
        tau: int = field(
            default=512, metadata={"help": "Update every tau optimizer steps (≥ 1); 1 is the paper's every-step soft "
                                           "update. TRL: ref_model_sync_steps."})

        def __post_init__(self):
            if isinstance(self.alpha, bool) or not 0.0 <= self.alpha <= 1.0:
                raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
            if isinstance(self.tau, bool) or self.tau < 1:
                raise ConfigError(f"tau must be an integer >= 1, got {self.tau}")

    def __init__(self, params, *, policy, model_config):
        if is_peft_model(policy):
            raise ConfigError("reference.kind: tr_dpo with a LoRA policy is not available yet (the reference must be "
                              "its own adapter); train full weights or use kind auto")
        super().__init__(params, policy=policy, model_config=model_config)
        self.updates = 0
        self._names = [name for name, _ in self.model.named_parameters()]
        low_precision = any(p.dtype != torch.float32 for p in self.model.parameters())
        self._master = [p.detach().float().clone() for p in self.model.parameters()] if low_precision else None

    def prepare(self, accelerator) -> None:
        if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
            raise ConfigError("reference.kind: tr_dpo under DeepSpeed is not available yet (per-module ZeRO-3 "
                              "gathering is planned); run without training.deepspeed")
        super().prepare(accelerator)

    def _weights(self) -> list[torch.Tensor]:
        """The fp32 tensors the update acts on: the master copy, or the reference's own fp32 parameters."""
        return self._master if self._master is not None else [p.data for p in self.model.parameters()]

    def on_step_end(self, policy, step: int) -> None:
        if step % self.params.tau != 0:
            return
        policy_params = dict(policy.named_parameters())
        missing = [n for n in self._names if n not in policy_params]
        if missing:
            raise ValueError(f"tr_dpo: policy has no parameter {missing[0]!r}; reference and policy must share an "
                             "architecture")
        source = [policy_params[n].detach() for n in self._names]
        if self._master is not None:
            source = [p.float() for p in source]
        soft_update_reference(self._weights(), source, self.params.alpha)
        if self._master is not None:
            torch._foreach_copy_([p.data for p in self.model.parameters()], self._master)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates,
                "weights": {n: w.detach().cpu().clone() for n, w in zip(self._names, self._weights())}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["weights"]
        if list(weights) != self._names:
            raise ValueError("tr_dpo: the checkpoint's reference does not match this model's parameters")
        with torch.no_grad():
            torch._foreach_copy_(self._weights(), [weights[n] for n in self._names])
            if self._master is not None:
                torch._foreach_copy_([p.data for p in self.model.parameters()], self._master)
        self.updates = state["updates"]


# --- SALSA ----------------------------------------------------------------------------------------------------


@register_reference("soup")
class SoupReference(FrozenReference):
    """SALSA (Chegini et al. 2024): the reference is the weight average Σ_k w_k θ_k of several SFT checkpoints
    (same architecture and tokenizer), built in memory in fp32. The policy may start from the soup (write it first
    with `align soup`) or from one ingredient."""

    @dataclass
    class Params:
        checkpoints: list[str] = field(
            default_factory=list, metadata={"help": "Two or more full-weight checkpoints (save_pretrained folders)."})
        weights: list[float] | None = field(
            default=None, metadata={"help": "Mixing weights, >= 0 and summing to 1; default uniform (SALSA's ½, ½)."})

        def __post_init__(self):
            from align.soup import soup_weights

            try:
                self.weights = soup_weights(self.weights, len(self.checkpoints))
            except ConfigError as e:
                field_name = "checkpoints" if len(self.checkpoints) < 2 else "weights"
                raise ConfigError(f"{field_name}: {e}") from None

    def __init__(self, params, *, policy, model_config):
        from align.soup import build_soup

        Reference.__init__(self, params, policy=policy, model_config=model_config)
        try:
            model, _ = build_soup(params.checkpoints, params.weights,
                                  attn_implementation=model_config.attn_implementation)
        except ConfigError as e:
            raise ConfigError(f"reference.checkpoints: {e}") from None
        self.model = model.to(model_config.torch_dtype()).eval().requires_grad_(False)
