"""The on-policy `align train` recipe (f-DPG, METHODS §5): prompts → policy, reference, target, reward, sampler →
`OnPolicyTrainer` → final model, measured before and after.

As a recipe (`align.recipes`) it may wire concrete kinds together: the `reward:` section becomes a reward-model
ensemble from `reward_models/`, the toy world's gold reward or a user's `module:function` (`build_reward`), which the
core sees only as a `RewardFunction`. Everything is validated and every input is loaded (prompts, reward) before any
policy is loaded, so bad input fails in seconds and writes nothing.

Outputs under `training.output_dir`: `checkpoint-*/` (resumable), `final/` (model and tokenizer, atomic),
`align_config.yaml` (the resolved recipe), `summary.json` (before/after measurement, the last logged metrics, the
target's KL where it has one) and `training_curves.png` (reward, gold reward and sampled KL over steps).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from transformers import set_seed

from align.config import OnPolicyTrainConfig, config_to_dict
from align.data import tokenize_prompts
from align.io import SetupGuard, atomic_save_figure, atomic_write_json
from align.modeling import load_tokenizer
from align.onpolicy_trainer import OnPolicyTrainer, PromptDataset
from align.prompts import load_prompts, prompts_source
from align.recipes.common import RunStarted, build_policy_reference_objective, save_final
from align.rewards import RewardConfig, RewardFunction, load_callable_reward
from align.rollout import HFRollout, build_rollout
from align.runs import check_output_dir, init_deepspeed_on_cpu, resume_point
from align.targets import build_target
from align.toy_world import gold_reward_function
from align.trainer import training_arguments

logger = logging.getLogger("align.recipes.train_on_policy")


def build_reward(section: RewardConfig, tokenizer, prompts: list[str]) -> RewardFunction:
    """The `reward:` section as a `RewardFunction`."""
    if section.kind == "toy_world":
        return gold_reward_function()
    if section.kind == "callable":
        return load_callable_reward(section.callable, "reward.callable")
    # Imported for this kind only: a run with the toy world's or a user's reward never loads reward_models.
    from reward_models.ensemble import RewardEnsemble
    from reward_models.reward import EnsembleReward, check_tokenizers

    ensemble = RewardEnsemble.load(section.ensemble)
    # The ensemble scores text with its own tokenizer; one that maps the prompts' words to <unk> was trained on
    # another vocabulary and would score unknown tokens.
    check_tokenizers(tokenizer, ensemble.tokenizer, [p for p in prompts if isinstance(p, str)], what="prompts",
                     ensemble_dir=section.ensemble)
    return EnsembleReward(ensemble, section.aggregation, batch_size=section.batch_size, max_length=section.max_length,
                          policy_tokenizer=tokenizer)


def train_on_policy(config: OnPolicyTrainConfig) -> dict:
    start = time.time()
    init_deepspeed_on_cpu(config.training)
    args = training_arguments(config.training, seed=config.seed)
    check_output_dir(args, config.overwrite)  # before anything is loaded or written
    output_dir = Path(args.output_dir)
    resume = resume_point(args, output_dir)
    # Prompt files are read and checked before any tokenizer or model loads.
    prompts = load_prompts(config.prompts)
    eval_prompts = load_prompts(config.evaluation.prompts) if config.evaluation.prompts is not None else None
    set_seed(config.seed)

    # An error anywhere before training starts leaves output_dir as it was (see align.recipes.common.RunStarted).
    with SetupGuard(output_dir, main_process=args.should_save) as guard:
        # Inputs first: prompts, the reward (an ensemble loads and is checked here), the sampler's preconditions.
        tokenizer = load_tokenizer(config.model)
        prompt_ids = tokenize_prompts(tokenizer, prompts, source=prompts_source(config.prompts))
        eval_ids = None
        if eval_prompts is not None:
            eval_ids = tokenize_prompts(tokenizer, eval_prompts, source=prompts_source(config.evaluation.prompts))
        reward = build_reward(config.reward, tokenizer, prompts)
        gold = build_reward(RewardConfig(kind="toy_world"), tokenizer, prompts) if config.evaluation.gold else None
        if config.rollout.backend == "vllm":
            from align.rollout.vllm import check_can_run

            check_can_run(config.model.name_or_path, engine_kwargs=config.rollout.engine_kwargs,
                          enable_sleep_mode=config.rollout.enable_sleep_mode)

        policy, reference, objective = build_policy_reference_objective(config)
        target = build_target(config.target)
        rollout = _build_rollout(config, policy, tokenizer)

        trainer = OnPolicyTrainer(model=policy, args=args, objective=objective, reference=reference, target=target,
                                  reward=reward, rollout=rollout, generation=config.generation,
                                  train_dataset=PromptDataset(prompts, prompt_ids), processing_class=tokenizer,
                                  gold_reward=gold, callbacks=[RunStarted(guard, config)],
                                  resume_with_changed_parameters=config.resume_with_changed_parameters)

        ev = config.evaluation
        before = trainer.measure(eval_prompts, eval_ids, ev.num_samples, ev.seed) if eval_prompts else None
        result = trainer.train(resume_from_checkpoint=resume)
    after = trainer.measure(eval_prompts, eval_ids, ev.num_samples, ev.seed) if eval_prompts else None
    final_dir = save_final(trainer, output_dir)

    summary = {
        "objective": config.objective, "target": config.target, "reward": config_to_dict(config.reward),
        "global_step": trainer.state.global_step,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_loss": result.training_loss,
        "samples": trainer.state.global_step * args.per_device_train_batch_size * args.world_size
        * args.gradient_accumulation_steps * config.generation.num_samples,
        "final_model": str(final_dir),
        "wall_time_s": round(time.time() - start, 1),
        **target.metrics(),
        "log_history": trainer.state.log_history,
    }
    if before is not None:
        summary.update({f"{name}_before": value for name, value in before.items()})
        summary.update({f"{name}_after": value for name, value in after.items()})
        summary["kl_to_reference"] = after["kl_to_reference"]
    if trainer.is_world_process_zero():
        atomic_write_json(output_dir / "summary.json", summary)
        _plot(trainer.state.log_history, summary, output_dir / "training_curves.png")
    return summary


def _build_rollout(config: OnPolicyTrainConfig, policy, tokenizer):
    if config.rollout.backend == "hf":
        # An untempered, untruncated sampler is the policy itself: its log-probs come from the training forward.
        return HFRollout(policy, tokenizer, batch_size=config.generation.batch_size,
                         score=not config.generation.exact_sampler())
    return build_rollout(config.rollout.backend, policy, tokenizer, seed=config.seed,
                         **config.rollout.backend_options())


def _plot(history: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in history if "reward" in h]
    if not rows:
        return
    panels = [("reward", "optimised reward"), ("gold_reward", "gold reward"), ("kl/sampled", "KL(π‖a), nats")]
    panels = [(k, label) for k, label in panels if k in rows[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), dpi=110)
    for ax, (key, label) in zip(list(axes) if len(panels) > 1 else [axes], panels):
        ax.plot([h["step"] for h in rows], [h[key] for h in rows], marker=".")
        ax.set_xlabel("optimizer step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    objective = summary["objective"]
    fig.suptitle(f"f-DPG ({objective.get('divergence', 'reverse_kl')}) to the {summary['target'].get('kind')} target")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)
