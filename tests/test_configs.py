"""Every shipped recipe under configs/ validates, builds its TrainingArguments and its objective.

Parametrised over the glob, so a new recipe is checked as soon as it is added.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from align.config import (TrainConfig, installed_training_key, load_train_config, objective_params, reference_section,
                          training_arguments_kwargs)
from align.logps import PairLogps
from align.objectives import OBJECTIVES, Objective, build_objective
from align.references import REFERENCES, reference_params
from align.trainer import training_arguments

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ALL_RECIPES = sorted(CONFIG_DIR.glob("*.yaml"))


def _family(path) -> str:
    from align.config import objective_family

    return objective_family(yaml.safe_load(path.read_text()))


#: Recipes of the pairs family (preference data) and of the on_policy family (f-DPG), told apart by the objective.
RECIPES = [p for p in ALL_RECIPES if _family(p) == "pairs"]
ON_POLICY_RECIPES = [p for p in ALL_RECIPES if _family(p) == "on_policy"]


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "dpo.yaml", "sampo.yaml"} <= names
    assert len(RECIPES) >= 6
    assert "fdpg-toy.yaml" in {p.name for p in ON_POLICY_RECIPES}


@pytest.mark.parametrize("path", ON_POLICY_RECIPES, ids=lambda p: p.name)
def test_on_policy_recipe_loads_and_builds(path):
    """Every f-DPG recipe validates into OnPolicyTrainConfig with nothing dropped or retyped, builds its
    TrainingArguments, objective and target, and computes a finite loss with gradient on random log-probs."""
    from align.config import OnPolicyTrainConfig
    from align.objectives import FDPG
    from align.targets import build_target, target_params

    raw = yaml.safe_load(path.read_text())
    config = load_train_config(path)
    assert isinstance(config, OnPolicyTrainConfig)
    assert config.training == raw["training"] and config.objective == raw["objective"]
    assert config.target == raw["target"] and config.seed == raw["seed"]
    for section in ("generation", "rollout", "reward", "prompts"):
        for key, value in raw.get(section, {}).items():
            assert getattr(getattr(config, section), key) == value, f"{section}.{key}"
    args = training_arguments(training_arguments_kwargs(config.training), seed=config.seed)
    assert args.output_dir == config.training["output_dir"]
    cls, params = objective_params(config.objective)
    assert cls is FDPG
    objective = cls(params, seed=config.seed)
    target_cls, _ = target_params(config.target)
    target = build_target(config.target)
    assert isinstance(target, target_cls)
    G = config.generation.num_samples
    ref, rewards = -torch.rand(2, G, dtype=torch.float64) * 10, torch.randn(2, G)
    for key in ("a", "b"):
        if target.samples_per_prompt:
            target.fit_prompt(key, torch.randn(target.samples_per_prompt))
    log_p = target.log_prob(ref, rewards, ["a", "b"])
    policy = ref.clone().requires_grad_()
    objective.update_log_z(["a", "b"], log_p, policy.detach())
    losses, metrics = objective.loss(policy, log_p, policy.detach(), ["a", "b"])
    losses.mean().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(policy.grad).all()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_builds(path):
    config = load_train_config(path)
    assert isinstance(config, TrainConfig)

    # TrainingArguments, exactly as `align train` builds them
    args = training_arguments(training_arguments_kwargs(config.training), seed=config.seed)
    assert args.output_dir == config.training["output_dir"]
    assert args.seed == config.seed
    for key, value in config.training.items():
        if key in ("report_to", "gradient_checkpointing", "lr_scheduler_type", "eval_strategy", "save_strategy"):
            continue  # normalised by TrainingArguments (lists, enums, deprecated aliases)
        assert getattr(args, installed_training_key(key)) == value, key  # renamed keys are translated, not refused
    assert args.remove_unused_columns is False
    if not torch.cuda.is_available():
        assert args.bf16 is False  # bf16 is emulated on CPU; chosen by the hardware unless a recipe says otherwise

    # the objective through the registry, both ways the code builds it
    cls, params = objective_params(config.objective)
    assert cls is OBJECTIVES[config.objective["name"]]
    objective = cls(params, seed=config.seed)
    assert isinstance(objective, Objective)
    assert isinstance(build_objective(config.objective, seed=config.seed), cls)
    for key, value in config.objective.items():
        if key != "name":
            assert getattr(params, key) == value, key

    # and it computes a finite loss of log(2) at the reference (policy == reference)
    logps = PairLogps(chosen=-torch.rand(3, 5), chosen_mask=torch.ones(3, 5, dtype=torch.bool),
                      rejected=-torch.rand(3, 4), rejected_mask=torch.ones(3, 4, dtype=torch.bool))
    losses, metrics = objective(logps, logps)
    torch.testing.assert_close(losses, torch.full((3,), 0.6931472))
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(metrics)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_reference_section_validates(path):
    """The `reference:` section through the registry's validator, exactly as `build_reference` checks it (without
    loading models: a recipe may name checkpoints the user creates first, e.g. salsa-dpo's SFT ingredients)."""
    raw = yaml.safe_load(path.read_text())
    config = load_train_config(path)
    kind, section = reference_section(config.reference)
    assert kind == raw.get("reference", {}).get("kind", "auto")
    if kind == "auto":  # resolved against the policy at build time (peft_disabled for LoRA, else frozen)
        assert section == {}
        return
    assert kind in REFERENCES
    params = reference_params(kind, section)
    assert isinstance(params, REFERENCES[kind].Params)
    for key, value in section.items():
        assert getattr(params, key) == value, key  # nothing dropped or retyped by validation
    for f in dataclasses.fields(params):  # list items keep YAML's types: a checkpoint path is a string, a weight a number
        value = getattr(params, f.name)
        if isinstance(value, list):
            assert all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value), f.name


