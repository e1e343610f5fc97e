"""`RewardTrainer`: Bradley–Terry training of a reward model or ensemble as a thin layer over `transformers.Trainer`.

DeepSpeed (ZeRO-2), DDP, gradient accumulation, mixed precision, checkpoints, progress bars and `report_to` come from
`transformers.Trainer`. This class adds:

1. `compute_loss`: one forward of the ensemble over a batch's [chosen; rejected] rows → rewards [2B, K] → the
   Bradley–Terry loss of every member (`reward_models.loss`), averaged over pairs and SUMMED over members (each
   member's gradient is then the one it would get trained alone; METHODS §8);
2. training metrics per member (`accuracy/member_k`, `margin/member_k`, `loss/member_k`) and of the aggregated
   ensemble (`accuracy/ensemble`), averaged over the logging window and across processes, logged through the
   Trainer's `log` so every `report_to` integration receives them;
3. evaluation metrics from the rewards of every eval pair (`compute_metrics`): pairwise accuracy and expected
   calibration error per member and of the ensemble (`reward_metrics`, defined below).

Calibration (ECE), precisely. For an eval pair i with rewards r_w (the labelled-chosen response) and r_l, the model's
probability that the chosen response is better is p_i = σ(r_w − r_l) (the Bradley–Terry probability it was trained
to output). The eval labels always say "chosen is better", so binning only the p_i against that label would score
every bin's outcome as 1: ECE would become mean(1 − p) and reward over-confidence. Each pair is therefore scored in
both orders: the prediction p_i with outcome 1 and the prediction 1 − p_i = σ(r_l − r_w) with outcome 0, 2N
predictions q_j with outcomes y_j. With 10 equal-width bins B_b = {j : b/10 ≤ q_j < (b+1)/10} (the last bin also
holds q = 1),

    ECE = Σ_b (|B_b| / 2N) · | mean_{j∈B_b} y_j − mean_{j∈B_b} q_j |.

The reliability diagram is symmetric about ½ (bin b mirrors bin 9 − b), and up to ties at p = ½ the ECE equals the
usual top-label ECE (Guo et al. 2017) of the predicted winner with confidence max(p, 1 − p) over 5 bins on [½, 1].
For the ensemble, member rewards are aggregated first (the configured method: mean, wco or uwo), then
p_i = σ(A(r_w) − A(r_l)). Pairwise accuracy counts r_w > r_l as 1, a tie as ½ (a constant model scores ½).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from transformers import TrainingArguments

from align.config import installed_training_key
from align.metric_window import MetricWindow
from align.trainer import MarkedCheckpointTrainer, activation_checkpointing
from reward_models.aggregate import aggregate, normalize
from reward_models.data import RewardCollator
from reward_models.loss import bradley_terry_loss, pairwise_accuracy

logger = logging.getLogger("align.reward_models")

#: Where reward-model training's defaults differ from align's (`align.trainer.ALIGN_TRAINING_DEFAULTS`, which still
#: apply underneath: logging every 10 steps, report_to none, fp32 on CPU). A recipe's `training:` keys win.
RM_TRAINING_DEFAULTS = {
    # Reward models are trained at SFT-like rates (OpenRLHF 9e-6, many RLHF papers 1e-5 for full fine-tuning);
    # align's 1e-6 is the DPO default. TRL's RewardConfig uses 1e-4, tuned for LoRA.
    "learning_rate": 1e-5,
    # Every trainable parameter of every kind gets a gradient at every step (seq-cls models have no unused LM head;
    # LoRA bases are frozen). transformers would otherwise default to True for a module that is not a
    # PreTrainedModel, which costs a graph traversal per step and breaks reentrant activation checkpointing.
    "ddp_find_unused_parameters": False,
}

#: Bins of the reliability diagram and the ECE (module docstring).
CALIBRATION_BINS = 10


def rm_training_arguments(section: dict, *, seed: int) -> TrainingArguments:
    """`TrainingArguments` of a reward-model run: align's builder (`align.trainer.training_arguments`) with
    `RM_TRAINING_DEFAULTS` under the recipe's `training:` keys."""
    from align.trainer import training_arguments

    return training_arguments({**RM_TRAINING_DEFAULTS, **section}, seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation metrics


def calibration_bins(p_chosen: torch.Tensor, n_bins: int = CALIBRATION_BINS) -> list[dict]:
    """Reliability-diagram bins of Bradley–Terry probabilities `p_chosen[N]` = σ(r_w − r_l), both orders of every
    pair (module docstring) → `n_bins` dicts `{"lo", "hi", "count", "confidence", "frequency"}` (confidence: mean
    predicted probability in the bin, frequency: fraction of outcomes 1; both None for an empty bin)."""
    p = p_chosen.detach().double().reshape(-1)
    q = torch.cat([p, 1.0 - p])  # [2N]
    y = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    index = torch.clamp((q * n_bins).floor().long(), 0, n_bins - 1)  # q = 1 goes into the last bin
    bins = []
    for b in range(n_bins):
        mask = index == b
        count = int(mask.sum())
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": count,
                     "confidence": float(q[mask].mean()) if count else None,
                     "frequency": float(y[mask].mean()) if count else None})
    return bins


