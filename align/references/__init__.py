"""The reference manager: the one object the trainer asks for reference log-probs.

A reference *kind* is a `Reference` subclass registered by name; the config's `reference:` section picks one and
gives its parameters (`reference: {kind: frozen, name_or_path: ...}`). The trainer only calls the interface:

    reference.prepare(accelerator)          # once, after the accelerator exists (device placement, ZeRO-3 sharding)
    reference.logps(policy, batch)          # PairLogps under no_grad, for a SharedPromptCollator batch
    reference.on_step_end(policy, step)     # after every optimizer step (TR-DPO moves the reference here)
    reference.state_dict() / load_state_dict(state)   # carried by every checkpoint

Kinds here: `frozen` (a frozen copy of the initial policy, or another model) and `peft_disabled` (the policy's
base model with its LoRA adapter switched off: no second model in memory). `auto` picks `peft_disabled` for a
LoRA policy and `frozen` otherwise. The other kinds register the same way: `soup` (a weighted average of
checkpoints), `tr_dpo` (a reference that moves toward the policy during training) and `precomputed` (another kind's
log-probs, cached on disk in one pass before training, after which that model is freed).
"""

from align.references.base import (REFERENCES, Reference, build_reference, reference_params,  # noqa: F401
                                   register_reference, resolve_kind)
# Importing a kind's module registers it.
from align.references.frozen import FrozenReference, PeftDisabledReference  # noqa: F401,E402
from align.references.soup import SoupReference  # noqa: F401,E402
from align.references.tr_dpo import TRDPOReference, soft_update_reference  # noqa: F401,E402
from align.references.precomputed import PrecomputedReference  # noqa: F401,E402
