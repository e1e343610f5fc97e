"""Rollouts: sample completions from a policy behind one interface (`RolloutBackend`).

Backends: `hf` (transformers `generate`, the CPU default). A vLLM backend joins through the same interface.
"""

from align.rollout.base import Completion, RolloutBackend, SamplingParams
from align.rollout.hf import HFRollout

__all__ = ["Completion", "RolloutBackend", "SamplingParams", "HFRollout"]
