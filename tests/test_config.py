"""Recipes: YAML + dotted overrides → validated TrainConfig; every bad key or value is a ConfigError naming it."""

import copy
import textwrap
from pathlib import Path

import pytest

from align.config import (
    TrainConfig,
    apply_override,
    load_train_config,
    objective_params,
    reference_section,
    training_arguments_kwargs,
)
from align.data import DataConfig
from align.errors import AlignError, ConfigError
from align.modeling import LoraSection, ModelConfig

BASE = {
    "model": {"name_or_path": "some/model"},
    "data": {"train": "pairs.jsonl"},
    "objective": {"name": "fdpo", "divergence": "reverse_kl", "beta": 0.1},
    "reference": {"kind": "auto"},
    "training": {"output_dir": "out"},
}


def load(*overrides, base=None):
    return load_train_config(None, list(overrides), base=copy.deepcopy(BASE if base is None else base))


def config_error(*overrides, base=None) -> str:
    with pytest.raises(ConfigError) as info:
        load(*overrides, base=base)
    assert isinstance(info.value, AlignError)
    message = str(info.value)
    assert "\n" not in message  # the CLI prints it as one line
    return message


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent("""\
        model:
          name_or_path: some/model
          dtype: float32
        data:
          train: pairs.jsonl
          max_length: 64
        objective:
          name: fdpo
          beta: 0.1
        training:
          output_dir: out
          learning_rate: 1.0e-4
          warmup_steps: 5
        seed: 3
        """))
    return path


# --- YAML + overrides --------------------------------------------------------------------------------------------


def test_yaml_recipe_loads_into_dataclasses(recipe):
    config = load_train_config(recipe)
    assert isinstance(config, TrainConfig)
    assert config.model == ModelConfig(name_or_path="some/model", dtype="float32")
    assert config.data == DataConfig(train="pairs.jsonl", max_length=64)
    assert config.data.max_prompt_length == 512 and config.data.length_policy == "truncate"  # defaults
    assert config.objective == {"name": "fdpo", "beta": 0.1}
    assert config.reference == {"kind": "auto"}  # default
    assert config.training == {"output_dir": "out", "learning_rate": 1e-4, "warmup_steps": 5}
    assert config.seed == 3 and config.disable_dropout is True


def test_overrides_are_typed(recipe):
    config = load_train_config(recipe, [
        "objective.beta=0.2",
        "training.num_train_epochs=2",
        "training.report_to=[tensorboard,wandb]",
        "data.max_prompt_length=null",
        "disable_dropout=false",
        "objective.divergence=js",
        "seed=11",
        "model.revision=main",
    ])
    assert config.objective["beta"] == 0.2 and type(config.objective["beta"]) is float
    assert config.training["num_train_epochs"] == 2 and type(config.training["num_train_epochs"]) is int
    assert config.training["report_to"] == ["tensorboard", "wandb"]
    assert config.data.max_prompt_length is None
    assert config.disable_dropout is False
    assert config.objective["divergence"] == "js"
    assert config.seed == 11
    assert config.model.revision == "main"
    assert config.training["learning_rate"] == 1e-4  # untouched keys keep their YAML values


def test_override_wins_over_yaml_and_later_override_wins(recipe):
    config = load_train_config(recipe, ["objective.beta=0.3", "objective.beta=0.5"])
    assert config.objective["beta"] == 0.5


def test_override_creates_nested_sections(recipe):
    config = load_train_config(recipe, ["model.lora.r=4", "model.lora.target_modules=[q_proj,v_proj]",
                                        "reference.kind=frozen", "reference.name_or_path=other/model"])
    assert config.model.lora == LoraSection(r=4, target_modules=["q_proj", "v_proj"])
    assert config.reference == {"kind": "frozen", "name_or_path": "other/model"}


