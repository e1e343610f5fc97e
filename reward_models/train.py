"""The `align rm train` recipe: preference pairs → K reward members → Bradley–Terry training → ensemble + report.

Reads top to bottom, like `align/recipes/train.py`. Outputs under `training.output_dir`:

    ensemble/          the trained ensemble (`RewardEnsemble.save`: manifest.json + weights, written atomically;
                       the manifest records data.max_length, the longest row training saw, as scoring's default)
    rm_config.yaml     the resolved recipe
    rm_summary.json    per-member and ensemble pairwise accuracy and ECE on the eval pairs, label-noise count,
                       data report, each training run's log history
    calibration.png    reliability diagram of every member and of the ensemble on the eval pairs
    member-k/          (kind seeds) member k's Trainer directory: checkpoints, TensorBoard logs, if asked for
    checkpoint-N/      (kinds multi_head, lora) the joint run's checkpoints, if asked for

Resuming (`training.resume_from_checkpoint=latest`, the same command relaunched). A checkpoint is one Trainer run's
(`align.trainer.CHECKPOINT_MARKER` written last, as `align train` does): for kind seeds each member's run has its
own, under member-k/, and every member resumes from its newest complete one, so a member that had finished resumes
from the checkpoint of its last step and trains no further step, the member that was cut short continues where its
checkpoint left off, and the members after it start from scratch (each member's run is seeded on its own, so none
of them depends on how the others ran). The run then ends with the ensemble and evaluation an uninterrupted run
gives, bit for bit (tested by killing a run). Without any complete checkpoint `latest` starts from scratch with a
warning. An output_dir that already holds files is refused unless the run resumes or `overwrite=true`; one that
holds an ensemble/ (a finished run) is refused unless `overwrite=true`.

How the kinds train (METHODS §8):
- `seeds`: K SEQUENTIAL Trainer runs, run k training member k alone with seed `ensemble.seeds[k]` (its data order
  too, with `data_order: per_member`). This is Coste et al.'s setup (independently trained proxies that differ by
  seed), exactly: a joint run would couple the members through the global gradient-norm clip and could not give
  each member its own data order without scoring every row with every member. It is also memory-light: one
  member and its optimizer state are on the accelerator at a time; the others wait on the CPU.
- `multi_head` and `lora`: ONE run of the whole ensemble (the members share a backbone or a base, and one forward
  scores all of them), loss summed over members.
All bad input (recipe, data rows, model path, an existing `ensemble/`) is reported before anything is written.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import TrainerCallback

from align.config import config_to_dict
from align.errors import AlignError, ConfigError
from align.io import SetupGuard, atomic_write_json, atomic_write_text
from align.modeling import load_tokenizer
from align.trainer import disable_dropout
from reward_models.config import RMConfig
from reward_models.data import build_reward_dataset, inject_label_noise
from reward_models.ensemble import RewardEnsemble, SeedsEnsemble
from reward_models.manifest import member_name
from reward_models.trainer import RewardTrainer, pair_rewards, reward_metrics, rm_training_arguments

logger = logging.getLogger("align.reward_models")

#: Training responses (chosen and rejected of the first pairs) that `aggregation.normalize` z-scores members on.
NORMALIZATION_PAIRS = 512


def train_reward_model(config: RMConfig) -> dict:
    """Trains the reward model or ensemble of `config` and returns its summary (also `rm_summary.json`)."""
    from transformers import set_seed
    from transformers.integrations import is_deepspeed_zero3_enabled

    from align.runs import check_output_dir, init_deepspeed_on_cpu

    start = time.time()
    init_deepspeed_on_cpu(config.training)
    args = rm_training_arguments(config.training, seed=config.seed)
    if is_deepspeed_zero3_enabled():
        # The ensemble is evaluated, normalised and saved from its full weights after training; ZeRO-3 leaves them
        # partitioned across ranks. Reward models (one backbone per member) fit where ZeRO-2 shards the optimizer.
        raise ConfigError("training.deepspeed: ZeRO stage 3 is not supported by align rm train; use a ZeRO-2 config "
                          "(launch/zero2.json or zero2_offload.json, ZERO=zero2 with the launch scripts)")
    output_dir = Path(args.output_dir)
    ensemble_dir = output_dir / "ensemble"
    if (ensemble_dir.exists() and (not ensemble_dir.is_dir() or any(ensemble_dir.iterdir()))
            and not config.overwrite):
        raise AlignError(f"{ensemble_dir}: already exists (the run that wrote it finished) and is kept: choose "
                         f"another training.output_dir, remove it, or set overwrite=true to replace it")
    check_output_dir(args, config.overwrite)  # a run's folder: refused unless resuming or overwrite=true
    method, agg_params, normalize = config.aggregation_params()
    set_seed(config.seed)

    # An error anywhere before training starts (data, model, a refused resume) leaves output_dir as it was, as in
    # `align train`: transformers.Trainer creates its folder in its constructor. rm_config.yaml is written when the
    # first run begins, after a resumed checkpoint has loaded and been checked.
    started = RecipeAtStart(output_dir, config, SetupGuard(output_dir, main_process=args.should_save))
    with started.guard:
        # Data first (fast, and the most common bad input): errors name the file, row and field.
        tokenizer = load_tokenizer(config.model)
        train_data, train_report = build_reward_dataset(config.data, tokenizer, "train")
        eval_data = build_reward_dataset(config.data, tokenizer, "eval")[0] if config.data.eval is not None else None
        # Label noise (Coste et al.: 25%): exactly round(fraction·N) training pairs swap chosen and rejected, the same
        # pairs for every member (the members share one noisy dataset, as proxies trained on one labelled set do).
        flipped = inject_label_noise(len(train_data), config.loss.label_noise, config.seed)
        train_data.flip(flipped)

        ensemble = RewardEnsemble.build(config.ensemble.kind, config.model, config.ensemble.members,
                                        seeds=config.ensemble.seeds, aggregation={"method": method, **agg_params},
                                        lora=config.lora)
        # Saved in the manifest: scoring cuts rows as training did (data.py keeps a long row's last tokens).
        ensemble.set_tokenization(config.data.max_length, "left")
        resumes = _resume_points(config, args, output_dir)
        if config.disable_dropout:
            disable_dropout(ensemble)

        # --- training ----------------------------------------------------------------------------------------------
        def trainer_for(model, run_args, **kwargs) -> RewardTrainer:
            return RewardTrainer(model=model, args=run_args, train_dataset=train_data, eval_dataset=eval_data,
                                 processing_class=ensemble.tokenizer, margin=config.loss.margin,
                                 label_smoothing=config.loss.label_smoothing, **kwargs)

        runs = []
        if config.ensemble.kind == "seeds":
            for k, seed in enumerate(config.ensemble.seeds):
                # Member k alone: a one-member view sharing member k's module, so the loss, the reward read-out and the
                # saved weights are the ensemble's own.
                view = SeedsEnsemble([ensemble.members[k]], ensemble.tokenizer, seeds=[seed], aggregation=None,
                                     normalization=None, base_model=ensemble.base_model,
                                     attn_implementation=ensemble.attn_implementation)
                data_seed = seed if config.ensemble.data_order == "per_member" else config.seed
                member_args = rm_training_arguments(
                    {**config.training, "output_dir": str(output_dir / member_name(k)), "data_seed": data_seed,
                     "run_name": f"{config.training.get('run_name') or output_dir.name}-{member_name(k)}"}, seed=seed)
                logger.info("training %s of %d (seed %d, data seed %d)", member_name(k), config.ensemble.members, seed,
                            data_seed)
                trainer = trainer_for(view, member_args, member_names=[f"member_{k}"],
                                      callbacks=[OneTrackerRunPerMember(), started])
                runs.append(_run(trainer, [k], resumes[k]))
                ensemble.members[k].to("cpu")  # memory-light: only the member in training sits on the accelerator
                _release(trainer)
        else:
            trainer = trainer_for(ensemble, args, callbacks=[started])
            runs.append(_run(trainer, list(range(config.ensemble.members)), resumes[0]))
            _release(trainer)

    summary = {
        "kind": config.ensemble.kind,
        "num_members": config.ensemble.members,
        "seeds": config.ensemble.seeds,
        "data_order": config.ensemble.data_order,
        "aggregation": ensemble.aggregation,
        "label_noise": {"fraction": config.loss.label_noise, "flipped": len(flipped), "pairs": len(train_data),
                        "seed": config.seed},
        "data": vars(train_report),
        "ensemble_dir": str(ensemble_dir),
        "global_steps": [run["global_step"] for run in runs],
        "resumed_from": resumes,
        "runs": runs,
    }
    if args.process_index != 0:  # every rank trained; the main one evaluates, saves and reports
        return summary

    # --- evaluation, normalisation, saving ---------------------------------------------------------------------
    device = args.device
    ensemble.to(device)
    if normalize:
        # METHODS §8: optional z-scoring on a fixed reference set: responses of the first training pairs.
        n = min(NORMALIZATION_PAIRS, len(train_data))
        prompts = train_data.prompts[:n] * 2
        responses = train_data.chosen[:n] + train_data.rejected[:n]
        ensemble.fit_normalization(prompts, responses, batch_size=args.per_device_eval_batch_size,
                                   max_length=config.data.max_length)
    if eval_data is not None:
        chosen, rejected = pair_rewards(ensemble, eval_data, pad_token_id=ensemble.tokenizer.pad_token_id,
                                        batch_size=args.per_device_eval_batch_size, device=device)
        metrics = reward_metrics(chosen, rejected, aggregation=ensemble.aggregation,
                                 normalization=ensemble.normalization, with_bins=True)
        summary["eval"] = metrics
        plot_calibration(metrics, output_dir / "calibration.png")
    else:
        summary["eval"] = None
    summary["normalization"] = ensemble.normalization
    ensemble.to("cpu").save(ensemble_dir, overwrite=config.overwrite)
    summary["wall_time_s"] = round(time.time() - start, 1)
    atomic_write_json(output_dir / "rm_summary.json", summary)
    return summary


class RecipeAtStart(TrainerCallback):
    """At the first `on_train_begin` (member 0's for kind seeds), once a resumed checkpoint has loaded and been
    checked: the set-up is over, so the output folder's `SetupGuard` stands down and the resolved recipe is written
    as `rm_config.yaml`. Written earlier, a run that fails in set-up (or refuses to resume) would rewrite the recipe
    beside checkpoints it did not write."""

    def __init__(self, output_dir: Path, config: RMConfig, guard: SetupGuard):
        self.output_dir, self.config, self.guard, self.done = output_dir, config, guard, False

    def on_train_begin(self, args, state, control, **kwargs):
        if self.done:
            return
        if state.is_world_process_zero:
            atomic_write_text(self.output_dir / "rm_config.yaml",
                              yaml.safe_dump(config_to_dict(self.config), sort_keys=False))
        self.guard.started()
        self.done = True


class OneTrackerRunPerMember(TrainerCallback):
    """Ends the Weights & Biases run when a member's training ends, so member k + 1 starts its own run (named
    `<run_name>-member-k`). transformers' W&B integration starts a run only when none is active and never ends it,
    so every later member would log into the first member's run with its step counter going back to 0, which W&B
    drops. TensorBoard needs nothing (each member logs under its own `member-k/` directory) and MLflow's integration
    ends its run itself."""

    def on_train_end(self, args, state, control, **kwargs):
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None and state.is_world_process_zero:
            wandb.finish()


def _resume_points(config: RMConfig, args, output_dir: Path) -> list[str | None]:
    """The checkpoint each Trainer run resumes from (None: from scratch): one per member for kind seeds (each
    member's newest complete one under member-k/), one for the joint run of the other kinds (`align.runs.resume_point`:
    `latest` or a path)."""
    from align.runs import resume_point
    from align.trainer import latest_checkpoint

    if config.ensemble.kind != "seeds":
        return [resume_point(args, output_dir)]
    members = config.ensemble.members
    if args.resume_from_checkpoint != "latest":  # config validation allows only `latest` for kind seeds
        return [None] * members
    points = [latest_checkpoint(str(output_dir / member_name(k))) for k in range(members)]
    if not any(points):
        logger.warning("resume_from_checkpoint: latest: no complete checkpoint in %s/member-*/; training from the "
                       "start", output_dir)
    for k, point in enumerate(points):
        if point:
            logger.info("%s resumes from %s", member_name(k), point)
    return points


def _run(trainer: RewardTrainer, members: list[int], resume: str | None = None) -> dict:
    """One Trainer run → its summary entry. `train_loss` and `train_runtime_s` cover the steps this launch trained
    (`steps_this_launch`; a resumed run's earlier steps are in `log_history`); None when it trained none (a member
    resumed from the checkpoint of its last step)."""
    start = 0
    if resume is not None:
        with open(Path(resume) / "trainer_state.json") as f:
            start = int(json.load(f)["global_step"])
    result = trainer.train(resume_from_checkpoint=resume)
    trained = trainer.state.global_step - start
    return {"members": members, "global_step": trainer.state.global_step, "steps_this_launch": trained,
            "train_loss": result.training_loss if trained else None,
            "train_runtime_s": result.metrics.get("train_runtime"), "log_history": trainer.state.log_history}


def _release(trainer: RewardTrainer) -> None:
    """Drops the optimizer state and engine references of a finished run before the next one starts."""
    trainer.accelerator.free_memory()
    trainer.optimizer = trainer.lr_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plot_calibration(metrics: dict, path: Path) -> None:
    """Reliability diagram (`reward_metrics(..., with_bins=True)`): empirical frequency against mean predicted
    probability per bin, every member and the ensemble, with the diagonal of perfect calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=1, label="perfect calibration")

    def curve(values: dict, label: str, **style) -> None:
        points = [(b["confidence"], b["frequency"]) for b in values["bins"] if b["count"]]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o",
                label=f"{label}: acc {values['accuracy']:.3f}, ECE {values['ece']:.3f}", **style)

    if metrics["ensemble"] is not None:  # drawn first and wide, so members that agree with it stay visible on top
        curve(metrics["ensemble"], f"ensemble ({metrics['ensemble']['method']})", color="black", alpha=0.35,
              linewidth=5, markersize=8)
    for i, (name, values) in enumerate(metrics["members"].items()):
        curve(values, name, color=f"C{i}", linewidth=1.2, markersize=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted P(first response better) = σ(r₁ − r₂)")
    ax.set_ylabel("empirical frequency (labels)")
    ax.set_title(f"Reward-model calibration on {metrics['pairs']} eval pairs (both orders)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
