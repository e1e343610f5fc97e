"""f-divergence registry and the stable f'(u) from log u (METHODS.md §4)."""

import math

import pytest
import torch

from align.divergences import (
    DIVERGENCES,
    AlphaDivergence,
    Divergence,
    ForwardKL,
    JensenShannon,
    ReverseKL,
    exp_cap,
    get_divergence,
    register_divergence,
)
from align.errors import ConfigError

ALL = [
    ("reverse_kl", {}),
    ("forward_kl", {}),
    ("js", {}),
    ("alpha", {"alpha": 0.1}),
    ("alpha", {"alpha": 0.5}),
    ("alpha", {"alpha": 0.9}),
]
IDS = [n + "".join(f"-{v}" for v in kw.values()) for n, kw in ALL]
F_PRIME_AT_ONE = {"reverse_kl": 1.0, "forward_kl": -1.0, "js": 0.0, "alpha": 0.0}
US = [0.03, 0.3, 0.9, 1.0, 1.7, 6.0, 45.0]


@pytest.mark.parametrize(("name", "kw"), ALL, ids=IDS)
def test_f_prime_matches_central_differences_of_f(name, kw):
    div = get_divergence(name, **kw)
    u = torch.tensor(US, dtype=torch.float64)
    h = 1e-6 * u
    fd = (div.f(u + h) - div.f(u - h)) / (2 * h)
    exact = div.f_prime_from_log(torch.log(u))
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, fd, rtol=1e-7, atol=1e-8)
    # f is a generator: f(1) = 0, and the fp32 path agrees with the fp64 one.
    assert div.f(torch.ones(1, dtype=torch.float64)).abs().item() < 1e-15
    fp32 = div.f_prime_from_log(torch.log(u).float())
    assert fp32.dtype == torch.float32
    torch.testing.assert_close(fp32.double(), exact, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize(("name", "kw"), ALL, ids=IDS)
def test_score_is_f_prime_minus_f_prime_at_one(name, kw):
    div = get_divergence(name, **kw)
    log_u = torch.tensor([-3.0, -0.5, 0.0, 0.25, 4.0], dtype=torch.float64)
    assert div.f_prime_at_one() == F_PRIME_AT_ONE[name]
    torch.testing.assert_close(div.score_from_log(log_u) + F_PRIME_AT_ONE[name], div.f_prime_from_log(log_u))
    assert div.score_from_log(torch.zeros(1)).item() == 0.0


def test_closed_forms_of_f_prime():
    log_u = torch.tensor([-7.0, -1.0, 0.0, 2.0, 9.0], dtype=torch.float64)
    u = log_u.exp()
    torch.testing.assert_close(ReverseKL().f_prime_from_log(log_u), log_u + 1)
    torch.testing.assert_close(ForwardKL().f_prime_from_log(log_u), -1 / u)
    torch.testing.assert_close(JensenShannon().f_prime_from_log(log_u), torch.log(2 * u / (1 + u)))
    for a in (0.2, 0.5, 0.8):
        torch.testing.assert_close(AlphaDivergence(a).f_prime_from_log(log_u), (1 - u ** (-a)) / a)


def test_alpha_limits():
    log_u = torch.linspace(-5, 5, 11, dtype=torch.float64)
    # α → 0: reverse KL (continuous thanks to expm1); α → 1: forward KL score 1 − 1/u (TRL ≤ 0.28 coef 1.0).
    torch.testing.assert_close(AlphaDivergence(1e-9).score_from_log(log_u), log_u, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(
        AlphaDivergence(1 - 1e-9).score_from_log(log_u), ForwardKL().score_from_log(log_u), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("c", [0.1, 0.5, 0.7, 0.95])
def test_trl_029_coef_is_one_minus_paper_alpha(c):
    # TRL >= 0.29: f'(t) = (t^(c-1) - 1)/(c - 1); paper: (1 - t^-α)/α. Same function iff α = 1 - c.
    log_t = torch.linspace(-6, 6, 13, dtype=torch.float64)
    trl = (torch.exp((c - 1) * log_t) - 1) / (c - 1)
    torch.testing.assert_close(get_divergence("alpha", alpha=1 - c).score_from_log(log_t), trl)


def test_exp_caps():
    assert exp_cap(torch.float16) == 11.0
    assert exp_cap(torch.bfloat16) == 80.0
    assert exp_cap(torch.float32) == 80.0
    assert math.exp(11.0) < torch.finfo(torch.float16).max < math.exp(11.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("name", "kw"), ALL, ids=IDS)
def test_f_prime_finite_values_and_grads_for_huge_log_ratios(name, kw, dtype):
    div = get_divergence(name, **kw)
    log_u = torch.tensor([-1000.0, -100.0, -50.0, -10.0, 0.0, 10.0, 50.0, 100.0, 1000.0], dtype=dtype)
    log_u.requires_grad_(True)
    out = div.f_prime_from_log(log_u)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert log_u.grad.dtype == dtype
    assert torch.isfinite(log_u.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_forward_kl_clamp_value_and_zero_gradient_past_cap(dtype):
    cap = exp_cap(dtype)
    log_u = torch.tensor([-1000.0, -100.0, -2.0], dtype=dtype, requires_grad=True)
    out = ForwardKL().f_prime_from_log(log_u)
    expected_capped = -math.exp(cap)
    assert out[0].item() == pytest.approx(expected_capped, rel=1e-6)
    assert out[1].item() == pytest.approx(expected_capped, rel=1e-6)
    out.sum().backward()
    assert log_u.grad[0].item() == 0.0 and log_u.grad[1].item() == 0.0
    assert log_u.grad[2].item() == pytest.approx(math.exp(2.0), rel=1e-2)  # d(−e^{−ℓ})/dℓ = e^{−ℓ}


def test_registry_names_and_aliases():
    assert {"reverse_kl", "forward_kl", "js", "jsd", "js_divergence", "alpha", "alpha_divergence"} <= set(DIVERGENCES)
    assert DIVERGENCES["jsd"] is DIVERGENCES["js_divergence"] is JensenShannon
    assert DIVERGENCES["alpha_divergence"] is AlphaDivergence
    assert get_divergence("JS-Divergence").name == "js"
    assert get_divergence("alpha_divergence", alpha=0.3) == AlphaDivergence(0.3)
    assert get_divergence("alpha").alpha == 0.5
    d = ForwardKL()
    assert get_divergence(d) is d


def test_registry_rejects_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):

        @register_divergence("js")
        class Other(Divergence):
            pass


def test_unknown_name_lists_known():
    with pytest.raises(ConfigError) as e:
        get_divergence("hellinger_squared")
    msg = str(e.value)
    assert "'hellinger_squared'" in msg
    for known in ("reverse_kl", "forward_kl", "js", "alpha"):
        assert known in msg


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("tv", "not invertible"),
        ("total_variation", "not invertible"),
        ("chi2", "0 is in the domain"),
        ("chi_squared", "0 is in the domain"),
    ],
)
def test_tv_and_chi2_have_no_closed_form(name, needle):
    with pytest.raises(ConfigError, match="does not admit the f-DPO closed form") as e:
        get_divergence(name)
    assert needle in str(e.value)


def test_bad_params():
    with pytest.raises(ConfigError, match=r"alpha must be in \(0, 1\), got 1.5"):
        get_divergence("alpha", alpha=1.5)
    for bad in (0, 1, 0.0, 1.0, -0.2, float("nan")):
        with pytest.raises(ConfigError, match="alpha must be in"):
            get_divergence("alpha", alpha=bad)
    for bad in ("0.5", True, None):
        with pytest.raises(ConfigError, match="alpha must be a number"):
            get_divergence("alpha", alpha=bad)
    with pytest.raises(ConfigError, match="unknown parameter 'alpha' for divergence 'js'"):
        get_divergence("js", alpha=0.5)
    with pytest.raises(ConfigError, match="unknown parameter 'alfa'"):
        get_divergence("alpha", alfa=0.5)
