"""`PreferenceTrainer`: the DPO family as a thin layer over `transformers.Trainer`.

DeepSpeed, gradient accumulation, mixed precision, checkpointing, evaluation and `report_to` come from
`transformers.Trainer`. This class adds three things:

1. `compute_loss`: policy log-probs from ONE forward over the shared-prompt batch (`align.logps`), reference
   log-probs from the reference manager, losses from the objective (a pure function of log-probs);
2. the metrics TRL users expect (`rewards/*`, `logps/*`, `kl/reference`, `length/*`), averaged over the logging
   window and across processes;
3. the reference's per-step hook (`on_step_end`, TR-DPO) and the objective's and reference's state in every
   checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from align.logps import PairLogps, SharedPromptCollator, pair_logps

#: Where align's defaults differ from `transformers.TrainingArguments`; a recipe's `training:` keys win.
ALIGN_TRAINING_DEFAULTS = {
    "learning_rate": 1e-6,  # TRL's DPOConfig default; DPO-family losses diverge at SFT-like learning rates
    "logging_steps": 10,
    "report_to": "none",
    "save_only_model": False,
    # Mixed precision is decided in `training_arguments` by the hardware: on CPU bf16 matmuls are emulated (~60x
    # slower). Activation (gradient) checkpointing stays off unless a recipe sets `activation_checkpointing: true`
    # (transformers >= 5 name; `gradient_checkpointing` is its deprecated alias): TRL 1.16 turns it on by default.
}


def training_arguments(section: dict, *, seed: int) -> TrainingArguments:
    """Builds `TrainingArguments` from a validated `training:` section plus align's defaults."""
    kwargs = {**ALIGN_TRAINING_DEFAULTS, "seed": seed, **section}
    if "output_dir" not in kwargs:
        from align.errors import ConfigError

        raise ConfigError("training.output_dir: required key is missing")
    on_gpu = torch.cuda.is_available()
    if not kwargs.get("fp16") and "bf16" not in kwargs:
        kwargs["bf16"] = on_gpu and torch.cuda.is_bf16_supported()
    if not on_gpu:
        # Without `use_cpu`, accelerate picks no process-group backend on a GPU-less machine and a torchrun job
        # (DDP or DeepSpeed) runs as N copies of world size 1, with DeepSpeed's "auto" batch sizes wrong by N.
        kwargs.setdefault("use_cpu", True)
        kwargs.setdefault("dataloader_pin_memory", False)  # pinned memory only helps host-to-GPU copies
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            kwargs.setdefault("ddp_backend", "gloo")
    kwargs["remove_unused_columns"] = False  # our batches are built by SharedPromptCollator, not by column names
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as e:
        from align.errors import ConfigError

        raise ConfigError(f"training: {str(e).splitlines()[0]}") from None


class _ReferenceStepHook(TrainerCallback):
    """Calls `reference.on_step_end(policy, step)` after every optimizer step."""

    def __init__(self, trainer: "PreferenceTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.reference.on_step_end(self.trainer.model, state.global_step)


class PreferenceTrainer(Trainer):
    """Trains a policy on preference pairs with any registered objective and reference kind.

    Args:
        model: the policy (`PreTrainedModel` or `PeftModel`).
        args: `TrainingArguments` (see `training_arguments`).
        objective: an `align.objectives.Objective` (pure loss of policy and reference `PairLogps`).
        reference: an `align.references.Reference`.
        train_dataset / eval_dataset: items `{"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}`.
        processing_class: the tokenizer (its pad id pads batches; it is saved with checkpoints).
    """

    def __init__(self, *, model, args, objective, reference, train_dataset, eval_dataset=None,
                 processing_class=None, data_collator=None, callbacks=None):
        if data_collator is None:
            data_collator = SharedPromptCollator(processing_class.pad_token_id)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks)
        # Our loss is a mean over pairs, not a sum over tokens: let the Trainer divide by accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.objective = objective
        self.reference = reference
        self.reference.prepare(self.accelerator)
        self.reference.precompute({"train": train_dataset, "eval": eval_dataset}, data_collator,
                                  self.args.per_device_eval_batch_size)
        self.add_callback(_ReferenceStepHook(self))
        # Running [sum, count] per metric and mode: logged values are per-pair means over the logging window (a
        # short last batch does not get the weight of a full one).
        self._metrics = {"train": defaultdict(lambda: [0.0, 0]), "eval": defaultdict(lambda: [0.0, 0])}

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
            # Mean sequence log-ratio log π − log π_ref over the batch's chosen and rejected responses. These are
            # not samples of the policy, so this tracks drift on the data; on-policy KL is measured by sampling
            # (quickstart, best-of-n).
            "kl/reference": 0.5 * ((policy_chosen - reference.chosen_sum()) + (policy_rejected - reference.rejected_sum())),
            "length/chosen": policy.chosen_mask.sum(-1).float(),
            "length/rejected": policy.rejected_mask.sum(-1).float(),
        }
        for key, value in per_example.items():
            value = self.accelerator.gather(value.detach().float().reshape(-1))
            total = self._metrics[mode][key]
            total[0] += value.sum().item()
            total[1] += value.numel()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for key, (total, count) in self._metrics[mode].items():
            logs[prefix + key] = total / count
        self._metrics[mode].clear()
        super().log(logs, start_time)

    # --- state that must survive a restart ----------------------------------------------------------------------

    # Files, per checkpoint: `align_state_{rank}.pt` holds each process's objective state (SamPO's sampler);
    # `align_reference.pt` the reference state, written once by the main process when it is the same on every rank,
    # or `align_reference_{rank}.pt` per process when it is sharded (TR-DPO under ZeRO-3).

    def _objective_state_file(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"align_state_{self.args.process_index}.pt")

    def _reference_state_file(self, checkpoint: str) -> str:
        suffix = f"_{self.args.process_index}" if self.reference.state_is_sharded() else ""
        return os.path.join(checkpoint, f"align_reference{suffix}.pt")

    def _save_rng_state(self, output_dir: str) -> None:
        # Called by every process for every checkpoint, next to the RNG states, which is where the objective's sampler
        # and the reference's state belong. Each file is written to a temporary name and renamed.
        super()._save_rng_state(output_dir)
        _atomic_torch_save({"objective": self.objective.state_dict()}, self._objective_state_file(output_dir))
        if self.reference.state_is_sharded() or self.args.should_save:
            _atomic_torch_save(self.reference.state_dict(), self._reference_state_file(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        from align.errors import AlignError

        states = []
        for path in (self._objective_state_file(checkpoint), self._reference_state_file(checkpoint)):
            if not os.path.isfile(path):
                raise AlignError(f"{checkpoint}: missing {os.path.basename(path)}; cannot resume the objective and "
                                 "reference state exactly")
            states.append(torch.load(path, weights_only=False))
        self.objective.load_state_dict(states[0]["objective"])
        self.reference.load_state_dict(states[1])


def _atomic_torch_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
