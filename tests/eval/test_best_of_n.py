"""Best-of-n order-statistics estimator (METHODS §8): brute force over all n-subsets, ties, large N, errors."""

import itertools
import math
from fractions import Fraction

import pytest
import torch

from eval.best_of_n import bon_ns, bon_weights, expected_best_of_n, expected_best_of_n_by


def _brute_max(row, n):
    subsets = list(itertools.combinations(range(len(row)), n))
    return sum(max(row[i] for i in s) for s in subsets) / len(subsets)


def _brute_by(sel, rep, n):
    """Mean over all n-subsets of E[report of the select-argmax], ties broken uniformly among tied maximisers."""
    subsets = list(itertools.combinations(range(len(sel)), n))
    total = 0.0
    for s in subsets:
        top = max(sel[i] for i in s)
        tied = [i for i in s if sel[i] == top]
        total += sum(rep[i] for i in tied) / len(tied)
    return total / len(subsets)


@pytest.mark.parametrize("ties", [False, True])
def test_estimator_equals_brute_force_over_subsets(ties):
    g = torch.Generator().manual_seed(0 + ties)
    for N in range(1, 9):
        P = 3
        scores = (torch.randint(0, 3, (P, N), generator=g).double() if ties
                  else torch.randn(P, N, generator=g, dtype=torch.float64))
        for n in range(1, N + 1):
            got = expected_best_of_n(scores, n)
            assert got.shape == (P,)
            want = torch.tensor([_brute_max(scores[p].tolist(), n) for p in range(P)], dtype=torch.float64)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_n1_is_mean_and_nN_is_max():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 37, generator=g, dtype=torch.float64)
    torch.testing.assert_close(expected_best_of_n(scores, 1), scores.mean(1), rtol=0, atol=1e-13)
    assert torch.equal(expected_best_of_n(scores, 37), scores.max(1).values)
    # 1-D input = one prompt → 0-d result; array-like input works; float32 in → float32 out
    assert expected_best_of_n([1.0, 5.0, 3.0], 3).item() == 5.0
    assert expected_best_of_n(scores[0], 1).dim() == 0
    assert expected_best_of_n(scores.float(), 2).dtype == torch.float32
    assert expected_best_of_n([[1, 2, 3]], 2).dtype == torch.float64
    assert expected_best_of_n([0.1, 0.2], 1).item() == (0.1 + 0.2) / 2     # lists read in fp64, not fp32


def test_monotone_in_n():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(4, 64, generator=g, dtype=torch.float64)
    vals = torch.stack([expected_best_of_n(scores, n) for n in range(1, 65)], 1)
    assert bool((vals[:, 1:] >= vals[:, :-1] - 1e-12).all())


def test_large_N_weights_match_exact_binomials():
    """No overflow for N in the thousands (C(3000, 1500) ≫ 1e308): weights vs exact rational arithmetic."""
    N, n = 3000, 1500
    w = bon_weights(N, n)
    assert bool(torch.isfinite(w).all()) and abs(float(w.sum()) - 1) < 1e-12
    denom = math.comb(N, n)
    for i in (n, n + 1, 2000, 2900, N):                      # positions, 1-indexed
        exact = float(Fraction(math.comb(i - 1, n - 1), denom))
        assert w[i - 1].item() == pytest.approx(exact, rel=1e-9, abs=1e-300)
    assert bool((w[: n - 1] == 0).all())
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 5000, generator=g, dtype=torch.float64)
    for n in (1, 2, 64, 1000, 4999, 5000):
        out = expected_best_of_n(scores, n)
        assert bool(torch.isfinite(out).all())
        assert bool((out <= scores.max(1).values + 1e-12).all()) and bool((out >= scores.mean(1) - 1e-12).all())


@pytest.mark.parametrize("ties", [False, True])
def test_by_variant_equals_brute_force(ties):
    g = torch.Generator().manual_seed(10 + ties)
    for N in range(1, 8):
        P = 3
        sel = (torch.randint(0, 3, (P, N), generator=g).double() if ties
               else torch.randn(P, N, generator=g, dtype=torch.float64))
        rep = torch.randn(P, N, generator=g, dtype=torch.float64)
        for n in range(1, N + 1):
            got = expected_best_of_n_by(sel, rep, n)
            want = torch.tensor([_brute_by(sel[p].tolist(), rep[p].tolist(), n) for p in range(P)],
                                dtype=torch.float64)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
            # independent of how the input orders tied entries
            perm = torch.randperm(N, generator=g)
            torch.testing.assert_close(expected_best_of_n_by(sel[:, perm], rep[:, perm], n), got, rtol=0, atol=1e-12)


def test_by_with_select_equal_report_reduces_to_plain():
    g = torch.Generator().manual_seed(4)
    s = torch.randint(0, 5, (3, 20), generator=g).double()
    for n in (1, 3, 20):
        torch.testing.assert_close(expected_best_of_n_by(s, s, n), expected_best_of_n(s, n), rtol=0, atol=1e-12)
    # all select scores tied ⇒ the chosen sample is uniform ⇒ the report mean for every n
    rep = torch.randn(2, 9, generator=g, dtype=torch.float64)
    for n in (1, 4, 9):
        torch.testing.assert_close(expected_best_of_n_by(torch.zeros(2, 9), rep, n), rep.mean(1), rtol=0, atol=1e-12)


def test_bon_ns():
    assert bon_ns(1) == [1]
    assert bon_ns(2) == [1, 2]
    assert bon_ns(12) == [1, 2, 4, 8, 12]
    assert bon_ns(16) == [1, 2, 4, 8, 16]
    with pytest.raises(ValueError):
        bon_ns(0)


def test_errors():
    s = torch.randn(2, 4)
    for n, msg in ((0, ">= 1"), (-3, ">= 1"), (5, "exceeds"), (2.5, "integer")):
        with pytest.raises(ValueError, match=msg):
            expected_best_of_n(s, n)
    with pytest.raises(ValueError, match="N=0"):
        expected_best_of_n(torch.empty(2, 0), 1)
    with pytest.raises(ValueError, match="non-finite"):
        expected_best_of_n(torch.tensor([[1.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match="non-finite"):
        expected_best_of_n_by(torch.tensor([[1.0, float("inf")]]), torch.zeros(1, 2), 1)
    with pytest.raises(ValueError, match="shape"):
        expected_best_of_n(torch.zeros(2, 3, 4), 1)
    with pytest.raises(ValueError, match="same shape"):
        expected_best_of_n_by(torch.zeros(2, 3), torch.zeros(2, 4), 1)
    with pytest.raises(ValueError, match="exceeds"):
        expected_best_of_n_by(torch.zeros(2, 3), torch.zeros(2, 3), 4)
