"""Aggregating the K member rewards of a reward-model ensemble into one reward (METHODS §8, Coste et al. 2023).

Every aggregation is a pure function `scores[B, K] -> [B]` registered by name in `AGGREGATIONS`:

- `mean`: R̄ = (1/K) Σ_i R_i. Valid for any K ≥ 1 (with K = 1 it is the single reward model).
- `wco` (worst-case optimisation): min_i R_i.
- `uwo` (uncertainty-weighted optimisation): R̄ − λ·Var_i(R_i), the variance taken across the members for the same
  (prompt, response). Parameters `lam` (λ ≥ 0, default 0.5: the Coste repo's best-of-n default `--uwo_weights`;
  its PPO path uses 0.1) and `ddof` (0 = population variance, the default, as the repo's BoN path computes it with
  `np.var`; 1 = unbiased, as its PPO path computes it with `torch.var`. The two differ by the factor K/(K−1), so
  the same λ means a different penalty; METHODS §8 and §9.5).

`wco` and `uwo` need K ≥ 2 and refuse K = 1: with one member the minimum is that member and its population
variance is 0, so both would silently return the single model's reward, and a run configured as "conservative"
would not be. (`uwo` with ddof = 1 and K = 1 would be 0/0.)

Normalisation (optional, default off). METHODS §8: the reference code does NOT normalise members before aggregating.
Members trained from different seeds can still end up on different scales and offsets (a Bradley–Terry reward is
defined only up to a constant, and its scale drifts with training), and `wco`/`uwo` are scale-sensitive: `wco`
picks whichever member happens to sit lowest, and `uwo`'s variance mixes offset differences into "disagreement".
`member_statistics` z-scores each member on a fixed reference set of (prompt, response) pairs and `normalize`
applies it; `mean` is affected by normalisation only through the member weighting.

Errors are `ConfigError`s, one line, naming the parameter as `aggregation.<name>`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from align.errors import AlignError, ConfigError
from align.registry import Registry

#: name -> aggregation function `fn(scores[B, K], **params) -> [B]`. Parameters are the function's keyword-only
#: arguments (their defaults are the defaults); `fn.min_members` is the smallest K it accepts and `fn.check_params`
#: an optional validator `(params, num_members) -> None`.
AGGREGATIONS = Registry("aggregation")


def register_aggregation(name: str, *, min_members: int = 1,
                         check: Callable[[dict[str, Any], int | None], None] | None = None):
    """Decorator: registers `fn(scores[B, K], *, **params) -> [B]` under `name`.

    `min_members`: the smallest K the aggregation is meaningful for; `check(params, num_members)` validates the
    parameters (defaults filled in) and raises a ConfigError naming the parameter. `num_members` is None when the
    aggregation is checked without scores (a config).
    """

    def decorator(fn):
        fn.min_members = min_members
        fn.check_params = check
        return AGGREGATIONS.register(name)(fn)

    return decorator


def aggregation_defaults(method: str) -> dict[str, Any]:
    """The parameters of `method` with their defaults (the function's keyword-only arguments)."""
    fn = _lookup(method)
    return {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}


def check_aggregation(method: str, params: dict[str, Any] | None = None, *,
                      num_members: int | None = None) -> dict[str, Any]:
    """Validates an aggregation without scores → its full parameters (defaults filled in).

    `num_members` (K), when known, is checked against the method's minimum. Raises a one-line ConfigError naming the
    parameter: unknown method (the known ones listed), unknown parameter, value out of range, too few members.
    """
    fn = _lookup(method)
    params = dict(params or {})
    defaults = aggregation_defaults(method)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        takes = ", ".join(defaults) if defaults else "no parameters"
        raise ConfigError(f"aggregation.{unknown[0]}: unknown parameter for '{method}' (it takes {takes})")
    full = {**defaults, **params}
    if fn.check_params is not None:
        fn.check_params(full, num_members)
    if num_members is not None and num_members < fn.min_members:
        raise ConfigError(f"aggregation.method: '{method}' needs at least {fn.min_members} ensemble members, got "
                          f"{num_members} (with one member it would silently return that member's reward; use "
                          f"'mean' for a single reward model)")
    return full


def split_aggregation(aggregation: dict | None) -> tuple[str, dict[str, Any]]:
    """An aggregation as an ensemble stores it, `{"method": ..., **params}` (None: the mean) → (method, params);
    the parameters are checked by `check_aggregation`, not here."""
    if aggregation is None:
        return "mean", {}
    if not isinstance(aggregation, dict) or "method" not in aggregation:
        raise ConfigError(f"aggregation: must be a mapping with a 'method' (mean, wco, uwo), got {aggregation!r}")
    params = dict(aggregation)
    return params.pop("method"), params


def aggregate(scores: torch.Tensor, method: str, **params) -> torch.Tensor:
    """Aggregates per-member rewards `scores[B, K]` → `[B]` with the registered `method` and its `params`.

    The result has the dtype and device of `scores`; it is differentiable when `scores` is.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise AlignError(f"aggregate: scores must be a [B, K] tensor (rows x ensemble members), got {shape}")
    if not scores.is_floating_point():
        raise AlignError(f"aggregate: scores must be a floating-point tensor, got {scores.dtype}")
    if scores.shape[1] < 1:
        raise AlignError("aggregate: scores has no members (K = 0)")
    full = check_aggregation(method, params, num_members=scores.shape[1])
    return AGGREGATIONS[method](scores, **full)


def _lookup(method: str):
    return AGGREGATIONS.lookup(method, "aggregation.method")


# ---------------------------------------------------------------------------------------------------------------
# The aggregations (METHODS §8)


@register_aggregation("mean")
def mean_aggregation(scores: torch.Tensor) -> torch.Tensor:
    """R̄: the members' mean, `[B, K] -> [B]`."""
    return scores.mean(dim=-1)


@register_aggregation("wco", min_members=2)
def wco_aggregation(scores: torch.Tensor) -> torch.Tensor:
    """Worst-case optimisation: min over members, `[B, K] -> [B]`."""
    return scores.min(dim=-1).values


def _check_uwo(params: dict[str, Any], num_members: int | None) -> None:
    lam, ddof = params["lam"], params["ddof"]
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ConfigError(f"aggregation.lam: must be a finite number, got {lam!r}")
    if lam < 0:
        raise ConfigError(f"aggregation.lam: must be >= 0 (a negative λ would reward disagreement), got {lam}")
    if isinstance(ddof, bool) or ddof not in (0, 1):
        raise ConfigError(f"aggregation.ddof: must be 0 (population variance) or 1 (unbiased), got {ddof!r}")
    if ddof == 1 and num_members is not None and num_members < 2:
        raise ConfigError(f"aggregation.ddof: 1 needs at least 2 members (the unbiased variance of one value is "
                          f"0/0), got {num_members}")


@register_aggregation("uwo", min_members=2, check=_check_uwo)
def uwo_aggregation(scores: torch.Tensor, *, lam: float = 0.5, ddof: int = 0) -> torch.Tensor:
    """Uncertainty-weighted optimisation: mean − λ·Var over members, `[B, K] -> [B]`.

    `ddof` 0: population variance (Coste repo, BoN, `np.var`); 1: unbiased (Coste repo, PPO, `torch.var`).
    """
    return scores.mean(dim=-1) - lam * scores.var(dim=-1, correction=ddof)


# ---------------------------------------------------------------------------------------------------------------
# Optional per-member normalisation (off by default; see the module docstring)


def member_statistics(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member mean and (population, ddof 0) standard deviation of `scores[N, K]` on a reference set → `([K],
    [K])`, computed in fp64 and returned as fp32. Refuses N < 2 and a member with zero spread (it cannot be
    standardised: it gives every row the same reward)."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise AlignError("member_statistics: scores must be a [N, K] tensor (reference rows x members)")
    if scores.shape[0] < 2:
        raise AlignError(f"member_statistics: needs at least 2 reference rows, got {scores.shape[0]}")
    values = scores.detach().double()
    mean, std = values.mean(dim=0), values.std(dim=0, correction=0)
    flat = [k for k in range(std.shape[0]) if not std[k] > 0]
    if flat:
        raise AlignError(f"member_statistics: member {flat[0]} gives every reference row the same reward "
                         f"({mean[flat[0]].item():.6g}); it cannot be normalised")
    return mean.float(), std.float()


def normalize(scores: torch.Tensor, mean, std) -> torch.Tensor:
    """z-scores each member: `(scores[B, K] − mean[K]) / std[K]` (mean and std: tensors or lists of K floats)."""
    mean, std = _stat_tensors(scores, mean, std)
    return (scores - mean) / std


def denormalize(scores: torch.Tensor, mean, std) -> torch.Tensor:
    """The inverse of `normalize`: `scores[B, K] · std[K] + mean[K]`."""
    mean, std = _stat_tensors(scores, mean, std)
    return scores * std + mean


def _stat_tensors(scores: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.as_tensor(mean, dtype=scores.dtype, device=scores.device)
    std = torch.as_tensor(std, dtype=scores.dtype, device=scores.device)
    k = scores.shape[-1]
    if mean.shape != (k,) or std.shape != (k,):
        raise AlignError(f"normalization: mean and std must have one value per member ({k}), got shapes "
                         f"{tuple(mean.shape)} and {tuple(std.shape)}")
    if not bool((std > 0).all()):
        raise AlignError("normalization: every std must be > 0")
    return mean, std
