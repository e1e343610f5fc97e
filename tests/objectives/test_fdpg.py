"""f-DPG's pure functions (align/objectives/fdpg.py) against the checkable identities of METHODS §5, on a discrete
space of K outcomes with a softmax policy, where every expectation is an exact sum."""

import math

import pytest
import torch

from align.divergences import get_divergence
from align.errors import ConfigError
from align.objectives.fdpg import (LogPartitionTable, MovingBaseline, fdpg_loss, leave_one_out_baseline,
                                   log_importance_mean)

K = 7
DIVERGENCES = [("reverse_kl", {}), ("forward_kl", {}), ("js", {}), ("alpha", {"alpha": 0.5}), ("tv", {})]


def _world(seed=0):
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(K, generator=gen, dtype=torch.float64)
    log_P = torch.randn(K, generator=gen, dtype=torch.float64) + 2.0  # unnormalised target, Z far from 1
    log_q = torch.log_softmax(torch.randn(K, generator=gen, dtype=torch.float64), 0)  # a sampler q != pi
    return theta, log_P, log_q


@pytest.mark.parametrize("name, params", DIVERGENCES, ids=[d[0] for d in DIVERGENCES])
@pytest.mark.parametrize("sampler", ["q", "pi"])
@pytest.mark.parametrize("baseline", [0.0, 0.7])
def test_expected_estimator_gradient_is_the_gradient_of_the_divergence(name, params, sampler, baseline):
    divergence = get_divergence(name, require_closed_form=False, **params)
    theta, log_P, log_q = _world()
    log_Z = torch.logsumexp(log_P, 0)
    p = (log_P - log_Z).exp()

    theta_a = theta.clone().requires_grad_()
    pi = torch.softmax(theta_a, 0)
    divergence_value = (p * divergence.f(pi / p)).sum()  # D_f(pi || p), analytic
    (expected,) = torch.autograd.grad(divergence_value, theta_a)

    theta_e = theta.clone().requires_grad_()
    log_pi = torch.log_softmax(theta_e, 0)
    log_sampler = log_pi.detach() if sampler == "pi" else log_q
    terms = fdpg_loss(log_pi, log_P, log_Z, log_sampler, divergence, baseline=baseline)
    # E_{y~q}[loss(y)] as an exact sum over the K outcomes
    (estimated,) = torch.autograd.grad((log_sampler.exp() * terms.losses).sum(), theta_e)
    torch.testing.assert_close(estimated, expected, rtol=1e-9, atol=1e-12)
    assert expected.abs().max() > 1e-3  # not trivially zero


