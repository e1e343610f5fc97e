"""The `Objective` interface and registry.

An objective is a pure function of log-probs (no model calls): given the policy's and the reference's token
log-probs of a batch of B preference pairs (`align.logps.PairLogps`), it returns per-example losses `[B]` and
per-example metrics (`dict[str, Tensor[B]]`, detached, fp32). The trainer averages and gathers both; it knows
objectives only through this interface (DESIGN.md).

Configuration follows TRL's config style: each objective has a `Params` dataclass whose fields carry a
`metadata={"help": ...}` string and whose `__post_init__` validates values (raising a `ConfigError` that names the
field, e.g. with `check_number`). A recipe's `objective: {name: fdpo, divergence: js, beta: 0.1}` is validated by
`align.config.objective_params` (the section as `FDPO.Params`, errors named `objective.<key>`) and built as
`FDPO(params, seed=run_seed)`. From Python, `get_objective("fdpo", divergence="js", beta=0.1)` and
`build_objective(section)` do both in one call.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from align.errors import ConfigError
from align.logps import PairLogps
from align.registry import Registry, normalise_name
from align.schema import ConfigKeyError

__all__ = ["OBJECTIVES", "Objective", "register_objective", "get_objective", "build_objective", "check_number"]

#: name or alias -> Objective subclass.
OBJECTIVES = Registry("objective", normalise=normalise_name)


def check_number(
    field_name: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    integer: bool = False,
) -> float | int:
    """Validate a numeric config value; raise a `ConfigKeyError` naming `field_name` (helper for `__post_init__`:
    `from_dict` puts the section's key in front, `objective.beta must be > 0`)."""
    kind = "an integer" if integer else "a number"
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        raise ConfigKeyError(field_name, f"must be {kind}, got {type(value).__name__}: {value!r}", " ")
    if not integer:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigKeyError(field_name, f"must be finite, got {value}", " ")
    if gt is not None and not value > gt:
        raise ConfigKeyError(field_name, f"must be > {gt}, got {value}", " ")
    if ge is not None and not value >= ge:
        raise ConfigKeyError(field_name, f"must be >= {ge}, got {value}", " ")
    if lt is not None and not value < lt:
        raise ConfigKeyError(field_name, f"must be < {lt}, got {value}", " ")
    return value


class Objective(abc.ABC):
    """Base class of preference objectives.

    Class attributes:
        name: registry name (set by `register_objective`).
        aliases: extra registry names.
        Params: a `@dataclass` of the objective's parameters (every field documented via `metadata["help"]`).

    Call: `objective(policy, reference) -> (losses [B], metrics {key: [B]})`. Losses carry the graph of the
    policy log-probs; metrics are detached fp32. At least `rewards/chosen`, `rewards/rejected`,
    `rewards/margins` and `rewards/accuracies` (float 0/1) are reported.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    #: Which trainer and recipe run it: "pairs" (PreferenceTrainer, preference data) or "on_policy"
    #: (OnPolicyTrainer: prompts, rollouts, a reward and a target; f-DPG).
    family: ClassVar[str] = "pairs"

    @dataclass
    class Params:
        """No parameters."""

    def __init__(self, params: Any = None, *, seed: int = 0):
        if params is None:
            params = self.Params()
        if not isinstance(params, self.Params):
            raise TypeError(f"{type(self).__name__} expects {type(self).__name__}.Params, got {type(params).__name__}")
        check_number("seed", seed, integer=True)
        self.params = params
        self.seed = seed

    @abc.abstractmethod
    def __call__(self, policy: PairLogps, reference: PairLogps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-example losses `[B]` and detached per-example metrics `{key: [B]}`."""

    def state_dict(self) -> dict[str, Any]:
        """State to store in a checkpoint so that a resumed run is exact (e.g. an RNG). Default: none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


def register_objective(cls_or_name: Any = None, *aliases: str):
    """Register an `Objective` subclass.

    Use as `@register_objective` (registers `cls.name` and `cls.aliases`) or as
    `@register_objective("name", "alias", ...)` (sets `cls.name` and `cls.aliases`).
    """

    def deco(cls: type[Objective], name: str | None, extra: tuple[str, ...]) -> type[Objective]:
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise TypeError(f"register_objective expects an Objective subclass, got {cls!r}")
        if name is not None:
            cls.name, cls.aliases = name, tuple(extra)
        if not cls.name:
            raise ValueError(f"{cls.__name__} has no name")
        if not dataclasses.is_dataclass(cls.Params):
            raise TypeError(f"{cls.__name__}.Params must be a dataclass")
        return OBJECTIVES.register(cls.name, *cls.aliases)(cls)

    if isinstance(cls_or_name, type):
        return deco(cls_or_name, None, ())
    if isinstance(cls_or_name, str):
        return lambda cls: deco(cls, cls_or_name, aliases)
    raise TypeError("use @register_objective or @register_objective('name', *aliases)")


def get_objective(name: str, *, seed: int = 0, **params: Any) -> Objective:
    """Build a registered objective: `get_objective("fdpo", divergence="js", beta=0.1)`.

    `seed` is the run's seed (objectives that sample, like SamPO, use it unless their params say otherwise).
    Raises `ConfigError` for an unknown name (listing the known ones), an unknown parameter (naming it and
    listing the accepted ones) or an invalid value (from `Params.__post_init__`).

    A parameter literally named `seed` (SamPO's) cannot be passed here because it collides with the run seed;
    use `build_objective(section, seed=run_seed)` for config sections.
    """
    return _build(name, seed, params)


def build_objective(section: Mapping[str, Any], *, seed: int = 0) -> Objective:
    """Build an objective from a config section `{"name": ..., **params}`; `seed` is the run's seed.

    Unlike `get_objective`, the section may contain a parameter named `seed` (e.g. SamPO's sampler seed).
    """
    if not isinstance(section, Mapping):
        raise ConfigError(f"objective must be a mapping with a 'name' key, got {type(section).__name__}")
    if "name" not in section:
        raise ConfigError(f"objective section needs a 'name' (known objectives: {', '.join(sorted(OBJECTIVES))})")
    params = dict(section)
    return _build(params.pop("name"), seed, params)


def _build(name: Any, seed: int, params: dict[str, Any]) -> Objective:
    if not isinstance(name, str):
        raise ConfigError(f"objective name must be a string, got {type(name).__name__}: {name!r}")
    cls = OBJECTIVES.lookup(name)
    accepted = [f.name for f in dataclasses.fields(cls.Params)]
    for p in params:
        if p not in accepted:
            raise ConfigError(
                f"unknown parameter {p!r} for objective {cls.name!r} "
                f"(accepted parameters: {', '.join(accepted) or 'none'})"
            )
    return cls(cls.Params(**params), seed=seed)
