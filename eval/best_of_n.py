"""Best-of-n evaluation from N pre-generated samples per prompt (METHODS §8, Coste et al. 2023; §7 for the KL axis).

Given N scored samples of one prompt, the expected score of best-of-n (n draws WITHOUT replacement from the N, keep
the best) has the unbiased order-statistics estimator (METHODS §8, `[R: tlc4418/llm_optimization
src/bon/bon_sampling.py]`): with the scores sorted ascending `s_(1) ≤ … ≤ s_(N)`,

    E[best-of-n] = Σ_{i=n}^{N} w_i · s_(i),    w_i = C(i−1, n−1) / C(N, n),

because `w_i` is the probability that the largest of a uniform n-subset sits at sorted position i (the subset
holds position i and n−1 of the i−1 positions below it). The weights sum to 1 (hockey-stick identity).
It equals the average over all C(N, n) subsets of the subset maximum, ties included (tied scores give the same
maximum whichever of them is "at" position i).

- `expected_best_of_n(scores[P, N], n) -> [P]`: the estimator itself (score of the best under the same score).
- `expected_best_of_n_by(select[P, N], report[P, N], n) -> [P]`: the expected REPORTED score (e.g. gold reward) of
  the sample that is best under the SELECT score (e.g. proxy reward) — best-of-n of gold-vs-proxy.
- `bon_ns(N) -> [1, 2, 4, …, N]`: the n grid of a best-of-n curve.
- `bon_log_weights(N, n) -> [N]`: the log-weights `log w_i` (−inf below position n).

Numerics: the weights are built in log space with `lgamma` in float64 (no overflow of C(N, n) for N in the
thousands, where C(N, n) itself exceeds 1e308) and renormalised to sum to 1, which removes the lgamma round-off
and makes n = 1 the plain mean and n = N exactly the max. Errors are `ValueError`s with a one-line message (the CLI
maps them to its own errors).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["bon_log_weights", "bon_ns", "bon_weights", "expected_best_of_n", "expected_best_of_n_by"]


def _check_n(n: Any, N: int) -> int:
    """n must be an integer with 1 ≤ n ≤ N (N ≥ 1 checked by the caller)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        else:
            raise ValueError(f"best-of-n: n must be an integer, got {n!r}")
    n = int(n)
    if n < 1:
        raise ValueError(f"best-of-n: n must be >= 1, got n={n}")
    if n > N:
        raise ValueError(f"best-of-n: n={n} exceeds the number of samples per prompt N={N} "
                         f"(best-of-n draws n of the N samples without replacement)")
    return n


def _as_scores(scores: Any, name: str) -> tuple[torch.Tensor, torch.dtype, bool]:
    """array-like [P, N] or [N] -> (float64 tensor [P, N], output dtype, was 1-D). Checks N ≥ 1 and finiteness."""
    if isinstance(scores, torch.Tensor):
        t = scores
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"best-of-n: {name} must be real numbers, got dtype {t.dtype}")
    else:   # array-likes (lists, numpy) → float64 directly, never via float32 (torch.as_tensor's default)
        try:
            t = torch.as_tensor(scores, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"best-of-n: {name} must be a numeric [P, N] array ({e})") from None
    out_dtype = t.dtype if t.is_floating_point() else torch.float64
    squeeze = t.dim() == 1
    if squeeze:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise ValueError(f"best-of-n: {name} must have shape [P, N] (prompts x samples) or [N], "
                         f"got shape {tuple(t.shape)}")
    if t.shape[1] < 1:
        raise ValueError(f"best-of-n: {name} has N=0 samples per prompt; need N >= 1")
    t = t.detach().to(dtype=torch.float64, device="cpu")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"best-of-n: {name} contains {bad} non-finite value(s) (nan/inf)")
    return t, out_dtype, squeeze


def bon_ns(N: int) -> list[int]:
    """The n grid of a best-of-n curve: powers of two up to N, plus N itself → [1, 2, 4, …, N] (ascending, unique)."""
    if isinstance(N, bool) or not isinstance(N, numbers.Integral) or N < 1:
        raise ValueError(f"best-of-n: N must be an integer >= 1, got {N!r}")
    N = int(N)
    ns = []
    k = 1
    while k <= N:
        ns.append(k)
        k *= 2
    if ns[-1] != N:
        ns.append(N)
    return ns


def bon_log_weights(N: int, n: int) -> torch.Tensor:
    """log w_i for sorted positions i = 1..N (METHODS §8) → float64 [N]; −inf for i < n.

    log w_i = log C(i−1, n−1) − log C(N, n), with log C(a, b) = lgamma(a+1) − lgamma(b+1) − lgamma(a−b+1).
    Not renormalised (see `bon_weights`).
    """
    if isinstance(N, bool) or not isinstance(N, numbers.Integral) or N < 1:
        raise ValueError(f"best-of-n: N must be an integer >= 1, got {N!r}")
    N = int(N)
    n = _check_n(n, N)
    i = torch.arange(1, N + 1, dtype=torch.float64)
    out = torch.full((N,), -math.inf, dtype=torch.float64)
    ii = i[n - 1:]                                     # positions n..N
    log_c_i = torch.lgamma(ii) - math.lgamma(n) - torch.lgamma(ii - n + 1)          # log C(i−1, n−1)
    log_c_N = math.lgamma(N + 1) - math.lgamma(n + 1) - math.lgamma(N - n + 1)       # log C(N, n)
    out[n - 1:] = log_c_i - log_c_N
    return out