def test_apply_override_parses_yaml_values():
    raw = {}
    apply_override(raw, "a.b.c=[a,b]")
    apply_override(raw, "a.b.d=0.5")
    apply_override(raw, "a.e=7")
    apply_override(raw, "f=true")
    apply_override(raw, "g=null")
    apply_override(raw, "h=")
    apply_override(raw, "i='5'")
    apply_override(raw, "j=a=b")  # only the first '=' separates key and value
    apply_override(raw, "k=[unclosed")  # not valid YAML: kept as the raw string
    assert raw == {"a": {"b": {"c": ["a", "b"], "d": 0.5}, "e": 7}, "f": True, "g": None, "h": "", "i": "5",
                   "j": "a=b", "k": "[unclosed"}
    assert type(raw["a"]["e"]) is int


@pytest.mark.parametrize("item", ["no_equals_sign", "=5", ""])
def test_malformed_override(item):
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_override({}, item)


def test_override_through_a_scalar_is_refused():
    raw = {"model": {"name_or_path": "x"}}
    with pytest.raises(ConfigError, match="'model.name_or_path' is not a section"):
        apply_override(raw, "model.name_or_path.sub=1")


def test_exponent_without_dot_is_a_float():
    # YAML 1.2 floats: PyYAML's YAML 1.1 would read 1e-3 as a string
    config = load("training.learning_rate=1e-3", "objective.beta=2E-1", "training.weight_decay=+1e-2")
    assert config.training["learning_rate"] == 1e-3 and type(config.training["learning_rate"]) is float
    assert config.objective["beta"] == 0.2
    assert config.training["weight_decay"] == 0.01


def test_yaml_1_2_booleans_in_files_and_overrides(tmp_path):
    # `save_strategy: no` is the TrainingArguments value "no", not YAML 1.1's False; only true/false are booleans
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\n"
                    "training: {output_dir: o, save_strategy: no, learning_rate: 5e-7}\ndisable_dropout: False\n")
    config = load_train_config(path, ["training.eval_strategy=no"])
    assert config.training == {"output_dir": "o", "save_strategy": "no", "learning_rate": 5e-7, "eval_strategy": "no"}
    assert config.disable_dropout is False
    for word in ("yes", "on", "off", "y"):
        assert apply_override(raw := {}, f"x={word}") is None and raw == {"x": word}
    assert "expected true or false, got str 'yes'" in config_error("disable_dropout=yes")


def test_objective_param_override_keeps_the_default_name():
    base = {k: v for k, v in BASE.items() if k != "objective"}
    assert load(base=base).objective == {"name": "fdpo"}  # the default section
    config = load("objective.beta=0.2", base=base)
    assert config.objective == {"name": "fdpo", "beta": 0.2}


def test_overrides_do_not_mutate_base():
    base = copy.deepcopy(BASE)
    load_train_config(None, ["objective.beta=0.7", "training.seed=1"], base=base)
    assert base == BASE


# --- config files ------------------------------------------------------------------------------------------------


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config \(No such file or directory\)"):
        load_train_config(path)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_train_config(path)
    assert str(info.value).startswith(f"{path}: not valid YAML")
    assert "\n" not in str(info.value)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping of sections"):
        load_train_config(path)


def test_empty_file_reports_the_first_missing_section(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError) as info:
        load_train_config(path)
    assert str(info.value) == f"{path}: model: required key is missing"


def test_errors_from_a_file_name_the_file_and_the_dotted_key(recipe):
    with pytest.raises(ConfigError) as info:
        load_train_config(recipe, ["data.max_lenght=5"])
    assert str(info.value).startswith(f"{recipe}: data.max_lenght: unknown key")


# --- unknown keys at every level -------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("bogus=1", "bogus"),
    ("model.bogus=1", "model.bogus"),
    ("data.bogus=1", "data.bogus"),
    ("objective.bogus=1", "objective.bogus"),
    ("reference.bogus=1", "reference.bogus"),
    ("training.bogus=1", "training.bogus"),
    ("training.learning_rte=0.1", "training.learning_rte"),
])
def test_unknown_key_names_the_dotted_key(override, key):
    message = config_error(override)
    assert message.startswith(f"config: {key}: ")


