"""A reward-model ensemble as the core's reward interface (`align.rewards.RewardFunction`)."""

from __future__ import annotations

from collections.abc import Sequence

from align.rewards import RewardFunction, RewardScores
from reward_models.ensemble import RewardEnsemble


class EnsembleReward(RewardFunction):
    """Scores with a `RewardEnsemble` and optimises its aggregate under `aggregation`.

    Args:
        ensemble: a loaded ensemble (`RewardEnsemble.load(DIR)`).
        aggregation: `{"method": "mean" | "wco" | "uwo", **params}`; None keeps the ensemble's own (its manifest's).
        batch_size: rows per scoring forward.
        max_length: keep the last `max_length` tokens of longer prompt + completion rows (None: no truncation).
    """

    def __init__(self, ensemble: RewardEnsemble, aggregation: dict | None = None, *, batch_size: int = 64,
                 max_length: int | None = None):
        if aggregation is not None:
            ensemble.set_aggregation(aggregation)  # validated against K: wco/uwo need K >= 2
        self.ensemble, self.batch_size, self.max_length = ensemble, batch_size, max_length
        self.name = f"ensemble:{ensemble.aggregation['method']}"
        self.member_names = [f"member_{k}" for k in range(ensemble.num_members)]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> RewardScores:
        members, reward = self.ensemble.score(list(prompts), list(completions), batch_size=self.batch_size,
                                              max_length=self.max_length)
        return RewardScores(members=members, reward=reward)
