"""f-DPG targets (METHODS §5, §7.1): the unnormalised target log P(y|x) that the policy is fitted to.

Every target is the reference a(y|x) (the reference manager's model: frozen, peft_disabled, soup or tr_dpo, so soups
and TR-DPO references serve as the prior) reweighted by a function of the reward r(y):

- `exponential`: log P = log a + r/β. Reverse KL to it is KL-regularised RLHF (Go et al. 2023; naver/disco's
  `ExponentialScorer`); its optimum is the RLHF optimum a·exp(r/β)/Z.
- `constraint`: log P = log a + log b, b = 1 where r ≥ threshold, else ε (GDC's pointwise constraint, Khalifa et al.
  2021, with b ∈ {0, 1} at ε = 0). With ε = 0 the target has zeros, so reverse KL to it is infinite: use
  forward_kl (DPG), js, tv or alpha, or give ε > 0.
- `best_of_n`: log P = log a + log w_n(r), the best-of-n policy π_n of Beirami et al. (METHODS §7.1). w_n comes from
  the distribution of r under a, estimated per prompt from M samples of a drawn once before training
  (`fit_prompt`; Amini et al. 2024 do the same). With ties, `best_of_n_log_weight` is the tie-exact law
  `(F^n − F⁻^n)/(F − F⁻)`; at a reward value none of the M samples had it is the atomless `n F^{n−1}`. It needs a
  reference that does not move (not tr_dpo).

A target is a pure function of reference log-probs and rewards (`log_prob`); `best_of_n` also keeps the per-prompt
reward samples it was fitted to, as checkpoint state.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from align.errors import ConfigError
from align.registry import Registry, normalise_name
from align.schema import from_dict

#: `target.kind` → Target subclass.
TARGETS = Registry("target kind", normalise=normalise_name)


def register_target(kind: str):
    def decorator(cls):
        cls.kind = kind
        return TARGETS.register(kind)(cls)

    return decorator


class Target(abc.ABC):
    """log P(y|x) = log a(y|x) + g(r(y), x). Subclasses set `Params` (a documented dataclass) and `log_prob`."""

    kind: ClassVar[str]
    #: True when the target is fitted to the reference once (best_of_n): a moving reference is refused.
    needs_fixed_reference: ClassVar[bool] = False
    #: Reference samples per prompt the target needs before training (0: none).
    samples_per_prompt: int = 0

    @dataclass
    class Params:
        pass

    def __init__(self, params):
        self.params = params

    @abc.abstractmethod
    def log_prob(self, reference_logps: torch.Tensor, rewards: torch.Tensor, prompt_keys: list[str]) -> torch.Tensor:
        """`[P, G]` log P of G completions of each of P prompts from their reference log-probs `[P, G]` (sequence
        sums log a(y|x)) and rewards `[P, G]`; `prompt_keys[i]` identifies prompt i (its token ids). fp64."""

    def fit_prompt(self, key: str, rewards: torch.Tensor) -> None:
        """Rewards `[M]` of M samples of the reference for prompt `key` (only targets with `samples_per_prompt`)."""

    def fitted(self, key: str) -> bool:
        return True

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@register_target("exponential")
class ExponentialTarget(Target):
    """log P = log a + r/β: reverse-KL f-DPG to it is KL-regularised RLHF with KL weight β."""

    @dataclass
    class Params:
        beta: float = field(default=0.1, metadata={
            "help": "β > 0, the temperature of the reward: small β trusts the reward more (moves further from a)."})

        def __post_init__(self):
            if isinstance(self.beta, bool) or not self.beta > 0:
                raise ConfigError(f"beta must be > 0, got {self.beta}")

    def log_prob(self, reference_logps, rewards, prompt_keys):
        return reference_logps.double() + rewards.double() / self.params.beta


@register_target("constraint")
class ConstraintTarget(Target):
    """log P = log a + log b with b = 1 where r ≥ threshold, else ε (GDC pointwise constraint)."""

    @dataclass
    class Params:
        threshold: float = field(default=0.0, metadata={
            "help": "A completion satisfies the constraint when its reward is >= threshold (b = 1)."})
        epsilon: float = field(default=0.0, metadata={
            "help": "b of a completion that does not satisfy it, in [0, 1). 0 (GDC) gives the target zeros, which "
                    "reverse KL cannot fit: use forward_kl, js, tv or alpha, or epsilon > 0."})

        def __post_init__(self):
            if isinstance(self.threshold, bool) or not math.isfinite(self.threshold):
                raise ConfigError(f"threshold must be a finite number, got {self.threshold}")
            if isinstance(self.epsilon, bool) or not 0.0 <= self.epsilon < 1.0:
                raise ConfigError(f"epsilon must be in [0, 1), got {self.epsilon}")

    def log_prob(self, reference_logps, rewards, prompt_keys):
        log_b = torch.full_like(rewards, math.log(self.params.epsilon) if self.params.epsilon > 0 else -math.inf,
                                dtype=torch.float64)
        log_b = torch.where(rewards >= self.params.threshold, torch.zeros_like(log_b), log_b)
        return reference_logps.double() + log_b


def best_of_n_log_weight(cdf: torch.Tensor, cdf_below: torch.Tensor, n: int) -> torch.Tensor:
    """log w_n: the best-of-n law's density ratio to a at rewards whose CDF values are F = P(R ≤ r) and F⁻ = P(R < r)
    (METHODS §7.1). Where F > F⁻ (an atom of the reward law): log((F^n − F⁻^n)/(F − F⁻)), tie-exact; where F = F⁻:
    log n + (n − 1) log F, the atomless limit. Elementwise, fp64, overflow-free for any n."""
    cdf, cdf_below = cdf.double(), cdf_below.double()
    atomless = math.log(n) + (n - 1) * cdf.log()
    log_f, log_fb = cdf.log(), cdf_below.log()
    # F^n − F⁻^n = F^n (1 − (F⁻/F)^n); F − F⁻ = F (1 − F⁻/F): both via log1mexp of a log ratio ≤ 0.
    log_ratio = (log_fb - log_f).clamp(max=0.0)
    tied = log_f + (n - 1) * log_f + _log1mexp(n * log_ratio) - log_f - _log1mexp(log_ratio)
    return torch.where(cdf > cdf_below, tied, atomless)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0 (Mächler); −inf at x = 0 is avoided by the caller's `torch.where`."""
    x = x.clamp(max=-1e-300)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register_target("best_of_n")
