"""The `align train` recipe: preference data → policy and reference → objective → Trainer → final model.

Reads top to bottom; each component is built by its own module from its config section. An objective of the
on_policy family (f-DPG) runs `align.train_on_policy` instead (`train` picks by the config's family).
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from transformers import TrainerCallback

from align.config import (TrainConfig, config_to_dict, objective_params, reference_section,
                          training_arguments_kwargs)
from align.data import build_preference_dataset, check_preference_data
from align.io import SetupGuard, atomic_directory, atomic_write_json, atomic_write_text, held_entries
from align.modeling import load_policy, load_tokenizer
from align.references import build_reference
from align.trainer import PreferenceTrainer, disable_dropout, latest_checkpoint, training_arguments

logger = logging.getLogger("align.train")


def init_deepspeed_on_cpu(training: dict) -> None:
    """Under torchrun without GPUs, DeepSpeed's own communicator must be started (with gloo) before anything else.

    On GPUs accelerate does this; on CPU it brings up plain torch.distributed instead, and `deepspeed.zero.Init`
    (run by `from_pretrained` under ZeRO-3) then sees a world size of 1 and rejects the batch sizes.
    """
    import os

    import torch

    if not training.get("deepspeed") or torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def train(config) -> dict:
    """Runs the recipe of the config's objective family: `train_pairs` (TrainConfig) or
    `align.train_on_policy.train_on_policy` (OnPolicyTrainConfig)."""
    if config.family == "on_policy":
        from align.train_on_policy import train_on_policy

        return train_on_policy(config)
    return train_pairs(config)


def check_output_dir(args, overwrite: bool) -> None:
    """Refuses a `training.output_dir` that already holds files, unless the run resumes from it or `overwrite` is
    set: a second `align train` with the same recipe must not silently replace a finished run."""
    from align.errors import ConfigError

    output_dir = Path(args.output_dir)
    if overwrite or args.resume_from_checkpoint or not output_dir.is_dir():
        return
    shown = held_entries(output_dir)
    if shown:
        raise ConfigError(f"training.output_dir: '{output_dir}' already holds files ({shown}); resume it with "
                          "training.resume_from_checkpoint=latest, write into it anyway with overwrite=true, or "
                          "choose another output_dir")


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


def resume_point(args, output_dir: Path) -> str | None:
    """The checkpoint `training.resume_from_checkpoint` names: a path, or for `latest` the newest complete one."""
    resume = args.resume_from_checkpoint
    if resume == "latest":
        # The newest checkpoint marked complete: one cut short by a crash while saving is skipped. With none, the run
        # starts from step 0, so the same command serves a job's first launch and every relaunch after a preemption
        # (as Lightning's `ckpt_path="last"` does; transformers' `resume_from_checkpoint=True` would raise).
        resume = latest_checkpoint(str(output_dir))
        if resume is None:
            logger.warning("resume_from_checkpoint: latest: no complete checkpoint in %s; training from the start",
                           output_dir)
    if resume and not Path(resume).is_dir():
        from align.errors import ConfigError

        raise ConfigError(f"training.resume_from_checkpoint: '{resume}' is not a checkpoint directory")
    if resume:
        logger.info("resuming from %s", resume)
    return resume or None


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


def train_pairs(config: TrainConfig) -> dict:
    """Runs one preference-training job and returns its summary (also written to `<output_dir>/train_summary.json`).

    Outputs under `training.output_dir`: `checkpoint-*/` (Trainer checkpoints, resumable), `final/` (the trained
    model and tokenizer, written atomically), `align_config.yaml` (the resolved recipe), `train_summary.json`.
    """
    from transformers import set_seed

    init_deepspeed_on_cpu(config.training)
    # TrainingArguments first: with a ZeRO-3 `deepspeed` config it must exist before any model is loaded, so that
    # `from_pretrained` partitions the weights as it loads them.
    args = training_arguments(training_arguments_kwargs(config.training), seed=config.seed)
    check_output_dir(args, config.overwrite)  # before anything is loaded or written
    output_dir = Path(args.output_dir)
    resume = resume_point(args, output_dir)
    # The rows are read and checked before any tokenizer or model loads: a bad row is reported in seconds.
    checked = check_preference_data(config.data)
    set_seed(config.seed)

    # An error anywhere before training starts (data, model, reference precompute, a refused resume) leaves
    # output_dir as it was: transformers.Trainer creates it in its constructor.
    with SetupGuard(output_dir, main_process=args.should_save) as guard:
        tokenizer = load_tokenizer(config.model)
        train_dataset, train_report = build_preference_dataset(config.data, tokenizer, "train", checked=checked)
        eval_dataset = None
        if config.data.eval is not None:
            eval_dataset, _ = build_preference_dataset(config.data, tokenizer, "eval", checked=checked)

        policy, reference, objective = build_policy_reference_objective(config)

        trainer = PreferenceTrainer(model=policy, args=args, objective=objective, reference=reference,
                                    train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
                                    callbacks=[RunStarted(guard, config)],
                                    resume_with_changed_parameters=config.resume_with_changed_parameters)
        result = trainer.train(resume_from_checkpoint=resume)
    final_dir = save_final(trainer, output_dir)
    summary = {
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_loss": result.training_loss,
        "global_step": trainer.state.global_step,
        "data": vars(train_report),
        "final_model": str(final_dir),
        "log_history": trainer.state.log_history,
    }
    if eval_dataset is not None:
        summary["eval"] = trainer.evaluate()
    if trainer.is_world_process_zero():
        atomic_write_json(output_dir / "train_summary.json", summary)
    return summary
