"""Reference kind `tr_dpo`: TR-DPO soft/hard reference updates (METHODS §2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from align.errors import ConfigError
from align.modeling import is_peft_model
from align.references.base import register_reference
from align.references.frozen import FrozenReference


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
        rank: int | None = field(
            default=None, metadata={"help": "LoRA policies only: rank of the reference adapter (default: the policy "
                                            "adapter's rank). A larger rank makes soft updates more exact; see "
                                            "align/references/tr_dpo_lora.py."})

        def __post_init__(self):
            if isinstance(self.alpha, bool) or not 0.0 <= self.alpha <= 1.0:
                raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
            if isinstance(self.tau, bool) or self.tau < 1:
                raise ConfigError(f"tau must be an integer >= 1, got {self.tau}")
            if self.rank is not None and (isinstance(self.rank, bool) or self.rank < 1):
                raise ConfigError(f"rank must be an integer >= 1, got {self.rank}")

    @classmethod
    def build(cls, params, *, policy, model_config):
        if is_peft_model(policy):
            # A LoRA policy gets its reference as a second adapter on the same base model (no second base copy).
            from align.references.tr_dpo_lora import LoraTRDPOReference

            return LoraTRDPOReference(params, policy=policy, model_config=model_config)
        if params.rank is not None:
            raise ConfigError("reference.rank: only for a LoRA policy (set model.lora), the policy here trains full "
                              "weights")
        return cls(params, policy=policy, model_config=model_config)

    def __init__(self, params, *, policy, model_config):
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
