"""Reference interface and registry: `Reference`, `register_reference`, `build_reference`."""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from align.logps import GroupLogps, PairLogps, batch_completion_keys
from align.modeling import ModelConfig, is_peft_model
from align.registry import Registry
from align.schema import ConfigKeyError, from_dict

#: kind -> Reference subclass (`reference.kind`; `auto` is resolved by `resolve_kind`).
REFERENCES = Registry("kind")


def register_reference(kind: str):
    def decorator(cls):
        cls.kind = kind
        return REFERENCES.register(kind)(cls)

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

    @classmethod
    def build(cls, params, *, policy, model_config: ModelConfig) -> "Reference":
        """Constructs the reference; a kind may return a variant suited to the policy (TR-DPO on a LoRA policy)."""
        return cls(params, policy=policy, model_config=model_config)

    def prepare(self, accelerator) -> None:
        self.accelerator = accelerator

    def precompute(self, datasets: dict[str, Any], collator, batch_size: int) -> None:
        """Called once after `prepare`, with the datasets to be trained and evaluated on (`{"train": ds, "eval": ds
        or None}`): a kind that caches log-probs ahead of training (`precomputed`) does its pass here."""

    #: True for a kind whose model changes during training (TR-DPO): a target that is fitted to the reference once
    #: (`best_of_n`) refuses it.
    moves: ClassVar[bool] = False

    @abc.abstractmethod
    def completion_logps(self, policy, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Reference token log-probs of every completion block of a `SharedPromptCollator` batch (no gradient):
        `[(logps [B, C_k], mask [B, C_k]) for each block k]`, as `align.logps.completion_token_logps` returns them."""

    def logps(self, policy, batch: dict) -> PairLogps:
        """Reference token log-probs of a preference-pair batch (no gradient)."""
        return PairLogps.from_blocks(self.completion_logps(policy, batch))

    def group_logps(self, policy, batch: dict) -> GroupLogps:
        """Reference token log-probs of a batch of G completions per prompt, e.g. sampled ones (no gradient)."""
        blocks = self.completion_logps(policy, batch)
        if len(blocks) != len(batch_completion_keys(batch)):
            raise ValueError("completion_logps returned another number of blocks than the batch has")
        return GroupLogps.from_blocks(blocks)

    @contextlib.contextmanager
    def sampling_model(self, policy):
        """A module that samples from the reference a(y|x) with `generate` (the `best_of_n` target draws its reward
        distribution from it once). Kinds that hold no model of their own (`precomputed`) cannot."""
        raise ConfigKeyError("reference.kind", f"'{self.kind}' cannot sample completions; use frozen, peft_disabled "
                             "or soup")
        yield

    def on_step_end(self, policy, step: int) -> None:
        """Called after optimizer step `step` (1-based, counts optimizer steps, not micro-batches)."""

    def metrics(self) -> dict[str, float]:
        """Scalars the trainer adds to its training logs (e.g. TR-DPO's `reference/updates`); the same on every
        process, read at each logging step."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this reference exactly (e.g. TR-DPO's moved weights)."""
        return {}

    def state_is_sharded(self) -> bool:
        """True when each process holds a different part of the state (ZeRO-3 partitions): the trainer then saves
        one file per rank. Otherwise all ranks hold the same state and only the main process writes it, once."""
        return False

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def reference_params(kind: str, params: dict[str, Any]):
    """Validates `params` for reference `kind`; errors name the key (`reference.<key>`)."""
    cls = REFERENCES.lookup(kind, "reference.kind", also_known=["auto"])
    return from_dict(cls.Params, params, "reference.", owner=f"reference kind '{kind}'")


def resolve_kind(kind: str, policy) -> str:
    if kind == "auto":
        return "peft_disabled" if is_peft_model(policy) else "frozen"
    return kind


def build_reference(kind: str, params: dict[str, Any], *, policy, model_config: ModelConfig) -> Reference:
    kind = resolve_kind(kind, policy)
    params = reference_params(kind, params)  # validates the kind too, before it is looked up
    return REFERENCES[kind].build(params, policy=policy, model_config=model_config)


