"""Ensemble aggregation and per-member normalisation (METHODS §8, tests 1-2)."""

import pytest
import torch

from align.errors import AlignError, ConfigError
from reward_models import AGGREGATIONS, aggregate, check_aggregation
from reward_models.aggregate import denormalize, member_statistics, normalize, register_aggregation

FIVE = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])


def random_scores(seed, b=64, k=5):
    g = torch.Generator().manual_seed(seed)
    # Different scales per member and some heavy values, so the inequalities are not tested on easy inputs only.
    return torch.randn(b, k, generator=g, dtype=torch.float64) * torch.linspace(0.1, 30.0, k, dtype=torch.float64)


def test_registry_has_the_three_methods():
    assert {"mean", "wco", "uwo"} <= set(AGGREGATIONS)


# --- METHODS §8 test 1: the worked example ------------------------------------------------------------------------


def test_methods_example_one_to_five():
    assert aggregate(FIVE, "mean").item() == 3.0
    assert aggregate(FIVE, "wco").item() == 1.0
    assert aggregate(FIVE, "uwo", lam=0.5).item() == 2.0  # population variance 2 -> 3 - 0.5 * 2
    assert aggregate(FIVE, "uwo", lam=0.5, ddof=0).item() == 2.0
    assert aggregate(FIVE, "uwo", lam=0.5, ddof=1).item() == 1.75  # unbiased variance 2.5 -> 3 - 0.5 * 2.5
    assert aggregate(FIVE, "uwo", lam=0.0).item() == aggregate(FIVE, "mean").item()
    assert aggregate(FIVE, "uwo").item() == 2.0  # defaults: lam 0.5 (Coste repo, BoN), ddof 0


def test_defaults_filled_in():
    assert check_aggregation("uwo") == {"lam": 0.5, "ddof": 0}
    assert check_aggregation("uwo", {"lam": 0.1, "ddof": 1}, num_members=5) == {"lam": 0.1, "ddof": 1}
    assert check_aggregation("mean", {}, num_members=1) == {}


# --- METHODS §8 test 2: properties for all inputs ----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 3, 7])
def test_order_properties(seed, k):
    s = random_scores(seed, k=k)
    mean, wco = aggregate(s, "mean"), aggregate(s, "wco")
    assert torch.all(wco <= mean) and torch.all(mean <= s.max(dim=-1).values)
    for lam in (0.0, 0.1, 0.5, 3.0):
        for ddof in (0, 1):
            assert torch.all(aggregate(s, "uwo", lam=lam, ddof=ddof) <= mean)


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 2.0])
def test_uwo_is_mean_minus_lam_var_exactly(lam, ddof):
    s = random_scores(11).float()
    expected = s.mean(dim=-1) - lam * torch.var(s, dim=-1, correction=ddof)
    assert torch.equal(aggregate(s, "uwo", lam=lam, ddof=ddof), expected)


def test_ddof_changes_the_penalty_by_k_over_k_minus_1():
    s = random_scores(3, k=4)
    mean = aggregate(s, "mean")
    pen0 = mean - aggregate(s, "uwo", lam=1.0, ddof=0)
    pen1 = mean - aggregate(s, "uwo", lam=1.0, ddof=1)
    torch.testing.assert_close(pen1, pen0 * 4 / 3)


@pytest.mark.parametrize("k", [1, 2, 6])
def test_identical_members_all_equal(k):
    # Dyadic values, so that k·x and (k·x)/k are exact and "equal" can mean bit-equal.
    column = torch.randint(-4000, 4000, (64, 1), generator=torch.Generator().manual_seed(5)).double() / 8
    s = column.expand(-1, k).contiguous()
    methods = [("mean", {})] + ([("wco", {}), ("uwo", {"lam": 0.5}), ("uwo", {"lam": 2.0, "ddof": 1})]
                                if k >= 2 else [])
    for method, params in methods:
        assert torch.equal(aggregate(s, method, **params), column[:, 0]), method


def test_mean_with_one_member_is_that_member():
    s = random_scores(2, k=1)
    assert torch.equal(aggregate(s, "mean"), s[:, 0])


def test_differentiable_and_dtype_preserved():
    s = random_scores(4).float().requires_grad_()
    for method in ("mean", "wco", "uwo"):
        out = aggregate(s, method)
        assert out.dtype == torch.float32 and out.shape == (64,)
        (grad,) = torch.autograd.grad(out.sum(), s)
        assert torch.isfinite(grad).all()
    assert aggregate(s.detach().double(), "mean").dtype == torch.float64


# --- errors: one line, naming the parameter -----------------------------------------------------------------------


