"""Reference kinds `frozen` (a separate frozen model) and `peft_disabled` (the LoRA policy with its adapter off)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from align.schema import ConfigKeyError
from align.logps import completion_token_logps, batch_completion_keys
from align.modeling import is_peft_model, load_causal_lm
from align.references.base import Reference, register_reference


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
        self.model = load_causal_lm(model_config, params.name_or_path, key="reference.name_or_path")
        self.model.eval().requires_grad_(False)

    def prepare(self, accelerator) -> None:
        super().prepare(accelerator)
        if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
            from trl.models.utils import prepare_deepspeed

            # ZeRO-3 shards the reference like the policy; other stages keep a full copy per rank.
            self.model = prepare_deepspeed(self.model, accelerator)
        else:
            self.model = accelerator.prepare_model(self.model, evaluation_mode=True)

    @torch.no_grad()
    def completion_logps(self, policy, batch):
        return completion_token_logps(self.model, batch, batch_completion_keys(batch))

    @contextlib.contextmanager
    def sampling_model(self, policy):
        if self.accelerator is None:
            yield self.model
            return
        from trl.models.utils import unwrap_model_for_generation

        # Under ZeRO-3 the reference is sharded like the policy: gathered for the block (collective).
        with unwrap_model_for_generation(self.model, self.accelerator) as model:
            yield model


@register_reference("peft_disabled")
class PeftDisabledReference(Reference):
    """The LoRA policy's base model with the adapter disabled: the reference costs no extra memory."""

    def __init__(self, params, *, policy, model_config):
        super().__init__(params, policy=policy, model_config=model_config)
        if not is_peft_model(policy):
            raise ConfigKeyError("reference.kind", "'peft_disabled' needs a LoRA policy (set model.lora)")

    def _adapter_off(self, policy):
        peft_model = self.accelerator.unwrap_model(policy) if self.accelerator is not None else policy
        return peft_model.disable_adapter() if is_peft_model(peft_model) else contextlib.nullcontext()

    @torch.no_grad()
    def completion_logps(self, policy, batch):
        # Run the (possibly DDP/DeepSpeed-wrapped) policy itself so wrappers see a normal forward.
        with self._adapter_off(policy):
            return completion_token_logps(policy, batch, batch_completion_keys(batch))

    @contextlib.contextmanager
    def sampling_model(self, policy):
        with self._adapter_off(policy):
            yield self.accelerator.unwrap_model(policy) if self.accelerator is not None else policy
