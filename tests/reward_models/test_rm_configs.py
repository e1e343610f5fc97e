"""Every shipped reward-model recipe under configs/rm/ validates and builds its TrainingArguments.

Parametrised over the glob, so a new recipe is checked as soon as it is added. (Named test_rm_configs.py: tests/ has
no __init__.py files, and tests/test_configs.py already owns the basename.)
"""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from align import toy_world
from align.config import installed_training_key, training_arguments_kwargs
from reward_models.aggregate import AGGREGATIONS
from reward_models.config import RMConfig, load_rm_config
from reward_models.manifest import ENSEMBLE_KINDS
from reward_models.trainer import RM_TRAINING_DEFAULTS, rm_training_arguments

RM_DIR = Path(__file__).resolve().parents[2] / "configs" / "rm"
RECIPES = sorted(RM_DIR.glob("*.yaml"))


def test_recipes_exist():
    assert {p.name for p in RECIPES} >= {"toy-ensemble.yaml", "qwen-ensemble.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_builds(path):
    config = load_rm_config(path)
    assert isinstance(config, RMConfig)
    args = rm_training_arguments(training_arguments_kwargs(config.training), seed=config.seed)
    assert args.output_dir == config.training["output_dir"] and args.seed == config.seed
    for key, value in config.training.items():
        if key in ("report_to", "lr_scheduler_type", "eval_strategy", "save_strategy"):
            continue  # normalised by TrainingArguments (lists, enums)
        assert getattr(args, installed_training_key(key)) == value, key  # renamed keys are translated
    for key, value in RM_TRAINING_DEFAULTS.items():
        if key not in config.training:
            assert getattr(args, key) == value, key
    if not torch.cuda.is_available():
        assert args.bf16 is False
    method, _, normalize = config.aggregation_params()
    assert method in AGGREGATIONS and isinstance(normalize, bool)
    assert len(config.ensemble.seeds) == config.ensemble.members == len(set(config.ensemble.seeds))
    assert config.ensemble.kind in ENSEMBLE_KINDS


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_keys_survive_validation_unchanged(path):
    raw = yaml.safe_load(path.read_text())
    config = load_rm_config(path)
    assert config.training == raw["training"]
    assert config.seed == raw["seed"]
    for section in ("model", "data", "ensemble", "loss"):
        validated = dataclasses.asdict(getattr(config, section))
        for key, value in raw.get(section, {}).items():
            assert validated[key] == value, f"{section}.{key}"
            assert type(validated[key]) is type(value), f"{section}.{key}"
    assert {k: config.aggregation[k] for k in raw["aggregation"]} == raw["aggregation"]


def test_toy_recipe_reads_what_toy_data_writes():
    raw = yaml.safe_load((RM_DIR / "toy-ensemble.yaml").read_text())
    root = "outputs/rm-toy"  # `align rm toy-data`'s default --out
    assert raw["model"]["name_or_path"] == f"{root}/base"
    assert raw["data"]["train"] == f"{root}/train.jsonl" and raw["data"]["eval"] == f"{root}/eval.jsonl"
    assert raw["training"]["output_dir"].startswith(root + "/")
    config = load_rm_config(RM_DIR / "toy-ensemble.yaml")
    # the toy setting: a 3-member proxy ensemble on gold labels with 25% label noise, members as Coste's
    assert config.ensemble.kind == "seeds" and config.ensemble.members == 3
    assert config.ensemble.data_order == "per_member" and config.loss.label_noise == 0.25
    assert config.model.dtype == "float32"
    assert (toy_world.RM_TRAIN_PAIRS, toy_world.RM_EVAL_PAIRS) == (2000, 500)  # the sizes its comments state


def test_qwen_recipe_is_a_multi_head_ensemble_of_four_on_ultrafeedback():
    config = load_rm_config(RM_DIR / "qwen-ensemble.yaml")
    assert config.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert config.data.train == "trl-lib/ultrafeedback_binarized" and config.data.eval_split == "test"
    assert config.ensemble.kind == "multi_head" and config.ensemble.members == 4
    assert config.ensemble.data_order == "shared"
    # the kind can be switched by one override (data_order follows the kind unless set)
    assert load_rm_config(RM_DIR / "qwen-ensemble.yaml", ["ensemble.kind=seeds"]).ensemble.data_order == "per_member"


BASE = {"model": {"name_or_path": "some/model"}, "data": {"train": "pairs.jsonl"}, "training": {"output_dir": "out"}}


@pytest.mark.parametrize("overrides, parts", [
    (["ensemble.kind=bagging"], ("ensemble.kind", "'bagging'", "seeds, multi_head, lora")),
    (["ensemble.members=0"], ("ensemble.members", ">= 1")),
    (["ensemble.members=3", "ensemble.seeds=[1, 2]"], ("ensemble.seeds", "2 seeds for 3 members")),
    (["ensemble.members=2", "ensemble.seeds=[4, 4]"], ("ensemble.seeds", "distinct")),
    (["ensemble.kind=lora", "ensemble.data_order=per_member"], ("ensemble.data_order", "needs kind seeds")),
    (["loss.margin=-1"], ("loss.margin", ">= 0")),
    (["loss.label_smoothing=0.5"], ("loss.label_smoothing",)),
    (["loss.label_noise=0.5"], ("loss.label_noise", "[0, 0.5)")),
    (["aggregation.method=wco"], ("aggregation.method", "at least 2")),
    (["ensemble.members=3", "aggregation.method=uwo", "aggregation.lam=-1"], ("aggregation.lam", ">= 0")),
    (["ensemble.members=3", "aggregation.method=mean", "aggregation.lam=0.5"], ("aggregation.lam", "'mean'")),
    (["ensemble.members=3", "aggregation.normalize=yes"], ("aggregation.normalize",)),
    (["model.lora.r=8"], ("model.lora", "ensemble.kind: lora")),
    (["lora.r=8"], ("lora", "only used by ensemble.kind lora")),
    (["data.max_prompt_length=128"], ("data.max_prompt_length", "not used by reward models")),
    (["training.seed=3"], ("training.seed", "top-level `seed`")),
    (["training.data_seed=3"], ("training.data_seed",)),
    (["training.resume_from_checkpoint=runs/x/member-0/checkpoint-4"],
     ("training.resume_from_checkpoint", "kind seeds", "'latest'")),
    (["training.resume_from_checkpoint=true"], ("training.resume_from_checkpoint", "True")),
    (["training.learning_rat=1"], ("training.learning_rat", "TrainingArguments")),
    (["ensemble.kind=lora", "ensemble.members=2", "training.activation_checkpointing=true"],
     ("training.activation_checkpointing", "LoRA ensemble")),
])
def test_bad_recipes_name_the_dotted_key(overrides, parts):
    from align.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_rm_config(None, overrides, base=BASE)
    message = str(info.value)
    assert message.startswith("config: "), message
    for part in parts:
        assert part in message, (part, message)


def test_defaults():
    config = load_rm_config(None, base=BASE)
    assert config.ensemble.kind == "seeds" and config.ensemble.members == 1 and config.ensemble.seeds == [42]
    assert config.aggregation == {"method": "mean"} and config.aggregation_params() == ("mean", {}, False)
    assert config.lora is None and config.data.max_prompt_length is None
    lora = load_rm_config(None, ["ensemble.kind=lora", "ensemble.members=3", "seed=7"], base=BASE)
    assert lora.lora is not None and lora.lora.r == 16 and lora.ensemble.seeds == [7, 8, 9]
    assert lora.ensemble.data_order == "shared"
    uwo = load_rm_config(None, ["ensemble.members=3", "aggregation.method=uwo"], base=BASE)
    assert uwo.aggregation_params() == ("uwo", {"lam": 0.5, "ddof": 0}, False)
