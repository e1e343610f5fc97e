"""`align rm train` recipes: YAML plus `dotted.key=value` overrides, validated into `RMConfig`.

A reward-model recipe has the sections and scalars below (the keys are the same in code, YAML and docs):

    model:        ModelConfig        (align/modeling.py)   the backbone every member starts from
    data:         DataConfig         (align/data.py)       preference pairs, the same formats as `align train`
    ensemble:     EnsembleSection    how many members (K) and how they differ (kind, seeds, data order)
    loss:         LossSection        Bradley–Terry margin, label smoothing, label-noise injection
    aggregation:  {method: mean|wco|uwo, <its params>, normalize: bool}
                                     how members combine (reward_models/aggregate.py)
    lora:         LoraSection        the adapters of kind `lora` (one per member)
    training:     any `transformers.TrainingArguments` field (output_dir, learning_rate, deepspeed, report_to, …)
    seed:         int
    disable_dropout: bool
    overwrite:    bool               write into an output_dir that already holds a run (default: refused)

Loading reuses align's machinery (`align.config.load_recipe`: YAML file, dotted overrides, the file named in errors;
`align.schema.from_dict`; `align.config.training_arguments_kwargs`): an unknown key or a value of the wrong type is a
one-line `ConfigError` naming the dotted key, exactly as for `align train`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.config import load_recipe, training_arguments_kwargs
from align.data import DataConfig
from align.errors import ConfigError
from align.modeling import LoraSection, ModelConfig
from align.schema import ConfigKeyError, from_dict
from reward_models.ensemble import check_activation_checkpointing
from reward_models.manifest import ENSEMBLE_KINDS

DATA_ORDERS = ("shared", "per_member")


@dataclass
class EnsembleSection:
    """How many reward models are trained and how they differ (METHODS §8)."""

    kind: str = field(
        default="seeds",
        metadata={"help": "seeds: K independent models (own backbone and head), each trained in its own run with its "
                          "own seed, as Coste et al. train their members; multi_head: one shared backbone with K "
                          "scalar heads (one forward for all members); lora: one frozen base with K LoRA adapters "
                          "and heads (see `lora`)."},
    )
    members: int = field(
        default=1,
        metadata={"help": "K, the number of members. 1 trains a single reward model; wco/uwo aggregation needs >= 2."},
    )
    seeds: list[int] | None = field(
        default=None,
        metadata={"help": "One seed per member (head initialisation; for kind seeds also dropout and, with "
                          "data_order per_member, the data order). Default: seed + k for member k."},
    )
    data_order: str | None = field(
        default=None,
        metadata={"help": "shared: every member sees the pairs in the same order (the order of `seed`); per_member: "
                          "member k shuffles with seeds[k] (only kind seeds, whose members train apart). Default: "
                          "per_member for kind seeds (Coste et al.: members differ in head init and data order), "
                          "shared otherwise (one forward serves all members)."},
    )

    def __post_init__(self):
        if self.kind not in ENSEMBLE_KINDS:
            raise ConfigError(f"kind: unknown ensemble kind {self.kind!r}; known: {', '.join(ENSEMBLE_KINDS)}")
        if self.members < 1:
            raise ConfigError(f"members: must be >= 1, got {self.members}")
        if self.seeds is not None and len(self.seeds) != self.members:
            raise ConfigError(f"seeds: gives {len(self.seeds)} seeds for {self.members} members; give one per "
                              f"member or leave it out (seed + k)")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: must be distinct (members with the same seed are the same model), got "
                              f"{self.seeds}")
        if self.data_order is None:
            self.data_order = "per_member" if self.kind == "seeds" else "shared"
        if self.data_order not in DATA_ORDERS:
            raise ConfigError(f"data_order: must be one of {', '.join(DATA_ORDERS)}, got {self.data_order!r}")
        if self.data_order == "per_member" and self.kind != "seeds":
            raise ConfigError(f"data_order: per_member needs kind seeds; the members of kind {self.kind} are "
                              f"trained by one forward over the same batch, so they share the data order")


@dataclass
class LossSection:
    """The Bradley–Terry loss (reward_models/loss.py) and the label noise injected into the training pairs."""

    margin: float = field(
        default=0.0,
        metadata={"help": "m >= 0 in −log σ(r_w − r_l − m): the chosen reward must beat the rejected one by m."},
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "ε in [0, 0.5): −(1−ε)·log σ(z) − ε·log σ(−z), z = r_w − r_l − m (each label is taken to "
                          "be wrong with probability ε)."},
    )
    label_noise: float = field(
        default=0.0,
        metadata={"help": "Fraction in [0, 0.5) of TRAINING pairs whose chosen and rejected are swapped before "
                          "training (exactly round(fraction·N) pairs, chosen with `seed`; Coste et al. use 0.25). "
                          "Evaluation pairs are never flipped."},
    )

    def __post_init__(self):
        if not self.margin >= 0:
            raise ConfigError(f"margin: must be >= 0, got {self.margin}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if not 0.0 <= self.label_noise < 0.5:
            raise ConfigError(f"label_noise: must be in [0, 0.5) (at 0.5 the labels carry no information, above "
                              f"it they are inverted), got {self.label_noise}")


@dataclass
class RMConfig:
    """A full `align rm train` recipe."""

    model: ModelConfig = field(
        metadata={"help": "The backbone (Hub id or local folder) every member starts from; a scalar head is added. "
                          "`model.lora` is not used here: LoRA members are `ensemble.kind: lora` with `lora:`."},
    )
    data: DataConfig = field(metadata={"help": "Preference pairs (see DataConfig), the formats `align train` takes."})
    ensemble: EnsembleSection = field(
        default_factory=EnsembleSection, metadata={"help": "Members and how they differ (see EnsembleSection)."},
    )
    loss: LossSection = field(default_factory=LossSection,
                              metadata={"help": "Bradley–Terry options (see LossSection)."})
    aggregation: dict[str, Any] = field(
        default_factory=lambda: {"method": "mean"},
        metadata={"help": "`method` (mean | wco | uwo) plus its parameters (uwo: lam >= 0, default 0.5; ddof 0 or 1, "
                          "default 0) and `normalize` (default false: z-score each member on a reference set of "
                          "training responses before aggregating). Used for the ensemble's eval metrics and saved "
                          "with it as the default of `align rm score`."},
    )
    lora: LoraSection | None = field(
        default=None,
        metadata={"help": "The adapters of kind lora (see LoraSection); default r 16, alpha 32 when kind is lora."},
    )
    training: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Fields of `transformers.TrainingArguments`; reward-model defaults in "
                          "`reward_models.trainer.RM_TRAINING_DEFAULTS` (learning_rate 1e-5)."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the shared data order, label noise and default member "
                                                   "seeds (seed + k)."})
    disable_dropout: bool = field(
        default=True, metadata={"help": "Set every dropout probability to 0 (TRL's RewardConfig default): the reward "
                                        "of a pair is then the same in training and scoring."},
    )
    overwrite: bool = field(default=False, metadata={
        "help": "Write into a training.output_dir that already holds files, replacing its ensemble/ (by default "
                "refused, so that a finished run is never overwritten; resuming with "
                "training.resume_from_checkpoint=latest is always allowed into a run without an ensemble/)."})

    def __post_init__(self):
        if self.model.lora is not None:
            raise ConfigKeyError(("model", "lora"), "not used by reward models; for LoRA members set ensemble.kind: "
                                                    "lora and the adapter in the top-level `lora:` section")
        if self.lora is not None and self.ensemble.kind != "lora":
            raise ConfigError(f"lora: only used by ensemble.kind lora (this recipe's kind is {self.ensemble.kind})")
        if self.ensemble.kind == "lora" and self.lora is None:
            self.lora = LoraSection()
        if self.ensemble.seeds is None:
            self.ensemble.seeds = [self.seed + k for k in range(self.ensemble.members)]

    def aggregation_params(self) -> tuple[str, dict[str, Any], bool]:
        """(method, its full parameters, normalize) of the validated `aggregation:` section."""
        return aggregation_section(self.aggregation, self.ensemble.members)


def aggregation_section(section: dict, num_members: int | None) -> tuple[str, dict[str, Any], bool]:
    """Validates an `aggregation:` section against K members → (method, full params, normalize).

    K < 2 with wco/uwo, a negative λ and an unknown parameter are ConfigErrors naming `aggregation.<key>`."""
    from reward_models.aggregate import check_aggregation

    section = dict(section)
    method = section.pop("method", "mean")
    normalize = section.pop("normalize", False)
    if not isinstance(normalize, bool):
        raise ConfigError(f"aggregation.normalize: expected true or false, got {normalize!r}")
    if not isinstance(method, str):
        raise ConfigError(f"aggregation.method: expected a string, got {method!r}")
    params = check_aggregation(method, section, num_members=num_members)
    return method, params, normalize


# --- loading ---------------------------------------------------------------------------------------------------


def load_rm_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> RMConfig:
    """Reads a YAML recipe (or starts from `base`), applies `dotted.key=value` overrides and validates everything.

    Every error is a ConfigError starting with the file name (or "config") and naming the dotted key."""
    return load_recipe(path, overrides, base, validate_rm_config)


def validate_rm_config(raw: dict) -> RMConfig:
    data = raw.get("data")
    if isinstance(data, dict) and data.get("max_prompt_length") is not None:
        raise ConfigError("data.max_prompt_length: not used by reward models (a row longer than data.max_length keeps "
                          "its last tokens, the end of the response where the reward is read); remove it or set it "
                          "to null")
    config = from_dict(RMConfig, raw)
    config.data.max_prompt_length = None  # unused (above); the saved rm_config.yaml then reloads as it is
    config.aggregation = {"method": "mean", **config.aggregation}
    config.aggregation_params()
    training_arguments_kwargs(config.training)
    for key, instead in _TRAINING_KEYS_REFUSED.items():
        if key in config.training:
            raise ConfigError(f"training.{key}: not used by align rm train; {instead}")
    resume = config.training.get("resume_from_checkpoint")
    if resume is not None:
        if not isinstance(resume, str) or not resume:
            raise ConfigError(f"training.resume_from_checkpoint: expected 'latest' or a checkpoint directory, got "
                              f"{resume!r}")
        if resume != "latest" and config.ensemble.kind == "seeds":
            raise ConfigError("training.resume_from_checkpoint: kind seeds trains one run per member, each with its "
                              "own checkpoints (member-k/checkpoint-N); resume with 'latest', which takes every "
                              "member's newest complete checkpoint")
    if "output_dir" not in config.training:
        raise ConfigError("training.output_dir: required key is missing")
    for key in ("activation_checkpointing", "gradient_checkpointing"):
        if config.training.get(key):
            check_activation_checkpointing(config.ensemble.kind, config.ensemble.members, key=f"training.{key}")
    return config


#: `training:` keys that reward-model training sets itself.
_TRAINING_KEYS_REFUSED = {
    "seed": "set the top-level `seed` (and ensemble.seeds for the members)",
    "data_seed": "the data order follows `seed` or, with ensemble.data_order per_member, each member's seed",
}
