"""What the two `align train` recipes share (`train.train_pairs`, `train_on_policy.train_on_policy`): the policy,
reference and objective built from their sections, the callback that ends the set-up, and the final save."""

from __future__ import annotations

from pathlib import Path

import yaml
from transformers import TrainerCallback

from align.config import config_to_dict, objective_params, reference_section
from align.io import SetupGuard, atomic_directory, atomic_write_text
from align.modeling import load_policy
from align.references import build_reference
from align.trainer import disable_dropout


class RunStarted(TrainerCallback):
    """At `on_train_begin`, once a resumed checkpoint has loaded and been checked: the set-up is over, so the
    output folder's `SetupGuard` stands down and the resolved recipe is written as `align_config.yaml`. Written any
    earlier, a run that fails in set-up (or refuses to resume) would rewrite the recipe beside an existing model."""

    def __init__(self, guard: SetupGuard, config):
        self.guard, self.config = guard, config

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            atomic_write_text(Path(args.output_dir) / "align_config.yaml",
                              yaml.safe_dump(config_to_dict(self.config), sort_keys=False))
        self.guard.started()


def save_final(trainer, output_dir: Path) -> Path:
    """Writes the trained model and tokenizer to `output_dir/final`, atomically."""
    final_dir = output_dir / "final"
    # Every process takes part in saving (ZeRO-3 gathers shards); only the main one writes and renames.
    if trainer.is_world_process_zero():
        with atomic_directory(final_dir) as tmp:
            trainer.save_model(str(tmp))
    else:
        trainer.save_model(str(final_dir))  # takes part in the gather; writes nothing on a non-main rank
    return final_dir


def build_policy_reference_objective(config):
    """The policy (dropout off when asked), its reference and the objective, from a recipe of either family."""
    policy = load_policy(config.model)
    if config.disable_dropout:
        disable_dropout(policy)
    kind, params = reference_section(config.reference)
    reference = build_reference(kind, params, policy=policy, model_config=config.model)
    objective_cls, objective_config = objective_params(config.objective)
    return policy, reference, objective_cls(objective_config, seed=config.seed)
