"""f-divergences for f-DPO (Wang et al. 2023, "Beyond Reverse KL", ICLR 2024) — METHODS.md §4.

An f-divergence `D_f(π‖π_ref) = E_{π_ref}[f(π/π_ref)]` with convex generator `f` (f(1) = 0) replaces the reverse
KL of the RLHF objective. When `f'` is invertible and `0 ∉ dom f'`, the optimal policy of the regularised
objective satisfies `r(x, y) = β f'(u) + const(x)` with `u = π*(y|x)/π_ref(y|x)`, so the partition function
cancels in Bradley–Terry and the DPO-style loss is `−log σ(β f'(u_w) − β f'(u_l))` [P: f-DPO §4].

Every divergence here works on the **log-ratio** `ℓ = log u`; `u = exp(ℓ)` is never materialised, because
sequence-level log-ratios reach |ℓ| ≫ 88 where `exp` overflows fp32 (METHODS §0).

Registered divergences (name, aliases):

| name         | aliases                  | f(u)                                      | f'(u)              |
|--------------|--------------------------|-------------------------------------------|--------------------|
| `reverse_kl` | `rkl`                    | u log u                                   | log u + 1          |
| `forward_kl` | `fkl`                    | −log u                                    | −1/u               |
| `js`         | `jsd`, `js_divergence`   | u log u − (u+1) log((u+1)/2)   (2×JS)     | log(2u/(1+u))      |
| `alpha`      | `alpha_divergence`       | (u^{1−α} − (1−α)u − α)/(α(α−1))           | (1 − u^{−α})/α     |

**α convention.** `alpha` uses the f-DPO *paper* parametrisation (also the official repo
`alecwangcq/f-divergence-dpo`): `f'(u) = (1 − u^{−α})/α`, α ∈ (0, 1); α → 0 is reverse KL, α = 1 would be
forward KL (excluded, use `forward_kl`). TRL's `f_alpha_divergence_coef` has meant two different things
(METHODS §4, §9.2):

- TRL ≤ 0.28: the paper formula with coef = α, **default 1.0** (i.e. forward KL by default).
- TRL ≥ 0.29 (incl. 1.x): `f'(t) = (t^{c−1} − 1)/(c − 1)` with c = coef, **default 0.5**. This is the paper's
  formula with **α_paper = 1 − c** (c → 1 is reverse KL, c = 0 forward KL). Its docstring still says "u^-α",
  which describes the old convention only. To port a TRL ≥ 0.29 config, set `alpha = 1 − f_alpha_divergence_coef`
  (the default c = 0.5 happens to be α = 0.5 in both conventions).

**Not admissible.** Total variation (`f'(u) = sign(u − 1)/2`, not invertible) and Pearson χ² (`f'(u) = 2(u − 1)`,
finite at u = 0, so 0 ∈ dom f' and the optimum may put zero mass where π_ref does not) do not give the closed-form
reward, so `get_divergence("tv")` / `get_divergence("chi2")` raise `ConfigError` (METHODS §4; the paper's
exclusion is UNVERIFIED there, the conditions themselves are the theorem's).

**Numerics.** `f_prime_from_log` computes in fp32 whatever the input dtype and returns fp32 (fp64 input
stays fp64). Forward KL and α
need `exp(−aℓ)` with ℓ ≪ 0 (rejected sequences): unclamped, `exp` overflows to inf and the loss or its gradient
becomes NaN (`inf − inf`, `inf·0`). The exponent argument is therefore clamped with `torch.clamp(z, max=cap)`
(gradient exactly zero past the clamp), `cap = 11.0` when the input dtype is fp16 and `80.0` otherwise. The cap
bounds both `|f'|` and `|df'/dℓ|` by `e^cap`, and it is the *input* dtype that matters because the gradient
flows back into the input: `e^11 ≈ 6.0e4 < 65504` (fp16 max), `e^80 ≈ 5.5e34` stays far below the fp32/bf16 max
(3.4e38) even after the few multiplications by β and σ of the loss. TRL ≥ 0.29 uses the same caps for its α
branch (and none for forward KL); TRL ≤ 0.28 clamped at log(dtype max) ≈ 88.72 for fp32.
"""

from __future__ import annotations

import abc

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from align.errors import ConfigError
from align.registry import Registry, normalise_name

__all__ = [
    "DIVERGENCES",
    "Divergence",
    "ReverseKL",
    "ForwardKL",
    "JensenShannon",
    "AlphaDivergence",
    "TotalVariation",
    "register_divergence",
    "get_divergence",
    "exp_cap",
]

LOG2 = math.log(2.0)

#: name or alias -> Divergence subclass (aliases map to the same class).
DIVERGENCES = Registry("divergence", normalise=normalise_name)