class BestOfNTarget(Target):
    """The best-of-n policy π_n as the target: log P = log a + log w_n(r) (METHODS §7.1; Beirami et al. 2024).

    The reward CDF under a is estimated per prompt from `samples` draws of a (made once, before training) with
    mid-point smoothing, F̂(r) = (#{r_i ≤ r} + ½)/(M + 1) and F̂⁻(r) = (#{r_i < r} + ½)/(M + 1), so that log F̂ is
    finite below the lowest sample and F̂ < 1 above the highest. The estimated target is only approximately
    normalised; f-DPG's log Z estimate absorbs the rest.
    """

    needs_fixed_reference = True

    @dataclass
    class Params:
        n: int = field(default=4, metadata={"help": "n of best-of-n (>= 2). KL(π_n‖a) <= log n − (n−1)/n."})
        samples: int = field(default=32, metadata={
            "help": "M: samples of the reference per training prompt for its reward CDF (>= 2), drawn once."})

        def __post_init__(self):
            if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 2:
                raise ConfigError(f"n must be an integer >= 2, got {self.n}")
            if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 2:
                raise ConfigError(f"samples must be an integer >= 2, got {self.samples}")

    def __init__(self, params):
        super().__init__(params)
        self.samples_per_prompt = params.samples
        self._sorted: dict[str, torch.Tensor] = {}

    def fit_prompt(self, key, rewards):
        self._sorted[key] = rewards.detach().double().reshape(-1).sort().values.cpu()

    def fitted(self, key):
        return key in self._sorted

    def cdf(self, key: str, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F̂, F̂⁻) of `rewards` `[G]` under prompt `key`'s reference samples."""
        samples = self._sorted[key]
        r = rewards.detach().double().cpu().reshape(-1)
        M = samples.numel()
        at_most = torch.searchsorted(samples, r, right=True).double()
        below = torch.searchsorted(samples, r, right=False).double()
        return (at_most + 0.5) / (M + 1), (below + 0.5) / (M + 1)

    def log_prob(self, reference_logps, rewards, prompt_keys):
        out = torch.empty(rewards.shape, dtype=torch.float64)
        for i, key in enumerate(prompt_keys):
            cdf, cdf_below = self.cdf(key, rewards[i])
            out[i] = best_of_n_log_weight(cdf, cdf_below, self.params.n)
        return reference_logps.double() + out.to(reference_logps.device)

    def kl_to_reference(self) -> float:
        """KL(π̂_n ‖ a) of the fitted target, averaged over prompts: Σ over each prompt's M reference samples of
        w log w, self-normalised (the exact KL of best-of-n over the empirical reward law, ties included)."""
        kls = []
        for key, samples in self._sorted.items():
            log_w = self.log_prob(torch.zeros(1, samples.numel(), dtype=torch.float64), samples[None], [key])[0]
            log_w = log_w - torch.logsumexp(log_w, 0) + math.log(samples.numel())  # mean_a w = 1
            kls.append(float((log_w.exp() * log_w).mean()))
        return sum(kls) / len(kls) if kls else float("nan")

    def metrics(self):
        return {"target/kl_to_reference": self.kl_to_reference(),
                "target/kl_bound": math.log(self.params.n) - (self.params.n - 1) / self.params.n}

    def state_dict(self):
        return {"sorted_rewards": {k: v.clone() for k, v in self._sorted.items()}}

    def load_state_dict(self, state):
        self._sorted = {k: v.clone() for k, v in state["sorted_rewards"].items()}


def target_params(section: dict):
    """Validates the `target:` section → (Target class, its Params); errors name `target.<key>`."""
    section = dict(section)
    cls = TARGETS.lookup(section.pop("kind", "exponential"), "target.kind")
    return cls, from_dict(cls.Params, section, "target.", owner=f"target kind '{cls.kind}'")


def build_target(section: dict) -> Target:
    cls, params = target_params(section)
    return cls(params)
