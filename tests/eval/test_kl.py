"""Best-of-n KL (METHODS §7, Beirami et al. 2024): exact oracle test values, the bound, the estimator KL̂(ε)."""

import math

import pytest
import torch

from eval.kl import bon_kl_bound, bon_kl_estimate, exact_bon_kl, exact_bon_pmf


def test_methods_test_values():
    """METHODS §7 tests 1–2, to 1e-12."""
    assert exact_bon_kl([0.5, 0.5], [0.0, 1.0], 2) == pytest.approx(0.13081203594113697, abs=1e-12)
    torch.testing.assert_close(exact_bon_pmf([0.5, 0.5], [0.0, 1.0], 2), torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert exact_bon_kl([0.5, 0.5], [0.0, 1.0], 2) < bon_kl_bound(2) == pytest.approx(0.1931471805599453, abs=1e-15)
    assert exact_bon_kl([0.5, 0.5], [0.0, 1.0], 4) == pytest.approx(0.45935552185348594, abs=1e-12)
    assert exact_bon_kl([0.5, 0.5], [0.0, 1.0], 2000) == pytest.approx(math.log(2), abs=1e-12)   # n → ∞
    u = [0.25] * 4
    assert exact_bon_kl(u, [0, 1, 2, 3], 2) == pytest.approx(0.17398048085273587, abs=1e-12)
    torch.testing.assert_close(exact_bon_pmf(u, [0, 1, 2, 3], 2),
                               torch.tensor([1, 3, 5, 7], dtype=torch.float64) / 16, rtol=0, atol=1e-15)
    torch.testing.assert_close(exact_bon_pmf(u, [0, 1, 1, 2], 2),
                               torch.tensor([0.0625, 0.25, 0.25, 0.4375], dtype=torch.float64), rtol=0, atol=1e-15)
    assert exact_bon_kl(u, [0, 1, 1, 2], 2) == pytest.approx(0.15818850965175424, abs=1e-12)
    torch.testing.assert_close(exact_bon_pmf(u, [7, 7, 7, 7], 5), torch.tensor(u, dtype=torch.float64))
    assert exact_bon_kl(u, [7, 7, 7, 7], 5) == 0.0                                  # all tied ⇒ π_n = π_ref
    assert exact_bon_kl([0.1, 0.2, 0.7], [3, 1, 2], 1) == pytest.approx(0.0, abs=1e-15)   # n = 1 ⇒ 0
    assert bon_kl_bound(1) == 0.0


def _random_discrete(g, L, ties):
    p = torch.rand(L, generator=g, dtype=torch.float64) ** 3 + 1e-3
    p = p / p.sum()
    r = (torch.randint(0, max(1, L // 3), (L,), generator=g).double() if ties
         else torch.randperm(L, generator=g).double())
    return p, r


@pytest.mark.parametrize("ties", [False, True])
def test_bound_dominates_exact_kl_on_random_distributions(ties):
    g = torch.Generator().manual_seed(int(ties))
    for _ in range(300):
        L = int(torch.randint(1, 30, (1,), generator=g))
        n = int(torch.randint(1, 50, (1,), generator=g))
        p, r = _random_discrete(g, L, ties)
        pi_n = exact_bon_pmf(p, r, n)
        assert abs(float(pi_n.sum()) - 1) < 1e-12 and bool((pi_n >= 0).all())
        kl, bound = exact_bon_kl(p, r, n), bon_kl_bound(n)
        assert 0.0 <= kl <= bound + 1e-12
        if not ties:   # Beirami et al. Thm 3.4: gap ≤ 2n(n−1) Σ p²
            assert bound - kl <= 2 * n * (n - 1) * float((p ** 2).sum()) + 1e-12


def test_uniform_fine_grid_reaches_the_bound():
    L, n = 10 ** 4, 8
    kl = exact_bon_kl(torch.full((L,), 1.0 / L, dtype=torch.float64), torch.arange(L), n)
    assert abs(kl - bon_kl_bound(n)) < 1e-6


def test_exact_pmf_zero_mass_outputs_and_errors():
    pi_n = exact_bon_pmf([0.5, 0.0, 0.5], [0, 5, 1], 3)
    assert pi_n[1] == 0.0 and abs(float(pi_n.sum()) - 1) < 1e-15
    with pytest.raises(ValueError, match="sum to 1"):
        exact_bon_kl([0.5, 0.6], [0, 1], 2)
    with pytest.raises(ValueError, match=">= 0"):
        exact_bon_kl([1.5, -0.5], [0, 1], 2)
    with pytest.raises(ValueError, match="equal length"):
        exact_bon_kl([0.5, 0.5], [0, 1, 2], 2)
    with pytest.raises(ValueError, match=">= 1"):
        exact_bon_kl([0.5, 0.5], [0, 1], 0)
    with pytest.raises(ValueError, match=">= 1"):
        bon_kl_bound(0)


def test_estimator_range_and_limits():
    for n in (1, 2, 4, 16, 64, 1000):
        bound = bon_kl_bound(n)
        xs = torch.cat([-torch.logspace(-30, 4, 400, dtype=torch.float64), torch.tensor([0.0, -1e4, -1e300])])
        est = bon_kl_estimate(n, xs)
        assert bool(torch.isfinite(est).all())
        assert bool((est >= 0).all()) and bool((est <= bound).all())
        # ε → 0 (log_eps → −∞): → the bound, finite, no nan
        for le in (-1e4, -800.0, -50.0):
            assert bon_kl_estimate(n, le) == pytest.approx(bound, abs=1e-12)
        # ε → 1 (log_eps → 0⁻): → 0
        assert bon_kl_estimate(n, 0.0) == 0.0
        assert bon_kl_estimate(n, -1e-12) < 1e-9
    # monotone: KL̂ grows as ε shrinks (log_eps runs −1e-6 → −1e3 here)
    est = bon_kl_estimate(16, -torch.logspace(-6, 3, 200, dtype=torch.float64))
    assert bool((est[1:] >= est[:-1] - 1e-15).all())


def test_estimator_float_and_tensor_inputs():
    v = bon_kl_estimate(16, math.log(0.1))
    assert isinstance(v, float)
    t = bon_kl_estimate(16, torch.tensor([[math.log(0.1), -1e4], [0.0, -3.0]], dtype=torch.float64))
    assert isinstance(t, torch.Tensor) and t.shape == (2, 2) and t.dtype == torch.float64
    assert t[0, 0].item() == v and t[0, 1].item() == pytest.approx(bon_kl_bound(16), abs=1e-12) and t[1, 0] == 0
    t32 = bon_kl_estimate(16, torch.tensor([math.log(0.1)], dtype=torch.float32))
    assert t32.dtype == torch.float32 and t32.item() == pytest.approx(v, rel=1e-6)
    assert isinstance(bon_kl_estimate(4, torch.tensor(-2.0)), torch.Tensor)
    # array-likes are read in float64 (not float32): same value as the float path
    assert bon_kl_estimate(16, [math.log(0.1)])[0].item() == v
    with pytest.raises(ValueError, match="<= 0"):
        bon_kl_estimate(4, 0.5)
    with pytest.raises(ValueError, match="nan"):
        bon_kl_estimate(4, torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match=">= 1"):
        bon_kl_estimate(0, -1.0)


def test_estimator_equals_oracle_on_fine_grid_plus_top_atom():
    """KL̂(ε) is the exact KL of "continuous mass 1−ε + one top atom ε" (METHODS §7 test 4): 10⁵ tiny atoms."""
    M = 10 ** 5
    for eps, n in ((0.1, 16), (0.01, 8), (0.5, 4), (0.002, 64)):
        p = torch.cat([torch.full((M,), (1 - eps) / M, dtype=torch.float64), torch.tensor([eps], dtype=torch.float64)])
        exact = exact_bon_kl(p, torch.arange(M + 1), n)
        assert bon_kl_estimate(n, math.log(eps)) == pytest.approx(exact, abs=2e-6)
    assert bon_kl_estimate(16, math.log(0.1)) == pytest.approx(1.75614, abs=5e-6)


def _expected_estimate(p, n):
    """E_{y∼π_n}[KL̂(π_ref(y))] exactly (rewards increasing with index)."""
    r = torch.arange(len(p))
    return float((exact_bon_pmf(p, r, n) * bon_kl_estimate(n, torch.log(p))).sum()), exact_bon_kl(p, r, n)


def test_estimator_gap_on_concentrated_distribution():
    """Report E[KL̂] vs the exact KL vs the bound where the bound is loose (top mass ε, nε ≫ 1)."""
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)        # rewards increasing; top ε = 0.05
    for n in (16, 64, 256):
        est, exact = _expected_estimate(p, n)
        bound = bon_kl_bound(n)
        print(f"\nconcentrated p={p.tolist()} n={n} (nε={n * 0.05:g}): E[KL̂]={est:.6f} exact={exact:.6f} "
              f"bound={bound:.6f}  E[KL̂]−exact={est - exact:.3e}  bound−exact={bound - exact:.4f}")
        assert est - exact > 0                         # Beirami et al. Conj. 4.4 holds here
        assert bound - exact > 0.07 and bound - est > 0.05
        if n * 0.05 >= 3:                              # nε ≫ 1: the estimator is far tighter than the bound
            assert est - exact < 0.1 * (bound - exact)


def test_estimator_conjecture_soft_check():
    """METHODS §7: E[KL̂] ≥ KL is a conjecture — warn (do not fail) on counterexamples."""
    g = torch.Generator().manual_seed(7)
    violations = []
    for _ in range(200):
        L = int(torch.randint(2, 20, (1,), generator=g))
        n = int(torch.randint(2, 64, (1,), generator=g))
        p = torch.rand(L, generator=g, dtype=torch.float64) ** 3 + 1e-4
        p = p / p.sum()
        est, exact = _expected_estimate(p, n)
        assert 0.0 <= est <= bon_kl_bound(n) + 1e-12
        if est < exact - 1e-12:
            violations.append((L, n, est - exact))
    if violations:
        import warnings
        warnings.warn(f"E[KL̂] < KL in {len(violations)}/200 random cases (Conj. 4.4): {violations[:3]}")
