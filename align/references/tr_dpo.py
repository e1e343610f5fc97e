"""Reference kind `tr_dpo`: TR-DPO soft/hard reference updates (METHODS §2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from align.errors import AlignError, ConfigError
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

    moves = True

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
        self._master: list[torch.Tensor] | None = None  # fp32 copy of low-precision weights, made on first use

    def prepare(self, accelerator) -> None:
        super().prepare(accelerator)  # under DeepSpeed this wraps the reference in an engine (ZeRO-3: partitioned)
        for name, p in self._named_parameters():
            if getattr(p, "ds_secondary_tensor", None) is not None:
                raise ConfigError("training.deepspeed: tr_dpo does not support ZeRO++ hierarchical partitioning "
                                  f"(zero_hpz_partition_size > 1): {name} has a secondary partition")
            if str(getattr(getattr(p, "ds_tensor", None), "final_location", None)).endswith("nvme"):
                raise ConfigError("training.deepspeed: tr_dpo does not support offloading parameters to NVMe; "
                                  "use offload_param.device: cpu")

    # --- what this process holds ------------------------------------------------------------------------------

    def _named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The reference's parameters (tied weights once), without the DeepSpeed engine's `module.` prefix."""
        return list(getattr(self.model, "module", self.model).named_parameters())

    def _is_zero3(self) -> bool:
        return any(hasattr(p, "ds_tensor") for _, p in self._named_parameters())

    def _owned(self) -> list[torch.Tensor]:
        """Per parameter, the tensor this process owns: under ZeRO-3 its flat partition `[ceil(numel / world)]`
        (`ds_tensor`, zero-padded on the last rank), otherwise the whole parameter."""
        zero3 = self._is_zero3()
        return [p.ds_tensor if zero3 else p.data for _, p in self._named_parameters()]

    def _weights(self) -> list[torch.Tensor]:
        """The fp32 tensors the update acts on, shaped like `_owned()`: the reference's own tensors when they are
        fp32, else an fp32 master copy of them (bf16 would round a small α·(θ − θ_ref) away, METHODS §2)."""
        owned = self._owned()
        if all(t.dtype == torch.float32 for t in owned):
            return owned
        if self._master is None:
            self._master = [t.detach().float().clone() for t in owned]
        return self._master

    def _publish(self) -> None:
        """Makes the model use the updated weights: cast the master into the model's dtype; under ZeRO-3 also
        release the parameters DeepSpeed keeps gathered (persistent small ones), so the next forward re-gathers
        them from the updated partitions."""
        if self._master is not None:
            torch._foreach_copy_(self._owned(), self._master)
        if self._is_zero3():
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            gathered = [p for _, p in self._named_parameters() if p.ds_status == ZeroParamStatus.AVAILABLE]
            if gathered:
                gathered[0].partition(param_list=gathered, has_been_updated=False)

    # --- the update -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def on_step_end(self, policy, step: int) -> None:
        if step % self.params.tau != 0:
            return
        policy_params = dict(policy.named_parameters())
        names = [name for name, _ in self._named_parameters()]
        missing = [n for n in names if n not in policy_params]
        if missing:
            raise AlignError(f"tr_dpo: policy has no parameter {missing[0]!r}; reference and policy must share an "
                             "architecture")
        weights = self._weights()
        if self._is_zero3():
            self._mix_partitions(policy_params, weights)
        else:
            sources = [policy_params[n].detach().to(device=w.device, dtype=w.dtype) for n, w in zip(names, weights)]
            soft_update_reference(weights, sources, self.params.alpha)
        self._publish()
        self.updates += 1

    def _mix_partitions(self, policy_params: dict, weights: list[torch.Tensor]) -> None:
        """ZeRO-3: gather the policy one module at a time (never the whole model: peak extra memory is the largest
        module, not two full models as in TRL's SyncRefModelCallback) and mix each of this rank's reference partitions
        with the same slice of the gathered policy tensor. The reference itself is never gathered: its partitions are
        updated where they live, so "re-partitioning" costs no communication. Every rank runs this in the same module
        order, as `GatheredParameters` (a collective) requires."""
        import deepspeed

        root = getattr(self.model, "module", self.model)
        reference_params = dict(root.named_parameters())
        index = {name: i for i, name in enumerate(reference_params)}
        alpha = self.params.alpha
        for module_name, module in root.named_modules():
            names = [f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False)]
            names = [n for n in names if n in index]  # a tied weight is updated once, under its first name
            if not names:
                continue
            sources = [policy_params[n] for n in names]
            with deepspeed.zero.GatheredParameters(sources, modifier_rank=None):  # read-only: nothing written back
                for name, source in zip(names, sources):
                    partition = reference_params[name].ds_tensor
                    weight = weights[index[name]]
                    start = partition.ds_numel * deepspeed.comm.get_rank(group=reference_params[name].ds_process_group)
                    piece = source.data.reshape(-1)[start:start + partition.ds_numel]  # short or empty at the end
                    soft_update_reference([weight[:piece.numel()]], [piece.to(weight.device, weight.dtype)], alpha)

    def metrics(self) -> dict[str, float]:
        return {"reference/updates": float(self.updates)}

    # --- checkpoints ------------------------------------------------------------------------------------------

    def state_is_sharded(self) -> bool:
        return self._is_zero3()

    def state_dict(self) -> dict[str, Any]:
        names = [name for name, _ in self._named_parameters()]
        return {"updates": self.updates, "zero3_partitions": self._is_zero3(),
                "weights": {n: w.detach().cpu().clone() for n, w in zip(names, self._weights())}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = self._weights()
        names = [name for name, _ in self._named_parameters()]
        saved = state["weights"]
        if list(saved) != names or any(saved[n].shape != w.shape for n, w in zip(names, weights)):
            raise AlignError("tr_dpo: the checkpoint's reference does not match this model's parameters (a ZeRO-3 "
                             "checkpoint resumes with the same number of processes)")
        with torch.no_grad():
            torch._foreach_copy_(weights, [saved[n].to(w.device) for n, w in zip(names, weights)])
        self._publish()
        self.updates = state["updates"]