def expected_calibration_error(p_chosen: torch.Tensor, n_bins: int = CALIBRATION_BINS) -> float:
    """ECE of Bradley–Terry probabilities `p_chosen[N]` = σ(r_w − r_l) (definition in the module docstring)."""
    bins = calibration_bins(p_chosen, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return float("nan")
    return sum(b["count"] / total * abs(b["frequency"] - b["confidence"]) for b in bins if b["count"])


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor, *, aggregation: dict | None = None,
                   normalization: dict | None = None, member_names: list[str] | None = None,
                   with_bins: bool = False) -> dict:
    """Evaluation metrics of rewards `chosen[N, K]`, `rejected[N, K]` of N labelled pairs.

    → `{"members": {name: {"accuracy", "ece", "mean_margin", "mean_p"}}, "ensemble": {...} | None, "pairs": N}`;
    the ensemble entry (K ≥ 2) aggregates with `aggregation` (`{"method", **params}`, default mean) after z-scoring
    every member with `normalization` (`{"mean": [K], "std": [K]}`) when given. Per-member calibration always uses
    the raw rewards: σ(r_w − r_l) is the probability a Bradley–Terry member was trained to output. `with_bins` adds
    each entry's reliability bins (`calibration_bins`).
    """
    chosen, rejected = chosen.detach().double(), rejected.detach().double()
    n, k = chosen.shape
    names = member_names or [f"member_{i}" for i in range(k)]

    def entry(r_w: torch.Tensor, r_l: torch.Tensor) -> dict:
        p = torch.sigmoid(r_w - r_l)
        out = {"accuracy": float(pairwise_accuracy(r_w, r_l).mean()), "ece": expected_calibration_error(p),
               "mean_margin": float((r_w - r_l).mean()), "mean_p": float(p.mean())}
        if with_bins:
            out["bins"] = calibration_bins(p)
        return out

    result = {"pairs": n, "members": {name: entry(chosen[:, i], rejected[:, i]) for i, name in enumerate(names)},
              "ensemble": None}
    if k >= 2:
        agg = dict(aggregation or {"method": "mean"})
        method = agg.pop("method")
        if normalization is not None:
            chosen = normalize(chosen, normalization["mean"], normalization["std"])
            rejected = normalize(rejected, normalization["mean"], normalization["std"])
        result["ensemble"] = {"method": method, **agg, "normalized": normalization is not None,
                              **entry(aggregate(chosen, method, **agg), aggregate(rejected, method, **agg))}
    return result


def flat_metrics(metrics: dict) -> dict[str, float]:
    """`reward_metrics` → flat `{"accuracy/member_0": ..., "ece/ensemble": ...}` for the Trainer's logs."""
    out = {}
    for name, values in metrics["members"].items():
        for key in ("accuracy", "ece", "mean_margin"):
            out[f"{key}/{name}"] = values[key]
    if metrics["ensemble"] is not None:
        for key in ("accuracy", "ece", "mean_margin"):
            out[f"{key}/ensemble"] = metrics["ensemble"][key]
    return out