# Divergences that are f-divergences but do not admit the f-DPO closed form: name -> reason.
_INADMISSIBLE: dict[str, str] = {}
_TV_REASON = (
    "total variation does not admit the f-DPO closed form: f'(u) = sign(u - 1)/2 is not invertible, so the "
    "reward cannot be written as beta * f'(pi/pi_ref) + const"
)
_CHI2_REASON = (
    "chi-squared does not admit the f-DPO closed form: 0 is in the domain of f'(u) = 2(u - 1) (f'(0) = -2 is "
    "finite), so the optimal policy can put zero mass where pi_ref does not and the reward is not "
    "beta * f'(pi/pi_ref) + const"
)
for _n in ("tv", "total_variation"):
    _INADMISSIBLE[_n] = _TV_REASON
for _n in ("chi2", "chi_squared", "chi_square", "pearson"):
    _INADMISSIBLE[_n] = _CHI2_REASON


def exp_cap(dtype: torch.dtype) -> float:
    """Largest exponent allowed inside `exp` for log-ratios of `dtype`: 11.0 for fp16, 80.0 otherwise.

    `e^11 ≈ 59874` < fp16 max 65504, so a gradient flowing back into an fp16 input stays finite; fp32 and bf16
    share the 8-bit exponent (max ≈ 3.4e38) and `e^80 ≈ 5.5e34` leaves head-room for β and σ factors.
    """
    return 11.0 if dtype == torch.float16 else 80.0


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16/fp32 -> fp32; fp64 stays fp64 (used by the finite-difference tests)."""
    return x.double() if x.dtype == torch.float64 else x.float()


def _capped_exp_arg(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # clamp (not where): gradient is exactly zero past the cap, finite everywhere.
    return torch.clamp(z, max=exp_cap(dtype))


class Divergence(abc.ABC):
    """An f-divergence usable in f-DPO.

    Subclasses define `score_from_log` (f'(u) − f'(1), computed stably from ℓ = log u), the constant
    `f_prime_at_one` = f'(1), the generator `f` and the accepted constructor parameters `PARAMS`.

    Shapes: every method is elementwise; `log_u` / `u` may have any shape and the output has the same shape.
    """

    name: ClassVar[str] = ""
    #: names of the keyword parameters accepted by the constructor (validated by `get_divergence`).
    PARAMS: ClassVar[tuple[str, ...]] = ()

    # ---- to implement --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def f(self, u: torch.Tensor) -> torch.Tensor:
        """The convex generator f(u), u > 0 (f(1) = 0). For tests and documentation; not used in losses."""

    @abc.abstractmethod
    def f_prime_at_one(self) -> float:
        """f'(1): the constant that `score_from_log` drops."""

    @abc.abstractmethod
    def score_from_log(self, log_u: torch.Tensor, *, input_dtype: torch.dtype | None = None) -> torch.Tensor:
        """`f'(u) − f'(1)` from ℓ = log u, fp32, same shape as `log_u`.

        This is what the f-DPO loss uses: the constant cancels in `f'(u_w) − f'(u_l)`, and dropping it makes the
        implicit reward zero at π = π_ref for every divergence and makes reverse KL *bit-identical* to DPO
        (score = ℓ). `input_dtype` (default `log_u.dtype`) selects the exp cap: pass the dtype of the tensor the
        gradient flows back into when `log_u` was upcast before the call.
        """

    # ---- derived ---------------------------------------------------------------------------------------------
    def f_prime_from_log(self, log_u: torch.Tensor, *, input_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The exact derivative f'(u), computed stably from ℓ = log u. fp32, same shape as `log_u`."""
        return self.score_from_log(log_u, input_dtype=input_dtype) + self.f_prime_at_one()

    def params(self) -> dict[str, Any]:
        """The constructor parameters (for logging / config round-trips)."""
        return {}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.params() == other.params()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.params().items()))))

    @staticmethod
    def _prepare(log_u: torch.Tensor, input_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.dtype]:
        return _upcast(log_u), (input_dtype if input_dtype is not None else log_u.dtype)


def register_divergence(name: str, *aliases: str):
    """Class decorator: register a `Divergence` subclass under `name` and `aliases`; sets `cls.name = name`."""

    def deco(cls: type[Divergence]) -> type[Divergence]:
        if not (isinstance(cls, type) and issubclass(cls, Divergence)):
            raise TypeError(f"register_divergence expects a Divergence subclass, got {cls!r}")
        cls.name = name
        return DIVERGENCES.register(name, *aliases)(cls)

    return deco


def get_divergence(name: str | Divergence, *, require_closed_form: bool = True, **params: Any) -> Divergence:
    """Build a divergence from its name (or alias) and parameters; a `Divergence` instance is returned as is.

    Raises `ConfigError` for an unknown name (listing the known ones), for TV / χ² (no closed form), for an
    unknown parameter (naming it) and for an invalid value (e.g. `alpha must be in (0, 1), got 1.5`).
    """
    if isinstance(name, Divergence):
        if params:
            raise ConfigError(
                f"parameters {sorted(params)} cannot be applied to an already built divergence {name!r}"
            )
        return name
    if not isinstance(name, str):
        raise ConfigError(f"divergence must be a name (string), got {type(name).__name__}: {name!r}")
    key = normalise_name(name)
    # f-DPO (the default) needs the closed form; f-DPG only needs f′, so it may take TV (registered for it).
    if key in _INADMISSIBLE and (require_closed_form or key not in DIVERGENCES):
        raise ConfigError(f"divergence {name!r}: {_INADMISSIBLE[key]}")
    cls = DIVERGENCES.lookup(name)
    unknown = sorted(set(params) - set(cls.PARAMS))
    if unknown:
        accepted = ", ".join(cls.PARAMS) if cls.PARAMS else "none"
        raise ConfigError(
            f"unknown parameter {unknown[0]!r} for divergence {cls.name!r} (accepted parameters: {accepted})"
        )
    return cls(**params)


