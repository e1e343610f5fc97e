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
from dataclasses import dataclass, field

import torch

from align.divergences import Divergence
from align.errors import ConfigError
from align.objectives.base import Objective, check_number, register_objective
from align.registry import normalise_name


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
    target = target_logps.to(dtype)
    log_t = policy.detach() - target + torch.as_tensor(log_z, dtype=dtype, device=policy.device)
    # Where the target is 0 (a constraint target's b = 0), π/p = +∞ whatever log Z is (even −∞, when no sample of the
    # prompt has met the constraint yet): f′(∞) is finite for forward KL, JS, TV and alpha.
    log_t = torch.where(torch.isneginf(target), torch.full_like(log_t, math.inf), log_t)
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


# --- the registered objective ------------------------------------------------------------------------------------

BASELINES = ("moving", "leave_one_out", "none")


@register_objective("fdpg", "f_dpg")
class FDPG(Objective):
    """f-DPG (METHODS §5) as a registered objective of the on-policy family: the on-policy trainer samples G
    completions per prompt, computes target log-probs (`align.targets`) and calls `loss`.

    It holds the state a resumed run needs: the per-prompt log Z table and the moving baseline's window.
    """

    family = "on_policy"

    @dataclass
    class Params:
        divergence: str = field(default="reverse_kl", metadata={
            "help": "D_f(π‖p) to minimise: reverse_kl (KL-regularised RLHF with the exponential target), forward_kl "
                    "(DPG), js (disco's default), tv, or alpha (with `alpha`)."})
        alpha: float = field(default=0.5, metadata={"help": "α of the alpha divergence, in (0, 1)."})
        baseline: str = field(default="moving", metadata={
            "help": "moving: mean of the last baseline_window pseudo-rewards (disco); leave_one_out: per prompt, the "
                    "mean of its other G−1 samples (needs generation.num_samples >= 2); none."})
        baseline_window: int = field(default=1024, metadata={"help": "Pseudo-rewards the moving baseline averages."})
        max_importance_weight: float | None = field(default=None, metadata={
            "help": "Truncate the sequence importance weight π_θ/q at this value (null: no truncation). q is the "
                    "sampler: it differs from π_θ when vLLM is synced every k > 1 steps or samples in bf16."})

        def __post_init__(self):
            from align.divergences import get_divergence

            divergence_params = {"alpha": self.alpha} if normalise_name(self.divergence) in ("alpha",
                                                                                           "alpha_divergence") else {}
            try:
                get_divergence(self.divergence, require_closed_form=False, **divergence_params)
            except ConfigError as e:
                raise ConfigError(f"divergence: {e}") from None
            if self.baseline not in BASELINES:
                raise ConfigError(f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
            check_number("baseline_window", self.baseline_window, ge=1, integer=True)
            if self.max_importance_weight is not None:
                check_number("max_importance_weight", self.max_importance_weight, gt=1.0)

    def __init__(self, params=None, *, seed: int = 0):
        super().__init__(params, seed=seed)
        from align.divergences import get_divergence

        p = self.params
        extra = {"alpha": p.alpha} if normalise_name(p.divergence) in ("alpha", "alpha_divergence") else {}
        self.divergence = get_divergence(p.divergence, require_closed_form=False, **extra)
        self.log_z = LogPartitionTable()
        self.moving_baseline = MovingBaseline(p.baseline_window)

    def __call__(self, policy, reference):
        raise TypeError("fdpg is an on-policy objective: its trainer calls FDPG.loss, not a pair objective's call")

    def update_log_z(self, keys: list[str], target_logps: torch.Tensor, sampler_logps: torch.Tensor) -> None:
        """Adds the samples of each prompt (`[P, G]` log P and log q; `keys[i]` names prompt i) to the log Z table.
        Every process must add the same samples (the trainer gathers them), so the tables stay identical."""
        for key, target, sampler in zip(keys, target_logps, sampler_logps):
            self.log_z.update(key, target, sampler)

    def loss(self, policy_logps: torch.Tensor, target_logps: torch.Tensor, sampler_logps: torch.Tensor,
             keys: list[str], gather=lambda t: t) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample f-DPG losses `[P, G]` and detached per-sample metrics `{name: [P, G]}`.

        Args:
            policy_logps: `[P, G]` log π_θ(y|x) with gradient.
            target_logps: `[P, G]` log P(y|x) (`align.targets`).
            sampler_logps: `[P, G]` log q(y|x) of the sampler.
            keys: the P prompts' keys into the log Z table (updated before this call).
            gather: the cross-process gather; the moving baseline is updated with every process's pseudo-rewards.
        """
        log_z = torch.tensor([self.log_z[k] for k in keys], dtype=torch.float64, device=policy_logps.device)[:, None]
        terms = fdpg_loss(policy_logps, target_logps, log_z, sampler_logps, self.divergence,
                          max_importance_weight=self.params.max_importance_weight)
        # B is a baseline of the pseudo-reward R: the loss is w·(f′ + B)·log π_θ = −w·(R − B)·log π_θ.
        kind = self.params.baseline
        if kind == "moving":
            baseline = torch.full_like(terms.pseudo_rewards, self.moving_baseline.value())
            self.moving_baseline.update(gather(terms.pseudo_rewards.float().contiguous()).cpu())  # after its use
        elif kind == "leave_one_out":
            baseline = leave_one_out_baseline(terms.pseudo_rewards)
        else:
            baseline = torch.zeros_like(terms.pseudo_rewards)
        losses = terms.importance_weights * (baseline - terms.pseudo_rewards) * policy_logps.to(baseline.dtype)
        log_t = terms.log_ratio_to_target
        metrics = {
            "fdpg/pseudo_reward": terms.pseudo_rewards.float(),
            "fdpg/baseline": baseline.float(),
            "fdpg/log_z": log_z.expand_as(log_t).float(),
            # D_f(π‖p) = E_p[f(π/p)] = E_π[f(t)/t], t = π/p: a Monte-Carlo estimate from on-policy samples.
            "fdpg/divergence": _f_over_t(self.divergence, log_t).float(),
            "fdpg/log_ratio_to_target": log_t.float(),
            "importance_weight/mean": terms.importance_weights.float(),
            "importance_weight/truncated": terms.truncated.float(),
        }
        return losses, {k: v.detach() for k, v in metrics.items()}

    def state_dict(self):
        return {"log_z": self.log_z.state_dict(), "moving_baseline": self.moving_baseline.state_dict()}

    def load_state_dict(self, state):
        self.log_z.load_state_dict(state["log_z"])
        self.moving_baseline.load_state_dict(state["moving_baseline"])


def _f_over_t(divergence: Divergence, log_t: torch.Tensor) -> torch.Tensor:
    """f(t)/t from log t in fp64 (log t clamped to ±700 so that t stays finite): the integrand of D_f under π."""
    t = log_t.double().clamp(-700.0, 700.0).exp()
    return divergence.f(t) / t
