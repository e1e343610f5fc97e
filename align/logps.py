"""Per-token log-probabilities of preference pairs: the tensors that cross every seam.

`PairLogps` is what the policy forward and every reference kind return, and what every objective consumes.
Log-probs are fp32 whatever the model's dtype (METHODS.md §0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PairLogps:
    """Token log-probs of the chosen and rejected completions of a batch of B pairs.

    Attributes:
        chosen: `[B, Tc]` fp32, log π(y_t | x, y_<t) at each chosen completion token; 0 where `chosen_mask` is False.
        chosen_mask: `[B, Tc]` bool, True on real completion tokens (prompt and padding are never included).
        rejected: `[B, Tr]` fp32, the same for the rejected completion.
        rejected_mask: `[B, Tr]` bool.
    """

    chosen: torch.Tensor
    chosen_mask: torch.Tensor
    rejected: torch.Tensor
    rejected_mask: torch.Tensor

    def chosen_sum(self) -> torch.Tensor:
        """`[B]` sequence log-prob log π(y_w | x) (sum over completion tokens)."""
        return (self.chosen * self.chosen_mask).sum(-1)

    def rejected_sum(self) -> torch.Tensor:
        """`[B]` sequence log-prob log π(y_l | x)."""
        return (self.rejected * self.rejected_mask).sum(-1)

    def detach(self) -> "PairLogps":
        return PairLogps(self.chosen.detach(), self.chosen_mask, self.rejected.detach(), self.rejected_mask)
