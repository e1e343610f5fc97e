"""Preference objectives: pure functions of log-probs, behind a registry (see `base.Objective`).

Registered: `fdpo` (aliases `dpo`, `f_dpo`; f-DPO, DPO with the default reverse KL) and `sampo` (family "pairs"),
`fdpg` (family "on_policy": f-DPG, trained on sampled completions).
"""

from align.objectives.base import OBJECTIVES, Objective, build_objective, get_objective, register_objective
from align.objectives.fdpo import FDPO, FDivergenceParams, fdpo_loss, fdpo_loss_from_logratios
from align.objectives.fdpg import FDPG
from align.objectives.sampo import SamPO, SamPOParams, sampo_downsample_masks, sampo_loss

__all__ = [
    "OBJECTIVES",
    "Objective",
    "get_objective",
    "build_objective",
    "register_objective",
    "FDPG",
    "FDPO",
    "FDivergenceParams",
    "fdpo_loss",
    "fdpo_loss_from_logratios",
    "SamPO",
    "SamPOParams",
    "sampo_downsample_masks",
    "sampo_loss",
]