def test_unknown_objective_param_of_sampo_and_known_list():
    message = config_error("objective.name=sampo", "objective.bogus=1")
    assert message.startswith("config: objective.bogus: unknown key (known: ")
    assert "shared_indices" in message and "beta" in message


def test_unknown_key_in_frozen_reference():
    message = config_error("reference.kind=frozen", "reference.bogus=1")
    assert message.startswith("config: reference.bogus: unknown key of reference kind 'frozen' (known: name_or_path)")


@pytest.mark.parametrize("override, key", [("model.lora.bogus=1", "model.lora.bogus"),
                                           ("model.lora.r=four", "model.lora.r")])
def test_unknown_or_mistyped_key_in_optional_section(override, key):
    assert config_error(override).startswith(f"config: {key}: ")


# --- wrong types -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key, expected", [
    # bool where an int is expected
    ("training.max_steps=true", "training.max_steps", "expected an integer, got bool True"),
    ("seed=false", "seed", "expected an integer, got bool False"),
    ("data.max_length=true", "data.max_length", "got bool True"),
    # str where a float is expected
    ("objective.beta=abc", "objective.beta", "got str 'abc'"),
    ("training.learning_rate=fast", "training.learning_rate", "expected a number, got str 'fast'"),
    # list where a str is expected
    ("model.name_or_path=[a,b]", "model.name_or_path", "expected a string, got list ['a', 'b']"),
    ("data.train=[a.jsonl,b.jsonl]", "data.train", "got list"),
    ("objective.divergence=[js]", "objective.divergence", "got list"),
    # other mismatches
    ("disable_dropout=1", "disable_dropout", "expected true or false, got int 1"),
    ("training.num_train_epochs=two", "training.num_train_epochs", "got str 'two'"),
    ("model.trust_remote_code=yes please", "model.trust_remote_code", "expected true or false"),
    ("data.max_prompt_length=1.5", "data.max_prompt_length", "got float 1.5"),
    ("model=gpt2", "model", "expected a mapping, got str"),
])
def test_wrong_type_names_the_key(override, key, expected):
    message = config_error(override)
    assert message.startswith(f"config: {key}: ")
    assert expected in message


def test_objective_section_must_be_a_mapping():
    assert config_error("objective=fdpo").startswith("config: objective: expected a mapping")


# --- missing required keys ---------------------------------------------------------------------------------------


def test_missing_model_section():
    base = {k: v for k, v in BASE.items() if k != "model"}
    assert config_error(base=base) == "config: model: required key is missing"


def test_missing_model_name_or_path():
    base = copy.deepcopy(BASE)
    base["model"] = {"dtype": "float32"}
    assert "name_or_path is required" in config_error(base=base)
    assert "name_or_path is required" in config_error("model.name_or_path=")


def test_missing_data_train():
    base = copy.deepcopy(BASE)
    base["data"] = {"max_length": 10}
    assert config_error(base=base) == "config: data.train: required key is missing"
    assert config_error("data.train=' '").startswith("config: data.train: must name the training data")


def test_missing_output_dir_when_training_arguments_are_built():
    from align.trainer import training_arguments

    config = load("training={}")  # validation alone does not need output_dir ...
    assert config.training == {}
    with pytest.raises(ConfigError, match=r"^training\.output_dir: required key is missing$"):
        training_arguments(training_arguments_kwargs(config.training), seed=config.seed)  # ... building the args does


# --- values ------------------------------------------------------------------------------------------------------


def test_unknown_objective_name_lists_known_ones():
    message = config_error("objective.name=ppo")
    assert message == "config: objective.name: unknown objective 'ppo'; known: dpo, f_dpg, f_dpo, fdpg, fdpo, sampo"


@pytest.mark.parametrize("name", ["fdpo", "dpo", "f_dpo", "sampo"])
def test_registered_objective_names_and_aliases(name):
    from align.objectives import OBJECTIVES

    cls, params = objective_params(load(f"objective.name={name}").objective)
    assert cls is OBJECTIVES[name]
    assert params.beta == 0.1 and params.divergence == "reverse_kl"


