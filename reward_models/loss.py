"""The Bradley–Terry loss of reward-model training, as a pure function of rewards (METHODS §8).

A reward model r scores a (prompt, response) pair with one number. Under the Bradley–Terry model the probability
that the labelled-chosen response y_w beats the rejected y_l is σ(r(x, y_w) − r(x, y_l)), so training minimises

    ℓ = −log σ(d − m),        d = r_w − r_l,  m = margin (0 by default; TRL's RewardTrainer `margin` column)

and, with label smoothing ε (the label is taken to be right with probability 1 − ε, as in cDPO),

    ℓ = −(1 − ε) · log σ(d − m) − ε · log σ(−(d − m)).

Both terms are computed with `logsigmoid` (METHODS §0): `−log σ(z)` = softplus(−z) never overflows, whatever the
magnitude of the rewards. An ensemble of K members is trained on the sum of its members' losses; every member's
loss depends only on its own rewards, so its gradient is the one it would get trained alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """1 where the chosen response scores higher, 0 where lower, ½ on a tie (a constant model is at chance, ½).

    Shapes: any two equal shapes → the same shape, float32.
    """
    diff = chosen.detach().float() - rejected.detach().float()
    return (diff > 0).float() + 0.5 * (diff == 0).float()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, margin: float | torch.Tensor = 0.0,
                       label_smoothing: float = 0.0,
                       aggregate: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair, per-member Bradley–Terry losses and accuracy metrics.

    Args:
        chosen: rewards of the chosen responses, [B, K] (K ensemble members; K = 1 for a single model).
        rejected: rewards of the rejected responses, [B, K].
        margin: m ≥ 0 that the chosen reward must exceed the rejected one by; a float or a per-pair Tensor [B].
        label_smoothing: ε ∈ [0, 0.5): probability that a pair's label is wrong (see the module docstring).
        aggregate: maps rewards [B, K] → [B] for the ensemble's accuracy (the configured aggregation, e.g. WCO);
            default: the mean over members.

    Returns:
        losses: [B, K] float32 (the caller reduces: the trainer takes the mean over pairs, summed over members);
        metrics (detached, per pair so that a logging window can average them exactly):
            "accuracy":          [B, K] pairwise accuracy of each member (1, 0, or ½ on a tie);
            "margin":            [B, K] reward difference r_w − r_l of each member;
            "ensemble_accuracy": [B]    pairwise accuracy of the aggregated rewards.
    """
    if chosen.shape != rejected.shape or chosen.dim() != 2:
        raise ValueError(f"chosen and rejected must both be [B, K]; got {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    # fp32 whatever the model's dtype (METHODS §0): a bf16 difference of two rewards loses most of its bits.
    diff = chosen.float() - rejected.float()  # [B, K]
    if isinstance(margin, torch.Tensor):
        if margin.dim() != 1 or margin.shape[0] != diff.shape[0]:
            raise ValueError(f"a margin tensor must be [B] = [{diff.shape[0]}], got {tuple(margin.shape)}")
        margin = margin.to(diff.device, torch.float32)[:, None]  # the same margin for every member of a pair
    logits = diff - margin
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)

    aggregate = aggregate or (lambda rewards: rewards.mean(dim=-1))
    with torch.no_grad():
        metrics = {
            "accuracy": pairwise_accuracy(chosen, rejected),
            "margin": diff.detach(),
            "ensemble_accuracy": pairwise_accuracy(aggregate(chosen.detach().float()),
                                                   aggregate(rejected.detach().float())),
        }
    return losses, metrics