def test_new_reference_recipes_say_what_they_promise():
    soft, hard, salsa = (load_train_config(CONFIG_DIR / f"{name}.yaml").reference
                         for name in ("tr-dpo-soft", "tr-dpo-hard", "salsa-dpo"))
    assert soft == {"kind": "tr_dpo", "alpha": 0.6, "tau": 1}  # the paper's every-step soft update (METHODS §2)
    assert hard == {"kind": "tr_dpo", "alpha": 1.0, "tau": 512}  # hard update every 512 steps
    assert salsa["kind"] == "soup" and salsa["weights"] == [0.5, 0.5] and len(salsa["checkpoints"]) == 2
    assert len(set(salsa["checkpoints"])) == 2  # two different SFT runs, not one twice
    # the recipes differ from configs/dpo.yaml only where they say so
    dpo = yaml.safe_load((CONFIG_DIR / "dpo.yaml").read_text())
    for name in ("tr-dpo-soft", "tr-dpo-hard", "salsa-dpo"):
        recipe = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
        assert recipe["data"] == dpo["data"], name
        if name.startswith("tr-dpo"):
            assert recipe["model"] == dpo["model"], name
        expected_training = {**dpo["training"], "output_dir": f"outputs/{name}"}
        assert recipe["training"] == expected_training, name
    assert yaml.safe_load((CONFIG_DIR / "salsa-dpo.yaml").read_text())["model"]["name_or_path"] == \
        salsa["checkpoints"][0]  # the policy starts from the first ingredient unless told to start from the soup


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_keys_survive_validation_unchanged(path):
    """Nothing in a recipe is silently dropped or retyped (ints stay ints: warmup_steps 5 ≠ 0.1)."""
    raw = yaml.safe_load(path.read_text())
    config = load_train_config(path)
    assert config.training == raw["training"]
    assert config.objective == raw["objective"]
    for key, value in raw["data"].items():
        assert getattr(config.data, key) == value
        assert type(getattr(config.data, key)) is type(value)
    for key, value in raw["model"].items():
        validated = getattr(config.model, key)
        if dataclasses.is_dataclass(validated):  # a nested section (model.lora): compare it key by key
            validated = dataclasses.asdict(validated)
            assert {k: validated[k] for k in value} == value, key
        else:
            assert validated == value, key
    assert config.seed == raw["seed"]


def test_quickstart_yaml_equals_the_quickstart_recipe():
    from align.recipes.quickstart import QUICKSTART_RECIPE

    expected = yaml.safe_load((CONFIG_DIR / "quickstart.yaml").read_text())
    recipe = {section: (dict(value) if isinstance(value, dict) else value)
              for section, value in QUICKSTART_RECIPE.items()}
    for section, key in (("model", "name_or_path"), ("data", "train"), ("training", "output_dir")):
        recipe[section][key] = "outputs/quickstart/" + recipe[section][key]
    assert recipe == expected
    # types too (YAML's 1.0e-3 is a float, 5 an int, "no" a string)
    for section in ("data", "training"):
        for key, value in expected[section].items():
            assert type(recipe[section][key]) is type(value), f"{section}.{key}"