def bon_weights(N: int, n: int) -> torch.Tensor:
    """w_i = C(i−1, n−1)/C(N, n) for sorted positions i = 1..N (METHODS §8) → float64 [N], summing to 1.

    Computed as softmax of the lgamma log-weights: the exact weights sum to 1, so renormalising only removes
    round-off; n = 1 gives exactly 1/N everywhere and n = N gives exactly one weight 1 on the last position.
    """
    return torch.softmax(bon_log_weights(N, n), dim=0)


def expected_best_of_n(scores: Any, n: int) -> torch.Tensor:
    """Unbiased estimate of E[max of n draws without replacement] from N samples per prompt (METHODS §8).

    scores: [P, N] (P prompts × N samples; tensor or array-like) or [N] (one prompt). n: 1 ≤ n ≤ N.
    Returns [P] (a 0-d tensor for 1-D input) = Σ_{i=n}^{N} C(i−1,n−1)/C(N,n) · s_(i) with s sorted ascending per
    prompt: exactly the average over all C(N, n) subsets of the subset maximum (ties included). n = 1 → the mean,
    n = N → the max. Computed in float64; returned in the input tensor's floating dtype (float64 for integer tensors and
    array-likes).

    Raises ValueError for n < 1, n > N, N < 1, a non-integer n, a bad shape, or a non-finite score.
    """
    s, out_dtype, squeeze = _as_scores(scores, "scores")
    n = _check_n(n, s.shape[1])
    s_sorted, _ = torch.sort(s, dim=1)
    w = bon_weights(s.shape[1], n)                     # [N], METHODS §8
    out = (s_sorted * w).sum(dim=1)                    # [P]; weights are exactly 0 below position n
    if n == s.shape[1]:
        out = s_sorted[:, -1].clone()                  # exact max (the weight vector is one-hot anyway)
    out = out.to(out_dtype)
    return out[0] if squeeze else out


def _tie_group_means(select_sorted: torch.Tensor, report_sorted: torch.Tensor) -> torch.Tensor:
    """[P, N] report scores (in ascending-select order) → each replaced by the mean over its tied-select group."""
    P, N = select_sorted.shape
    new_group = torch.ones_like(select_sorted, dtype=torch.bool)
    new_group[:, 1:] = select_sorted[:, 1:] != select_sorted[:, :-1]
    gid = torch.cumsum(new_group.to(torch.int64), dim=1) - 1                  # [P, N] group index within the row
    flat = (gid + torch.arange(P).unsqueeze(1) * N).reshape(-1)              # unique across rows
    sums = torch.zeros(P * N, dtype=torch.float64).index_add_(0, flat, report_sorted.reshape(-1))
    counts = torch.zeros(P * N, dtype=torch.float64).index_add_(0, flat, torch.ones(P * N, dtype=torch.float64))
    return (sums[flat] / counts[flat]).reshape(P, N)


def expected_best_of_n_by(select_scores: Any, report_scores: Any, n: int) -> torch.Tensor:
    """Expected REPORT score of the best-of-n sample chosen by SELECT score (METHODS §8: gold of the proxy-best).

    select_scores: [P, N] (or [N]) — the score best-of-n maximises (e.g. the proxy reward / ensemble aggregate).
    report_scores: [P, N] (or [N]), same shape — the score reported for the chosen sample (e.g. the gold reward).
    n: 1 ≤ n ≤ N. Returns [P] (0-d for 1-D input), float64 unless report_scores is a floating tensor (its dtype).

    Samples are sorted ascending by select score and the METHODS §8 weights are applied to the report scores in
    that order. Ties in the select score: the chosen sample is drawn uniformly among the tied maximisers in the
    subset (the "first drawn" rule gives the same law, since the draw order is uniform). Conditional on the
    subset's maximal select level being ℓ, every sample of level ℓ is then equally likely to be chosen (the
    subset law and the tie-break are both symmetric in them), so the expected report is the MEAN report over ALL N
    samples at level ℓ; and P(max level = ℓ) is the sum of the weights of ℓ's sorted positions. Hence: replace
    each report score by the mean of the report scores sharing its select score, then apply the weights — exact
    for the uniform tie-break, independent of how the sort orders tied entries. With select = report this
    reduces to `expected_best_of_n`.

    Raises ValueError as `expected_best_of_n`, plus a shape mismatch.
    """
    sel, _, squeeze = _as_scores(select_scores, "select_scores")
    rep, out_dtype, squeeze_r = _as_scores(report_scores, "report_scores")
    if sel.shape != rep.shape or squeeze != squeeze_r:
        raise ValueError(f"best-of-n: select_scores and report_scores must have the same shape, got "
                         f"{tuple(torch.as_tensor(select_scores).shape)} and {tuple(torch.as_tensor(report_scores).shape)}")
    n = _check_n(n, sel.shape[1])
    sel_sorted, order = torch.sort(sel, dim=1)
    rep_sorted = torch.gather(rep, 1, order)
    rep_sorted = _tie_group_means(sel_sorted, rep_sorted)                    # exact uniform tie-break (above)
    out = (rep_sorted * bon_weights(sel.shape[1], n)).sum(dim=1)              # METHODS §8 weights
    out = out.to(out_dtype)
    return out[0] if squeeze else out
