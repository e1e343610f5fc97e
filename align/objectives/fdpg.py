"""f-DPG (Go et al. 2023, "Aligning Language Models with Preferences through f-divergence Minimization"; METHODS §5):
the pure functions of the on-policy objective. The trainer that samples, scores and steps comes separately.

The policy π_θ is fitted to an explicit target p(y|x) = P(y|x)/Z(x) by minimising D_f(π_θ‖p) = Σ_y p f(π_θ/p). Its
gradient is `E_{y∼q}[(π_θ/q) f′(π_θ/p) ∇log π_θ]` for any sampler q with full support, so with the pseudo-reward
`R = −f′(π_θ/p)` (computed from `log(π_θ/p) = log π_θ − log P + log Z`, never from the ratio itself) and a baseline B,
the per-sample surrogate loss is

    loss(y) = w(y) · (f′(π_θ/p)(y) + B) · log π_θ(y),      w = π_θ/q  (detached, optionally truncated)

whose gradient in expectation over q is exactly ∇D_f (B is any constant or a function of the other samples:
E_q[w ∇log π_θ] = ∇Σ_y π_θ(y) = 0). f′, w and B carry no gradient (disco/tuners/losses/f_divergence.py).

log Z(x) is estimated per prompt by importance sampling, log mean_q[P/q], accumulated over every sample ever seen for
that prompt (`LogPartitionTable`, disco's cumulative `_update_moving_z`). Baselines: the windowed moving average of
pseudo-rewards (`MovingBaseline`, disco's default) or per-prompt leave-one-out (`leave_one_out_baseline`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

from align.divergences import Divergence


@dataclass
class FDPGTerms:
    """What `fdpg_loss` computed, per sample (N samples). All detached except `losses`.

    Attributes:
        losses: `[N]` surrogate losses (the mean is what is minimised; gradients flow through `policy_logps`).
        pseudo_rewards: `[N]` R = −f′(π_θ/p).
        log_ratio_to_target: `[N]` log(π_θ/p) = log π_θ − log P + log Z.
        importance_weights: `[N]` w = π_θ/q after truncation.
        truncated: `[N]` bool, where the weight was cut at `max_importance_weight`.
    """

    losses: torch.Tensor
    pseudo_rewards: torch.Tensor
    log_ratio_to_target: torch.Tensor
    importance_weights: torch.Tensor
    truncated: torch.Tensor


def fdpg_loss(policy_logps: torch.Tensor, target_logps: torch.Tensor, log_z: torch.Tensor | float,
              sampler_logps: torch.Tensor, divergence: Divergence, baseline: torch.Tensor | float = 0.0,
              max_importance_weight: float | None = None) -> FDPGTerms:
    """The f-DPG surrogate loss of N sampled sequences (module docstring).

    Args:
        policy_logps: `[N]` log π_θ(y|x), sequence sums, with gradient.
        target_logps: `[N]` log P(y|x), the unnormalised target (e.g. log a(y|x) + r(y)/β).
        log_z: `[N]` or scalar, the estimate of log Z(x) for each sample's prompt.
        sampler_logps: `[N]` log q(y|x) of the policy that sampled y (the rollout engine's log-probs).
        divergence: the f-divergence (`align.divergences`, any with f′: reverse_kl, forward_kl, js, alpha, and tv via
            `get_divergence("tv", require_closed_form=False)`); `f_prime_from_log` gives f′ from log(π_θ/p) stably.
        baseline: scalar or `[N]` B, the baseline of the pseudo-reward (0: none).
        max_importance_weight: truncate w = π_θ/q at this value (None: no truncation). Truncation trades the
            gradient's unbiasedness for variance when the sampler lags the policy.

    Returns `FDPGTerms` in fp32 (fp64 when `policy_logps` is fp64).
    """
    dtype = torch.float64 if policy_logps.dtype == torch.float64 else torch.float32  # fp64 for the oracle tests
    policy = policy_logps.to(dtype)
    log_t = policy.detach() - target_logps.to(dtype) + torch.as_tensor(log_z, dtype=dtype, device=policy.device)
    f_prime = divergence.f_prime_from_log(log_t)
    log_w = policy.detach() - sampler_logps.to(dtype)
    truncated = torch.zeros_like(log_w, dtype=torch.bool)
    if max_importance_weight is not None:
        cap = math.log(max_importance_weight)
        truncated = log_w > cap
        log_w = log_w.clamp(max=cap)
    w = log_w.exp()
    b = torch.as_tensor(baseline, dtype=dtype, device=policy.device)
    losses = w * (f_prime + b) * policy
    return FDPGTerms(losses=losses, pseudo_rewards=-f_prime, log_ratio_to_target=log_t, importance_weights=w,
                     truncated=truncated)


def log_importance_mean(target_logps: torch.Tensor, sampler_logps: torch.Tensor) -> torch.Tensor:
    """log mean_i P(y_i)/q(y_i) over the last dimension, overflow-free (logsumexp): the IS estimate of log Z."""
    log_ratio = target_logps.double() - sampler_logps.double()
    return torch.logsumexp(log_ratio, dim=-1) - math.log(log_ratio.shape[-1])


class LogPartitionTable:
    """Per-prompt log Z estimates, each the importance-sampling mean over every sample seen for that prompt.

    Keeps, per prompt key, log Σ_i P(y_i)/q(y_i) and the sample count, in fp64, so an update with a batch equals one
    estimate over all samples so far (disco's cumulative moving average). `state_dict` / `load_state_dict` carry it
    through checkpoints exactly.
    """

    def __init__(self):
        self._log_sum: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def update(self, key: str, target_logps: torch.Tensor, sampler_logps: torch.Tensor) -> float:
        """Adds the samples `[G]` of prompt `key`; returns its new log Z estimate."""
        log_ratio = target_logps.double().reshape(-1) - sampler_logps.double().reshape(-1)
        batch = float(torch.logsumexp(log_ratio, dim=0))
        old = self._log_sum.get(key)
        self._log_sum[key] = batch if old is None else float(torch.logaddexp(torch.tensor(old, dtype=torch.float64),
                                                                             torch.tensor(batch, dtype=torch.float64)))
        self._count[key] = self._count.get(key, 0) + log_ratio.numel()
        return self[key]

    def __getitem__(self, key: str) -> float:
        return self._log_sum[key] - math.log(self._count[key])

    def __contains__(self, key: str) -> bool:
        return key in self._log_sum

    def __len__(self) -> int:
        return len(self._log_sum)

    def state_dict(self) -> dict:
        return {"log_sum": dict(self._log_sum), "count": dict(self._count)}

    def load_state_dict(self, state: dict) -> None:
        self._log_sum, self._count = dict(state["log_sum"]), dict(state["count"])


class MovingBaseline:
    """The mean of the last `window` pseudo-rewards (disco's default baseline; 0 before any), updated after use."""

    def __init__(self, window: int = 1024):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._values: deque[float] = deque(maxlen=window)

    def value(self) -> float:
        return sum(self._values) / len(self._values) if self._values else 0.0

    def update(self, pseudo_rewards: torch.Tensor) -> None:
        self._values.extend(float(r) for r in pseudo_rewards.detach().reshape(-1))

    def state_dict(self) -> dict:
        return {"window": self.window, "values": list(self._values)}

    def load_state_dict(self, state: dict) -> None:
        self.window = state["window"]
        self._values = deque(state["values"], maxlen=self.window)


def leave_one_out_baseline(pseudo_rewards: torch.Tensor) -> torch.Tensor:
    """`[P, G]` → `[P, G]`: for each sample, the mean pseudo-reward of the other G − 1 samples of its prompt (G ≥ 2).
    It does not depend on the sample itself, so the gradient stays unbiased (RLOO's baseline)."""
    G = pseudo_rewards.shape[-1]
    if G < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 samples per prompt")
    r = pseudo_rewards.detach()
    return (r.sum(dim=-1, keepdim=True) - r) / (G - 1)