@register_divergence("reverse_kl", "rkl")
class ReverseKL(Divergence):
    """Reverse KL, f(u) = u log u, f'(u) = log u + 1. f-DPO with it is exactly DPO (score = ℓ)."""

    def f(self, u: torch.Tensor) -> torch.Tensor:
        return torch.special.xlogy(u, u)

    def f_prime_at_one(self) -> float:
        return 1.0

    def score_from_log(self, log_u: torch.Tensor, *, input_dtype: torch.dtype | None = None) -> torch.Tensor:
        return _upcast(log_u)  # no exp anywhere: overflow-free


@register_divergence("forward_kl", "fkl")
class ForwardKL(Divergence):
    """Forward KL, f(u) = −log u, f'(u) = −1/u = −exp(−ℓ).

    Score `1 − 1/u = −expm1(−ℓ)` (TRL ≥ 0.29 writes `1 − exp(−ℓ)`, unclamped; the official repo `−exp(−ℓ)`).
    The exponent −ℓ is clamped at the cap: rejected sequences with ℓ ≪ 0 would otherwise overflow.
    """

    def f(self, u: torch.Tensor) -> torch.Tensor:
        return -torch.log(u)

    def f_prime_at_one(self) -> float:
        return -1.0

    def score_from_log(self, log_u: torch.Tensor, *, input_dtype: torch.dtype | None = None) -> torch.Tensor:
        x, dt = self._prepare(log_u, input_dtype)
        return -torch.expm1(_capped_exp_arg(-x, dt))


@register_divergence("js", "jsd", "js_divergence")
class JensenShannon(Divergence):
    """Jensen–Shannon with the 2×JS scaling of the f-DPO paper, TRL and disco:
    f(u) = u log u − (u+1) log((u+1)/2), f'(u) = log(2u/(1+u)) = log 2 − softplus(−ℓ) = log 2 + log σ(ℓ).

    f'(1) = 0. Bounded above by log 2 and overflow-free; gradient σ(−ℓ) ∈ (0, 1).
    """

    def f(self, u: torch.Tensor) -> torch.Tensor:
        return torch.special.xlogy(u, u) - (u + 1) * torch.log((u + 1) / 2)

    def f_prime_at_one(self) -> float:
        return 0.0

    def score_from_log(self, log_u: torch.Tensor, *, input_dtype: torch.dtype | None = None) -> torch.Tensor:
        return LOG2 + F.logsigmoid(_upcast(log_u))


@register_divergence("tv", "total_variation")
class TotalVariation(Divergence):
    """Total variation, f(u) = |u − 1|/2, f′(u) = sign(u − 1)/2 = sign(ℓ)/2 (disco/tuners/losses/tv.py).

    For f-DPG only: `get_divergence` refuses it for f-DPO (no closed form) unless `require_closed_form=False`.
    """

    def f(self, u: torch.Tensor) -> torch.Tensor:
        return (u - 1).abs() / 2

    def f_prime_at_one(self) -> float:
        return 0.0

    def score_from_log(self, log_u: torch.Tensor, *, input_dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.sign(_upcast(log_u)) / 2


@register_divergence("alpha", "alpha_divergence")
class AlphaDivergence(Divergence):
    """α-divergence in the f-DPO paper convention, α ∈ (0, 1) (default 0.5):
    f(u) = (u^{1−α} − (1−α)u − α)/(α(α−1)), f'(u) = (1 − u^{−α})/α = −expm1(−αℓ)/α.

    f'(1) = 0. `expm1` keeps α → 0 continuous with reverse KL (`−expm1(−αℓ)/α → ℓ`). TRL ≥ 0.29's
    `f_alpha_divergence_coef = c` corresponds to `alpha = 1 − c`; TRL ≤ 0.28's coef is `alpha` itself (see the
    module docstring).
    """

    PARAMS = ("alpha",)

    def __init__(self, alpha: float = 0.5):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ConfigError(f"alpha must be a number in (0, 1), got {type(alpha).__name__}: {alpha!r}")
        alpha = float(alpha)
        if not (0.0 < alpha < 1.0):  # also rejects NaN
            raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha = alpha

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def f(self, u: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        return (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1))

    def f_prime_at_one(self) -> float:
        return 0.0

    def score_from_log(self, log_u: torch.Tensor, *, input_dtype: torch.dtype | None = None) -> torch.Tensor:
        x, dt = self._prepare(log_u, input_dtype)
        return -torch.expm1(_capped_exp_arg(-self.alpha * x, dt)) / self.alpha
