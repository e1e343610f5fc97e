"""Reward models, ensembles and conservative aggregation (METHODS §8, Coste et al. 2023).

- `aggregate(scores[B, K], method, **params) -> [B]` and the registry `AGGREGATIONS` (`mean`, `wco`, `uwo`);
- `RewardEnsemble` (kinds `seeds`, `multi_head`, `lora`): `score(prompts, responses) -> (per_member[B, K],
  aggregate[B])`, `save(directory)`, `load_ensemble(directory)`.

Importing this package imports torch only; transformers and PEFT are imported when an ensemble is built or loaded.
"""

from reward_models.aggregate import AGGREGATIONS, aggregate, check_aggregation, register_aggregation
from reward_models.ensemble import ENSEMBLE_KINDS, RewardEnsemble, load_ensemble

__all__ = ["AGGREGATIONS", "ENSEMBLE_KINDS", "RewardEnsemble", "aggregate", "check_aggregation", "load_ensemble",
           "register_aggregation"]