def test_unknown_divergence_is_a_config_error_naming_it():
    message = config_error("objective.divergence=chi2")
    assert message.startswith("config: objective")
    assert "divergence" in message and "'chi2'" in message


@pytest.mark.parametrize("override, words", [
    ("objective.beta=0", "beta must be > 0"),
    ("objective.beta=-1", "beta must be > 0"),
    ("objective.label_smoothing=0.5", "label_smoothing must be < 0.5"),
    ("objective.alpha=0.5", "alpha is only used with divergence 'alpha'"),
    ("data.length_policy=clip", "data.length_policy: must be one of truncate, drop"),
    ("data.max_length=0", "data.max_length: must be a positive integer"),
    ("model.dtype=float64", "dtype must be one of auto, float32, bfloat16, float16"),
    ("model.attn_implementation=flash_attention_2", "attn_implementation must be sdpa or eager"),
])
def test_out_of_range_values(override, words):
    assert words in config_error(override)


@pytest.mark.parametrize("override, key", [
    ("objective.divergence=bogus", "objective.divergence"),
    ("objective.beta=0", "objective.beta"),
    ("model.dtype=float64", "model.dtype"),
    ("model.name_or_path=", "model.name_or_path"),
])
def test_value_errors_name_the_dotted_key(override, key):
    assert config_error(override).startswith(f"config: {key}")


def test_alpha_divergence_params_are_accepted_and_validated():
    _, params = objective_params(load("objective.divergence=alpha", "objective.alpha=0.3").objective)
    assert params.alpha == 0.3
    assert "alpha" in config_error("objective.divergence=alpha", "objective.alpha=1.5")


def test_unknown_reference_kind():
    from align.references import REFERENCES

    message = config_error("reference.kind=ema")
    assert {"frozen", "peft_disabled"} <= set(REFERENCES)
    assert message == f"config: reference.kind: unknown kind 'ema'; known: auto, {', '.join(sorted(REFERENCES))}"


def test_auto_reference_takes_no_params():
    assert config_error("reference.name_or_path=other") == ("config: reference.name_or_path: kind 'auto' takes no "
                                                            "parameters")
    base = copy.deepcopy(BASE)
    base["reference"] = {"name_or_path": "other"}  # kind omitted means auto
    assert "kind 'auto' takes no parameters" in config_error(base=base)


def test_reference_sections():
    assert reference_section({}) == ("auto", {})
    assert reference_section({"kind": "frozen"}) == ("frozen", {})
    assert reference_section({"kind": "frozen", "name_or_path": "m"}) == ("frozen", {"name_or_path": "m"})
    assert config_error("reference.kind=frozen", "reference.name_or_path=5").startswith(
        "config: reference.name_or_path: expected")


def test_warmup_steps_int_stays_int_and_fraction_stays_float():
    from align.trainer import training_arguments

    config = load("training.warmup_steps=5")
    assert type(config.training["warmup_steps"]) is int
    args = training_arguments(training_arguments_kwargs(config.training), seed=0)
    assert args.warmup_steps == 5 and type(args.warmup_steps) is int

    config = load("training.warmup_steps=0.1")
    assert type(config.training["warmup_steps"]) is float
    assert training_arguments(training_arguments_kwargs(config.training), seed=0).warmup_steps == 0.1


def test_training_section_types_are_checked_against_training_arguments():
    assert training_arguments_kwargs({"learning_rate": 1, "num_train_epochs": 2, "report_to": ["none"]}) == {
        "learning_rate": 1, "num_train_epochs": 2, "report_to": ["none"]}
    with pytest.raises(ConfigError, match=r"^training\.per_device_train_batch_size: expected"):
        training_arguments_kwargs({"per_device_train_batch_size": 4.5})


def test_invalid_training_value_is_named_when_arguments_are_built_without_validation(tmp_path):
    # Callers that build the arguments from a section directly (reward-model defaults, tests) get the named line too.
    from align.trainer import training_arguments

    section = {"output_dir": str(tmp_path / "out")}
    with pytest.raises(ConfigError, match=r"^training\.lr_scheduler_type: must be one of linear, .*'sometimes'$"):
        training_arguments({**section, "lr_scheduler_type": "sometimes"}, seed=0)
    with pytest.raises(ConfigError, match=r"^training\.dataloader_prefetch_factor: .*dataloader_num_workers > 0"):
        training_arguments({**section, "dataloader_prefetch_factor": 2}, seed=0)
    assert not (tmp_path / "out").exists()