@torch.no_grad()
def pair_rewards(model: torch.nn.Module, dataset, *, pad_token_id: int, batch_size: int = 32,
                 device=None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of every pair of a `RewardPairs` dataset → `(chosen[N, K], rejected[N, K])`, fp32 on the CPU.

    `model(input_ids, attention_mask) -> [rows, K]`; scored in eval mode (the mode is restored after), in dataset
    order, `batch_size` pairs (2·batch_size rows) at a time."""
    from tqdm.auto import tqdm

    collate = RewardCollator(pad_token_id)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc="evaluating", unit="batch", disable=not progress):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            rewards = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
            half = rewards.shape[0] // 2
            chosen.append(rewards[:half])
            rejected.append(rewards[half:])
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


# ---------------------------------------------------------------------------------------------------------------
# The trainer


class RewardTrainer(MarkedCheckpointTrainer):
    """Trains a reward model or ensemble on preference pairs with the Bradley–Terry loss.

    Args:
        model: a `RewardEnsemble` (or any module with `forward(input_ids[N, T], attention_mask[N, T]) -> [N, K]` and
            `num_members`), e.g. a one-member view of member k of a `seeds` ensemble.
        args: `TrainingArguments` (see `rm_training_arguments`).
        train_dataset / eval_dataset: `RewardPairs` (items `{"chosen_input_ids", "rejected_input_ids"}`).
        processing_class: the tokenizer (its pad id pads the rows).
        margin, label_smoothing: the Bradley–Terry options (reward_models/loss.py).
        aggregation: `{"method", **params}` for the ensemble metrics; default the model's own `aggregation`.
        member_names: names of the K columns in the logs (default `member_0`...; a one-member view of member k of a
            `seeds` ensemble passes `["member_k"]`).
    """

    def __init__(self, *, model, args, train_dataset, eval_dataset=None, processing_class=None, data_collator=None,
                 margin: float = 0.0, label_smoothing: float = 0.0, aggregation: dict | None = None,
                 member_names: list[str] | None = None, callbacks=None):
        if data_collator is None:
            data_collator = RewardCollator(processing_class.pad_token_id)
        self.num_members = int(model.num_members)
        self.member_names = member_names or [f"member_{k}" for k in range(self.num_members)]
        if len(self.member_names) != self.num_members:
            raise ValueError(f"member_names has {len(self.member_names)} names for {self.num_members} members")
        self.aggregation = dict(aggregation or getattr(model, "aggregation", None) or {"method": "mean"})
        self.margin, self.label_smoothing = margin, label_smoothing
        if getattr(model, "config", None) is None and hasattr(model, "backbones"):
            # DeepSpeed's "auto" bucket sizes (reduce_bucket_size, ...) and the Trainer's special-token alignment read
            # `model.config`; an ensemble's members share their backbone's architecture, so its config answers.
            model.config = model.backbones()[0].config
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=self._compute_metrics, callbacks=callbacks)
        # The loss is a mean over pairs, not a sum over tokens: let the Trainer divide by accumulation steps.
        self.model_accepts_loss_kwargs = False
        if activation_checkpointing(self.args)[0] and not hasattr(model, "activation_checkpointing_enable"):
            self._enable_activation_checkpointing(model)
        # Running [sum, count] per metric over the logging window (a short last batch weighs what it holds).
        self._train_metrics = MetricWindow()

    # --- checkpoints: complete-marked, checked against the resuming recipe, exact resume --------------------------
    # `MarkedCheckpointTrainer` (align/trainer.py) is the protocol; a reward model has no objective or reference state,
    # so the Trainer's own files (weights, optimizer, scheduler, RNG states, data position) are all of it.

    def _checkpoint_identity(self) -> dict:
        """What a checkpoint belongs to: resumed into another ensemble kind, member or seed, its weights would load
        into the wrong model (or, loaded non-strictly, not at all)."""
        return {"ensemble_kind": getattr(self.model, "kind", type(self.model).__name__),
                "members": list(self.member_names), "seeds": list(getattr(self.model, "seeds", []))}

    def _enable_activation_checkpointing(self, model) -> None:
        """transformers >= 5 enables checkpointing through `activation_checkpointing_enable(kwargs, every_n_layers,
        offload)` and, for modules without it, calls `gradient_checkpointing_enable` with those extra keywords,
        which `RewardEnsemble.gradient_checkpointing_enable(gradient_checkpointing_kwargs)` does not take. Enable it
        here through the ensemble's own method (every member model, with the ensemble's checks) and tell the Trainer
        it is done."""
        from align.errors import ConfigError

        kwargs = activation_checkpointing(self.args)[1]
        if kwargs.pop("every_n_layers", 1) != 1 or kwargs.pop("offload", False):
            raise ConfigError("training.activation_checkpointing_kwargs: every_n_layers and offload are not "
                              "supported for reward ensembles")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or {"use_reentrant": False})
        # the Trainer's own call would fail on the extra keywords (transformers 5.19 names it gradient_checkpointing)
        setattr(self.args, installed_training_key("activation_checkpointing"), False)

    # --- loss ---------------------------------------------------------------------------------------------------

    def _aggregate(self, rewards: torch.Tensor) -> torch.Tensor:
        if rewards.shape[-1] < 2:
            return rewards.mean(dim=-1)
        params = dict(self.aggregation)
        return aggregate(rewards, params.pop("method"), **params)

    def _pair_losses(self, model, inputs):
        rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])  # [2B, K]
        half = rewards.shape[0] // 2
        chosen, rejected = rewards[:half], rewards[half:]
        losses, metrics = bradley_terry_loss(chosen, rejected, margin=self.margin,
                                             label_smoothing=self.label_smoothing, aggregate=self._aggregate)
        return chosen, rejected, losses, metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chosen, rejected, losses, metrics = self._pair_losses(model, inputs)
        # Mean over pairs, sum over members: member k's gradient is that of its own mean BT loss.
        loss = losses.mean(dim=0).sum()
        if model.training:
            self._record(losses.detach(), metrics)
        return (loss, {"chosen": chosen, "rejected": rejected}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """→ (loss, rewards [B, 2, K] (chosen, rejected), labels [B] = 1: "the chosen response is better")."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            chosen, rejected, losses, _ = self._pair_losses(model, inputs)
        loss = losses.mean(dim=0).sum().detach()
        if prediction_loss_only:
            return loss, None, None
        rewards = torch.stack([chosen, rejected], dim=1).detach().float()
        return loss, rewards, torch.ones(rewards.shape[0], device=rewards.device)

    def _compute_metrics(self, prediction) -> dict[str, float]:
        rewards = torch.as_tensor(np.asarray(prediction.predictions), dtype=torch.float64)  # [N, 2, K]
        metrics = reward_metrics(rewards[:, 0], rewards[:, 1], aggregation=self.aggregation,
                                 member_names=self.member_names)
        return flat_metrics(metrics)

    # --- training metrics ---------------------------------------------------------------------------------------

    def _record(self, losses: torch.Tensor, metrics: dict) -> None:
        per_pair = {}
        for k, name in enumerate(self.member_names):
            per_pair[f"loss/{name}"] = losses[:, k]
            per_pair[f"accuracy/{name}"] = metrics["accuracy"][:, k]
            per_pair[f"margin/{name}"] = metrics["margin"][:, k]
        if self.num_members > 1:
            per_pair["accuracy/ensemble"] = metrics["ensemble_accuracy"]
        self._train_metrics.add(per_pair, gather=self.accelerator.gather)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs (the ones with the running loss) carry the window's averages; evaluation logs already hold
        # `compute_metrics`' values.
        if "loss" in logs and self._train_metrics:
            logs.update(self._train_metrics.flush())
        super().log(logs, start_time)
