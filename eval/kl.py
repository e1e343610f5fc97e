"""KL(π_n ‖ π_ref) of the best-of-n policy (METHODS §7, Beirami et al. 2024).

- `bon_kl_bound(n) -> float`: the upper bound `log n − (n−1)/n` (equality iff n = 1 or the reward law under π_ref is
  atomless; the KL axis of Gao/Coste best-of-n plots uses it, METHODS §8).
- `bon_kl_estimate(n, log_eps)`: Beirami et al.'s estimator `KL̂(ε)` from ε = π_ref(y_n|x) of the selected
  response, given as its log (a full-sequence log-prob). float in → float out; tensor in → tensor out (elementwise).
- `exact_bon_pmf(probs, rewards, n)` / `exact_bon_kl(probs, rewards, n)`: the exact oracle for a finite π_ref with
  reward ties (METHODS §7), for tests and for small discrete problems.

All computation is float64. Errors are `ValueError`s with a one-line message.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["bon_kl_bound", "bon_kl_estimate", "exact_bon_kl", "exact_bon_pmf"]


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        else:
            raise ValueError(f"best-of-n KL: n must be an integer, got {n!r}")
    n = int(n)
    if n < 1:
        raise ValueError(f"best-of-n KL: n must be >= 1, got n={n}")
    return n


def bon_kl_bound(n: int) -> float:
    """Upper bound on KL(π_n ‖ π_ref): log n − (n−1)/n (METHODS §7, Beirami et al. Thm 3.1). n ≥ 1; 0 at n = 1.

    It is the exact KL when the reward law under π_ref is atomless (E[log(n U^{n−1})], U ~ Beta(n, 1)).
    """
    n = _check_n(n)
    return math.log(n) - (n - 1) / n


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate at both ends (Mächler's log1mexp): log(−expm1(x)) near 0,
    log1p(−exp(x)) for x < −log 2 (where exp(x) may underflow to 0 → log1p(0) = 0, the right limit)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def bon_kl_estimate(n: int, log_eps: Any):
    """Beirami et al.'s KL estimator from the reference log-prob of the selected response (METHODS §7).

    n: the best-of-n n (≥ 1). log_eps: log ε ≤ 0, ε = π_ref(y_n|x) of the selected sample; a float, or a tensor of
    any shape (elementwise). Returns the same kind: float → float; tensor → tensor of the same shape (in its floating
    dtype, float64 for integer input); other array-likes (lists) → float64 tensor. Averaging the result over M independent best-of-n draws per prompt gives the
    paper's estimate.

        KL̂(ε) = (1−ε)^n [log n + (n−1) log(1−ε) − (n−1)/n] + (1−(1−ε)^n) log((1−(1−ε)^n)/ε)

    It is the exact KL of "continuous mass 1−ε plus one top atom of mass ε"; 0 ≤ KL̂ ≤ log n − (n−1)/n, → the bound
    as ε → 0 and → 0 as ε → 1. Computed from log ε without ever forming 1 − ε:
    log(1−ε) = log1mexp(log ε); (1−ε)^n = exp(n log(1−ε)); 1−(1−ε)^n = −expm1(n log(1−ε)) (METHODS §7), and
    log((1−(1−ε)^n)/ε) = log(−expm1(n log(1−ε))) − log ε. The two 0·∞ limits are set to their value 0:
    ε = 1 (first term, (1−ε)^n log(1−ε) → 0) and ε underflowing in exp (second term, ≈ nε·log n → 0). The
    result is clamped to [0, bound] to absorb last-bit round-off only.

    Raises ValueError for n < 1, log_eps > 0 (ε > 1) or nan.
    """
    n = _check_n(n)
    is_tensor = isinstance(log_eps, torch.Tensor)
    t = log_eps if is_tensor else torch.as_tensor(log_eps, dtype=torch.float64)   # python floats stay fp64
    out_dtype = t.dtype if t.is_floating_point() else torch.float64
    x = t.detach().to(torch.float64)
    if bool(torch.isnan(x).any()):
        raise ValueError("best-of-n KL: log_eps contains nan")
    if bool((x > 0).any()):
        raise ValueError(f"best-of-n KL: log_eps must be <= 0 (ε = π_ref(y) ≤ 1), got max {float(x.max())!r}")
    bound = bon_kl_bound(n)
    if n == 1:
        out = torch.zeros_like(x)
    else:
        log1m = _log1mexp(x)                               # log(1−ε); −inf at ε = 1
        a = n * log1m                                      # log (1−ε)^n
        q = torch.exp(a)                                   # (1−ε)^n
        one_minus_q = -torch.expm1(a)                      # 1 − (1−ε)^n, accurate for tiny ε
        inner = math.log(n) + (n - 1) * log1m - (n - 1) / n
        term1 = torch.where(q > 0, q * inner, torch.zeros_like(q))
        term2 = torch.where(one_minus_q > 0, one_minus_q * (torch.log(one_minus_q) - x), torch.zeros_like(q))
        out = (term1 + term2).clamp(0.0, bound)
    if is_tensor:
        return out.to(out_dtype)
    if out.dim() == 0:
        return float(out)
    return out.to(out_dtype)   # array-like in (e.g. a list) → tensor out


def _check_discrete(probs: Any, rewards: Any) -> tuple[torch.Tensor, torch.Tensor]:
    p = probs.detach().to(torch.float64) if isinstance(probs, torch.Tensor) \
        else torch.as_tensor(probs, dtype=torch.float64)          # never via float32 (as_tensor's default)
    r = rewards.detach().to(torch.float64) if isinstance(rewards, torch.Tensor) \
        else torch.as_tensor(rewards, dtype=torch.float64)
    if p.dim() != 1 or r.dim() != 1 or p.shape != r.shape or p.numel() == 0:
        raise ValueError(f"best-of-n KL: probs and rewards must be non-empty 1-D of equal length, got shapes "
                         f"{tuple(p.shape)} and {tuple(r.shape)}")
    if not bool(torch.isfinite(p).all()) or not bool(torch.isfinite(r).all()):
        raise ValueError("best-of-n KL: probs and rewards must be finite")
    if bool((p < 0).any()):
        raise ValueError("best-of-n KL: probs must be >= 0")
    total = float(p.sum())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"best-of-n KL: probs must sum to 1, got {total!r}")
    return p / total, r


def exact_bon_pmf(probs: Any, rewards: Any, n: int) -> torch.Tensor:
    """Exact best-of-n pmf π_n over a finite output space, reward ties included (METHODS §7) → float64 [L].

    probs: [L] π_ref (≥ 0, sums to 1); rewards: [L] r(y) (equal values = a tie). n ≥ 1 i.i.d. draws from π_ref, the
    highest reward kept, ties broken uniformly among the tied draws (or first drawn — same law). For a reward
    level ℓ with mass p_ℓ and cumulative F(ℓ) = P(r ≤ ℓ), F⁻(ℓ) = F(ℓ) − p_ℓ:

        P(max level = ℓ) = F(ℓ)^n − F⁻(ℓ)^n,   π_n(y) = P(max level = r(y)) · π_ref(y)/p_{r(y)}.

    The difference of powers is computed as F^n · (−expm1(n log1p(−p_ℓ/F))) to avoid cancellation for large n.
    Outputs with π_ref(y) = 0 get π_n(y) = 0.
    """
    n = _check_n(n)
    p, inv, p_level, p_max = _levels(probs, rewards, n)
    safe_pl = torch.where(p_level > 0, p_level, torch.ones_like(p_level))
    return torch.where(p > 0, p_max[inv] * p / safe_pl[inv], torch.zeros_like(p))


def _levels(probs: Any, rewards: Any, n: int):
    """→ (p[L], inv[L] level index of each output, p_level[K], P(max level = ℓ)[K]) (METHODS §7)."""
    p, r = _check_discrete(probs, rewards)
    levels, inv = torch.unique(r, sorted=True, return_inverse=True)
    p_level = torch.zeros(levels.numel(), dtype=torch.float64).index_add_(0, inv, p)
    F = torch.cumsum(p_level, dim=0).clamp(max=1.0)
    safe_F = torch.where(F > 0, F, torch.ones_like(F))
    ratio = (p_level / safe_F).clamp(max=1.0)          # p_ℓ/F ∈ [0, 1]; 1 at the lowest populated level
    p_max = torch.where(F > 0, safe_F ** n * (-torch.expm1(n * torch.log1p(-ratio))), torch.zeros_like(F))
    return p, inv, p_level, p_max


def exact_bon_kl(probs: Any, rewards: Any, n: int) -> float:
    """Exact KL(π_n ‖ π_ref) = Σ_y π_n(y) log(π_n(y)/π_ref(y)) over a finite space, ties included (METHODS §7).

    probs, rewards: [L] as in `exact_bon_pmf`. Terms with π_n(y) = 0 are skipped. The log-ratio is computed per
    reward level (π_n(y)/π_ref(y) = P(max level = ℓ)/p_ℓ). Returns a float ≥ 0 (clamped against round-off).
    """
    n = _check_n(n)
    _, _, p_level, p_max = _levels(probs, rewards, n)
    # Σ_y π_n(y) log(π_n(y)/π_ref(y)) grouped by level: π_n/π_ref is constant (= P(max=ℓ)/p_ℓ) on a level.
    mask = p_max > 0
    kl = float((p_max[mask] * (torch.log(p_max[mask]) - torch.log(p_level[mask]))).sum())
    return max(kl, 0.0)