# --- every training value is checked before anything loads (issue 12) -------------------------------------------

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def cli_error(tmp_path, capsys, config: str, *overrides: str, command=("train",)) -> str:
    """`align <command> --config <config> ...` in-process: exit 2, one stderr line, no output folder; → that line."""
    from align.cli import main

    out = tmp_path / "out"
    status = main([*command, "--config", str(CONFIGS / config), *overrides, f"training.output_dir={out}"])
    stderr = capsys.readouterr().err
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert not out.exists()
    return lines[0]


BAD_TRAINING_VALUES = [
    # (overrides, the key named, words of the message)
    (["training.learning_rate=-1"], "learning_rate", "must be >= 0, got -1"),
    (["training.learning_rate=.nan"], "learning_rate", "must be a finite number"),
    (["training.per_device_train_batch_size=0"], "per_device_train_batch_size", "must be >= 1, got 0"),
    (["training.per_device_eval_batch_size=-2"], "per_device_eval_batch_size", "must be >= 1"),
    (["training.gradient_accumulation_steps=0"], "gradient_accumulation_steps", "must be >= 1"),
    (["training.eval_accumulation_steps=0"], "eval_accumulation_steps", "must be >= 1"),
    (["training.dataloader_num_workers=-1"], "dataloader_num_workers", "must be >= 0"),
    (["training.num_train_epochs=0"], "num_train_epochs", "must be > 0 (or set training.max_steps > 0)"),
    (["training.num_train_epochs=-1", "training.max_steps=-1"], "num_train_epochs", "must be > 0"),
    (["training.max_steps=0"], "max_steps", "or -1 to train for num_train_epochs, got 0"),
    (["training.max_steps=-5"], "max_steps", "must be a positive number"),
    (["training.warmup_steps=-1"], "warmup_steps", "got -1"),
    (["training.warmup_steps=2.5"], "warmup_steps", "a whole number of steps >= 1, got 2.5"),
    (["training.warmup_ratio=0.1"], "warmup_ratio", "use warmup_steps: 0.1"),
    (["training.weight_decay=-0.1"], "weight_decay", "must be >= 0"),
    (["training.max_grad_norm=-1"], "max_grad_norm", "must be >= 0 (0 turns gradient clipping off)"),
    (["training.adam_beta1=1"], "adam_beta1", "must be in [0, 1), got 1"),
    (["training.adam_beta2=-0.1"], "adam_beta2", "must be in [0, 1)"),
    (["training.adam_epsilon=-1e-8"], "adam_epsilon", "must be >= 0"),
    (["training.logging_steps=0"], "logging_steps", "must be > 0 with logging_strategy steps"),
    (["training.save_strategy=steps", "training.save_steps=0"], "save_steps", "must be > 0 with save_strategy steps"),
    (["training.save_strategy=steps", "training.save_steps=2.5"], "save_steps", "else a whole number of steps"),
    (["training.eval_strategy=steps", "training.eval_steps=-1"], "eval_steps", "must be > 0 with eval_strategy"),
    (["training.save_total_limit=0"], "save_total_limit", "must be >= 1 (null keeps every checkpoint)"),
    (["training.lr_scheduler_type=sometimes"], "lr_scheduler_type", "must be one of linear, cosine"),
    (["training.optim=sgdd"], "optim", "must be one of"),
    (["training.save_strategy=sometimes"], "save_strategy", "must be one of"),
    # Checked by TrainingArguments.__post_init__ itself, built during validation:
    (["training.dataloader_prefetch_factor=2"], "dataloader_prefetch_factor", "dataloader_num_workers > 0"),
    (["training.torch_empty_cache_steps=0"], "torch_empty_cache_steps", "must be an integer bigger than 0"),
    (["training.lr_scheduler_type=reduce_lr_on_plateau"], "lr_scheduler_type", "requires an eval strategy"),
    (["training.eval_strategy=steps", "training.load_best_model_at_end=true"], "load_best_model_at_end",
     "requires the save and eval strategy to match"),
    (["training.fp16=true", "training.bf16=true"], "fp16", "At most one of fp16 and bf16"),
    (["training.accelerator_config={bogus: 1}"], "accelerator_config", "bogus"),
]