def test_importance_sampling_estimates_the_partition_function():
    theta, log_P, log_q = _world(1)
    log_Z = float(torch.logsumexp(log_P, 0))
    # exactly: E_q[P/q] = sum_y q P/q = Z, i.e. log of the q-weighted mean of P/q
    assert float(torch.logsumexp(log_q + (log_P - log_q), 0)) == pytest.approx(log_Z, abs=1e-12)
    samples = torch.multinomial(log_q.exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert float(log_importance_mean(log_P[samples], log_q[samples])) == pytest.approx(log_Z, abs=0.01)


@pytest.mark.parametrize("name, params", DIVERGENCES, ids=[d[0] for d in DIVERGENCES])
def test_at_the_target_the_divergence_is_zero_and_the_pseudo_reward_constant(name, params):
    divergence = get_divergence(name, require_closed_form=False, **params)
    _, log_P, log_q = _world(2)
    log_Z = torch.logsumexp(log_P, 0)
    log_pi = log_P - log_Z  # pi = p
    terms = fdpg_loss(log_pi, log_P, log_Z, log_q, divergence)
    torch.testing.assert_close(terms.pseudo_rewards, torch.full((K,), -divergence.f_prime_at_one(),
                                                                dtype=torch.float64), rtol=0, atol=1e-12)
    assert float((log_pi.exp() * divergence.f(torch.ones(K, dtype=torch.float64))).sum()) == 0.0


def test_reverse_kl_pseudo_reward_is_the_kl_regularised_reward():
    # With P = a·exp(r/β): R = −(log(π/p) + 1) = r/β − log(π/a) − log Z − 1, elementwise (METHODS §5).
    gen = torch.Generator().manual_seed(3)
    log_a = torch.log_softmax(torch.randn(K, generator=gen, dtype=torch.float64), 0)
    r, beta = torch.randn(K, generator=gen, dtype=torch.float64), 0.25
    log_pi = torch.log_softmax(torch.randn(K, generator=gen, dtype=torch.float64), 0)
    log_P = log_a + r / beta
    log_Z = torch.logsumexp(log_P, 0)
    terms = fdpg_loss(log_pi, log_P, log_Z, log_pi, get_divergence("reverse_kl"))
    torch.testing.assert_close(terms.pseudo_rewards, r / beta - (log_pi - log_a) - log_Z - 1, rtol=0, atol=1e-12)


def test_importance_weights_are_truncated_and_reported():
    log_pi = torch.tensor([0.0, -1.0, -2.0])
    log_q = torch.tensor([-3.0, -1.0, 0.0])  # weights e^3, 1, e^-2
    terms = fdpg_loss(log_pi, log_pi, 0.0, log_q, get_divergence("js"), max_importance_weight=5.0)
    torch.testing.assert_close(terms.importance_weights, torch.tensor([5.0, 1.0, math.exp(-2.0)]))
    assert terms.truncated.tolist() == [True, False, False]
    assert terms.losses.dtype == torch.float32 and not terms.pseudo_rewards.requires_grad


def test_partition_table_accumulates_every_sample_and_round_trips():
    gen = torch.Generator().manual_seed(4)
    log_P, log_q = torch.randn(10, generator=gen) * 3, torch.randn(10, generator=gen)
    table = LogPartitionTable()
    table.update("x", log_P[:4], log_q[:4])
    assert table["x"] == pytest.approx(float(log_importance_mean(log_P[:4], log_q[:4])), abs=1e-12)
    table.update("x", log_P[4:], log_q[4:])
    table.update("y", log_P[:2], log_q[:2])
    assert table["x"] == pytest.approx(float(log_importance_mean(log_P, log_q)), abs=1e-12)  # over all 10 samples
    again = LogPartitionTable()
    again.load_state_dict(table.state_dict())
    assert (again["x"], again["y"], len(again)) == (table["x"], table["y"], 2) and "z" not in again


def test_baselines():
    baseline = MovingBaseline(window=3)
    assert baseline.value() == 0.0
    baseline.update(torch.tensor([1.0, 2.0]))
    baseline.update(torch.tensor([3.0, 4.0]))  # the window keeps the last 3
    assert baseline.value() == pytest.approx(3.0)
    again = MovingBaseline()
    again.load_state_dict(baseline.state_dict())
    assert again.value() == baseline.value() and again.window == 3
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    torch.testing.assert_close(leave_one_out_baseline(rewards), torch.tensor([[4.0, 3.5, 1.5], [1.5, 1.5, 0.0]]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_baseline(torch.zeros(3, 1))


def test_tv_is_for_f_dpg_only():
    from align.errors import ConfigError

    with pytest.raises(ConfigError, match="total variation does not admit the f-DPO closed form"):
        get_divergence("tv")  # f-DPO's default
    assert get_divergence("tv", require_closed_form=False).name == "tv"
    with pytest.raises(ConfigError, match="chi-squared"):  # not registered for either
        get_divergence("chi2", require_closed_form=False)


# --------------------------------------------------------------------------------------------- the objective class


def test_fdpg_objective_baselines_and_state():
    """`FDPG.loss` is `fdpg_loss` with the configured baseline of R: the moving one is used before it is updated with
    the batch, leave-one-out is per prompt; its log Z table and baseline window round-trip through state_dict."""
    from align.objectives import FDPG, OBJECTIVES

    assert OBJECTIVES["fdpg"] is FDPG and FDPG.family == "on_policy"
    g = torch.Generator().manual_seed(0)
    policy = torch.randn(2, 3, generator=g, dtype=torch.float64)
    target = torch.randn(2, 3, generator=g, dtype=torch.float64)
    keys = ["p", "q"]
    for kind in ("none", "moving", "leave_one_out"):
        objective = FDPG(FDPG.Params(divergence="js", baseline=kind, baseline_window=4))
        objective.moving_baseline.update(torch.tensor([0.25]))
        objective.update_log_z(keys, target, policy)
        log_z = torch.tensor([[objective.log_z[k]] for k in keys], dtype=torch.float64)
        theta = policy.clone().requires_grad_()
        losses, metrics = objective.loss(theta, target, policy, keys)
        pseudo = -get_divergence("js").f_prime_from_log(policy - target + log_z)
        want_b = {"none": torch.zeros_like(pseudo), "moving": torch.full_like(pseudo, 0.25),
                  "leave_one_out": (pseudo.sum(1, keepdim=True) - pseudo) / 2}[kind]
        torch.testing.assert_close(metrics["fdpg/baseline"].double(), want_b, rtol=0, atol=1e-6)
        torch.testing.assert_close(losses, (want_b - pseudo) * policy, rtol=0, atol=1e-6)
        if kind == "moving":  # updated after use, window of 4
            assert objective.moving_baseline.value() == pytest.approx(float(pseudo.reshape(-1)[-4:].mean()))
        restored = FDPG(FDPG.Params(divergence="js", baseline=kind, baseline_window=4))
        restored.load_state_dict(objective.state_dict())
        assert restored.log_z["p"] == objective.log_z["p"]
        assert restored.moving_baseline.value() == objective.moving_baseline.value()


@pytest.mark.parametrize("params, message", [
    ({"divergence": "hellinger"}, "objective.divergence: unknown divergence 'hellinger'"),
    ({"baseline": "mean"}, "objective.baseline must be one of moving, leave_one_out, none"),
    ({"max_importance_weight": 0.5}, "objective.max_importance_weight must be > 1.0"),
    ({"divergence": "alpha", "alpha": 1.5}, "objective.divergence: "),
])
def test_fdpg_params_errors_name_the_key(params, message):
    from align.config import objective_params

    with pytest.raises(ConfigError) as e:
        objective_params({"name": "fdpg", **params})
    assert str(e.value).startswith(message), str(e.value)