@pytest.mark.parametrize("method, params, k, match", [
    ("median", {}, 3, r"aggregation.method: unknown aggregation 'median'; known: mean, uwo, wco"),
    ("wco", {}, 1, r"aggregation.method: 'wco' needs at least 2 ensemble members, got 1"),
    ("uwo", {}, 1, r"aggregation.method: 'uwo' needs at least 2 ensemble members, got 1"),
    ("uwo", {"lam": -0.1}, 3, r"aggregation.lam: must be >= 0"),
    ("uwo", {"lam": float("nan")}, 3, r"aggregation.lam: must be a finite number"),
    ("uwo", {"lam": "0.5"}, 3, r"aggregation.lam: must be a finite number"),
    ("uwo", {"ddof": 2}, 3, r"aggregation.ddof: must be 0 \(population variance\) or 1 \(unbiased\), got 2"),
    ("uwo", {"ddof": True}, 3, r"aggregation.ddof: must be 0"),
    ("uwo", {"ddof": 1}, 1, r"aggregation.ddof: 1 needs at least 2 members"),
    ("uwo", {"lambda": 0.5}, 3, r"aggregation.lambda: unknown parameter for 'uwo' \(it takes lam, ddof\)"),
    ("mean", {"lam": 0.5}, 3, r"aggregation.lam: unknown parameter for 'mean' \(it takes no parameters\)"),
    ("wco", {"ddof": 0}, 3, r"aggregation.ddof: unknown parameter for 'wco'"),
])
def test_errors(method, params, k, match):
    with pytest.raises(ConfigError, match=match) as info:
        aggregate(torch.zeros(2, k), method, **params)
    assert "\n" not in str(info.value)
    # The same validation without scores (configs), whenever the error does not depend on K.
    with pytest.raises(ConfigError, match=match):
        check_aggregation(method, params, num_members=k)


def test_check_without_k_accepts_what_needs_k():
    assert check_aggregation("wco") == {}
    assert check_aggregation("uwo", {"ddof": 1}) == {"lam": 0.5, "ddof": 1}


@pytest.mark.parametrize("scores", [torch.zeros(3), torch.zeros(2, 3, 1), torch.zeros(2, 0), torch.zeros(2, 3,
                                    dtype=torch.long), [[1.0, 2.0]]])
def test_bad_scores(scores):
    with pytest.raises(AlignError, match="aggregate:"):
        aggregate(scores, "mean")


def test_register_aggregation():
    @register_aggregation("test_max_minus", min_members=2)
    def max_minus(scores, *, offset: float = 1.0):
        return scores.max(dim=-1).values - offset

    try:
        assert aggregate(FIVE, "test_max_minus").item() == 4.0
        assert aggregate(FIVE, "test_max_minus", offset=2.0).item() == 3.0
        with pytest.raises(ConfigError, match="needs at least 2"):
            aggregate(FIVE[:, :1], "test_max_minus")
        with pytest.raises(ValueError, match="already registered"):  # another function under a taken name
            register_aggregation("test_max_minus")(lambda scores: scores.min(dim=-1).values)
    finally:
        del AGGREGATIONS["test_max_minus"]


# --- normalisation ------------------------------------------------------------------------------------------------


def test_normalisation_round_trip():
    reference = random_scores(7, b=200).float() + torch.tensor([100.0, -3.0, 0.0, 5.0, 1e3])
    mean, std = member_statistics(reference)
    assert mean.shape == std.shape == (5,) and mean.dtype == torch.float32
    z = normalize(reference, mean, std)
    torch.testing.assert_close(z.mean(dim=0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=0, correction=0), torch.ones(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(denormalize(z, mean, std), reference, rtol=1e-5, atol=1e-3)
    # Lists (as stored in a manifest) work like tensors.
    torch.testing.assert_close(normalize(reference, mean.tolist(), std.tolist()), z)


def test_normalisation_changes_wco_choice():
    # Member 1 sits 10 units below member 0 everywhere: without normalisation WCO always picks it.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(100, generator=g)
    scores = torch.stack([base + 0.1 * torch.randn(100, generator=g), base - 10.0], dim=1)
    assert torch.equal(aggregate(scores, "wco"), scores[:, 1])
    z = normalize(scores, *member_statistics(scores))
    assert not torch.equal(aggregate(z, "wco"), z[:, 1])


def test_normalisation_errors():
    with pytest.raises(AlignError, match="at least 2 reference rows"):
        member_statistics(torch.zeros(1, 3))
    with pytest.raises(AlignError, match="member 1 gives every reference row the same reward"):
        member_statistics(torch.tensor([[0.0, 2.0], [1.0, 2.0]]))
    with pytest.raises(AlignError, match="one value per member"):
        normalize(torch.zeros(2, 3), [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(AlignError, match="std must be > 0"):
        normalize(torch.zeros(2, 2), [0.0, 0.0], [1.0, 0.0])