@pytest.mark.parametrize("overrides, key, words", BAD_TRAINING_VALUES,
                         ids=[" ".join(o).replace("training.", "") for o, _, _ in BAD_TRAINING_VALUES])
def test_bad_training_value_is_one_line_naming_the_key(tmp_path, capsys, overrides, key, words):
    line = cli_error(tmp_path, capsys, "quickstart.yaml", *overrides)
    assert line.startswith(f"align: error: {CONFIGS / 'quickstart.yaml'}: training.{key}: "), line
    assert words in line, line


def test_on_policy_and_reward_model_recipes_check_training_values_too(tmp_path, capsys):
    line = cli_error(tmp_path, capsys, "fdpg-toy.yaml", "training.per_device_train_batch_size=0")
    assert ": training.per_device_train_batch_size: must be >= 1, got 0" in line
    line = cli_error(tmp_path, capsys, "rm/toy-ensemble.yaml", "training.learning_rate=-1", command=("rm", "train"))
    assert ": training.learning_rate: must be >= 0, got -1" in line


@pytest.mark.parametrize("overrides", [
    ["training.learning_rate=0"],                                       # a frozen run is allowed by torch
    ["training.warmup_steps=0.1"], ["training.warmup_steps=5"], ["training.warmup_steps=0"],
    ["training.num_train_epochs=0", "training.max_steps=3"],            # max_steps wins over epochs
    ["training.save_strategy=steps", "training.save_steps=0.25"],       # a fraction of the training steps
    ["training.save_steps=0"],                                          # unused: save_strategy is "no"
    ["training.eval_strategy=steps"],                                   # eval_steps falls back to logging_steps
    ["training.max_grad_norm=0", "training.save_total_limit=1", "training.adam_beta1=0"],
    ["training.save_total_limit=null", "training.eval_steps=null"],
], ids=lambda o: " ".join(o).replace("training.", ""))
def test_training_values_that_train_are_accepted(overrides):
    config = load_train_config(CONFIGS / "quickstart.yaml", overrides)
    for item in overrides:
        key, _, _ = item.partition("=")
        assert key.split(".")[1] in config.training


def test_validation_builds_training_arguments_without_devices_folders_or_environment(tmp_path, monkeypatch):
    """The arguments validation builds set up no device: accelerate's PartialState (under torchrun, the process
    group) is created by `TrainingArguments.device`, which only training may call. Nor do they create output_dir or
    leave environment variables behind (fsdp writes one)."""
    import os

    import transformers.integrations.deepspeed as hf_deepspeed
    from transformers import TrainingArguments

    def no_devices(self):
        raise AssertionError("validation set up devices (accelerate's distributed state)")

    monkeypatch.setattr(TrainingArguments, "_setup_devices", property(no_devices))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # as under `accelerate launch --use_deepspeed`
    environ = dict(os.environ)
    deepspeed_config = hf_deepspeed._hf_deepspeed_config_weak_ref
    section = {"output_dir": str(tmp_path / "out"), "fsdp": "full_shard", "eval_strategy": "steps",
               "deepspeed": str(tmp_path / "ds.json"), "tf32": False}
    assert training_arguments_kwargs(section) == section
    assert dict(os.environ) == environ
    assert hf_deepspeed._hf_deepspeed_config_weak_ref is deepspeed_config  # no process-wide DeepSpeed config
    assert not (tmp_path / "out").exists()
    # ... while building the real arguments does set up the device (which is why validation must not).
    with pytest.raises(AssertionError, match="validation set up devices"):
        TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True)
