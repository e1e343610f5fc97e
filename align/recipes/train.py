"""The `align train` recipe: preference data → policy and reference → objective → Trainer → final model.

Reads top to bottom; each component is built by its own module from its config section. An objective of the
on_policy family (f-DPG) runs `align.recipes.train_on_policy` instead (`train` picks by the config's family).
"""

from __future__ import annotations

from pathlib import Path

from transformers import set_seed

from align.config import TrainConfig, training_arguments_kwargs
from align.data import build_preference_dataset, check_preference_data
from align.io import SetupGuard, atomic_write_json
from align.modeling import load_tokenizer
from align.recipes.common import RunStarted, build_policy_reference_objective, save_final
from align.recipes.train_on_policy import train_on_policy
from align.runs import check_output_dir, init_deepspeed_on_cpu, resume_point
from align.trainer import PreferenceTrainer, training_arguments


def train(config) -> dict:
    """Runs the recipe of the config's objective family: `train_pairs` (TrainConfig) or `train_on_policy`
    (OnPolicyTrainConfig)."""
    if config.family == "on_policy":
        return train_on_policy(config)
    return train_pairs(config)


def train_pairs(config: TrainConfig) -> dict:
    """Runs one preference-training job and returns its summary (also written to `<output_dir>/train_summary.json`).

    Outputs under `training.output_dir`: `checkpoint-*/` (Trainer checkpoints, resumable), `final/` (the trained
    model and tokenizer, written atomically), `align_config.yaml` (the resolved recipe), `train_summary.json`.
    """
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
