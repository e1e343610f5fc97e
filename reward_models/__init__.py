"""Reward models, ensembles and conservative aggregation (filled by the reward-model issue)."""
