"""align.targets: the f-DPG targets' formulas, the best-of-n target's normalisation and KL on a discrete space, the
reverse-KL pseudo-reward identities of METHODS §5 and §7.1, and config errors naming their keys."""

import math

import pytest
import torch

from align.errors import ConfigError
from align.objectives import FDPG
from align.targets import TARGETS, BestOfNTarget, best_of_n_log_weight, build_target, target_params
from eval.kl import exact_bon_kl, exact_bon_pmf


def test_registry_has_the_three_targets():
    assert {"exponential", "constraint", "best_of_n"} <= set(TARGETS)


def test_exponential_target_is_reference_plus_scaled_reward():
    target = build_target({"kind": "exponential", "beta": 0.5})
    ref, r = torch.tensor([[-3.0, -5.0]]), torch.tensor([[1.0, -2.0]])
    torch.testing.assert_close(target.log_prob(ref, r, ["x"]), torch.tensor([[-1.0, -9.0]], dtype=torch.float64))


def test_reverse_kl_pseudo_reward_identity_for_the_exponential_target():
    """METHODS §5 test 3: with P = a·exp(r/β), R = −f′(π/p) = r/β − log(π/a) − log Z − 1, elementwise."""
    g = torch.Generator().manual_seed(0)
    policy, ref, r = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    beta = 0.3
    target = build_target({"kind": "exponential", "beta": beta})
    objective = FDPG(FDPG.Params(divergence="reverse_kl", baseline="none"))
    keys = ["a", "b", "c", "d"]
    log_p = target.log_prob(ref, r, keys)
    objective.update_log_z(keys, log_p, policy)
    _, metrics = objective.loss(policy.clone().requires_grad_(), log_p, policy, keys)
    log_z = torch.tensor([objective.log_z[k] for k in keys], dtype=torch.float64)[:, None]
    want = r / beta - (policy - ref) - log_z - 1
    torch.testing.assert_close(metrics["fdpg/pseudo_reward"].double(), want, rtol=0, atol=1e-5)


def test_constraint_target_zeroes_unsatisfying_completions():
    ref, r = torch.tensor([[-2.0, -3.0, -4.0]]), torch.tensor([[0.5, 0.0, -1.0]])
    hard = build_target({"kind": "constraint", "threshold": 0.0})
    got = hard.log_prob(ref, r, ["x"])
    assert got[0, :2].tolist() == [-2.0, -3.0] and got[0, 2] == -math.inf
    soft = build_target({"kind": "constraint", "threshold": 0.0, "epsilon": 0.01})
    assert soft.log_prob(ref, r, ["x"])[0, 2].item() == pytest.approx(-4.0 + math.log(0.01))
    # Forward KL (DPG) to a target with zeros: R = p/π is 0 there, and the loss stays finite.
    objective = FDPG(FDPG.Params(divergence="forward_kl", baseline="none"))
    policy = torch.tensor([[-2.5, -2.5, -2.5]], dtype=torch.float64)
    objective.update_log_z(["x"], got, policy)
    losses, metrics = objective.loss(policy.clone().requires_grad_(), got, policy, ["x"])
    assert torch.isfinite(losses).all() and metrics["fdpg/pseudo_reward"][0, 2] == 0


def random_law(K, seed, ties):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(K, generator=g, dtype=torch.float64) + 0.05
    probs /= probs.sum()
    rewards = torch.randint(0, 4, (K,), generator=g).double() if ties else torch.randn(K, generator=g,
                                                                                       dtype=torch.float64)
    return probs, rewards


def exact_cdf(probs, rewards):
    cdf = torch.stack([probs[rewards <= r].sum() for r in rewards])
    below = torch.stack([probs[rewards < r].sum() for r in rewards])
    return cdf, below


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n", [2, 5, 16])
def test_best_of_n_weight_is_normalised_and_has_the_oracle_kl(n, ties):
    """METHODS §7.1: with the exact reward CDF of a discrete a, a·w_n is the best-of-n law: it sums to 1, equals
    `eval.kl.exact_bon_pmf` and its KL to a is `exact_bon_kl` (with and without ties)."""
    probs, rewards = random_law(7, seed=n, ties=ties)
    cdf, below = exact_cdf(probs, rewards)
    pmf = probs * best_of_n_log_weight(cdf, below, n).exp()
    assert float(pmf.sum()) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(pmf, exact_bon_pmf(probs, rewards, n).double(), rtol=0, atol=1e-12)
    kl = float((pmf * (pmf / probs).log()).sum())
    assert kl == pytest.approx(exact_bon_kl(probs, rewards, n), abs=1e-10)


def test_fitted_best_of_n_target_converges_to_the_exact_law():
    """The per-prompt empirical CDF from M samples of a: as M grows the fitted target's KL approaches the oracle."""
    probs, rewards = random_law(6, seed=3, ties=True)
    n = 4
    want = exact_bon_kl(probs, rewards, n)
    g = torch.Generator().manual_seed(0)
    errors = []
    for M in (64, 20000):
        target = build_target({"kind": "best_of_n", "n": n, "samples": M})
        draws = rewards[torch.multinomial(probs, M, replacement=True, generator=g)]
        target.fit_prompt("x", draws)
        errors.append(abs(target.kl_to_reference() - want))
    assert errors[1] < 0.01 and errors[1] < errors[0] + 1e-9
    assert target.metrics()["target/kl_bound"] == pytest.approx(math.log(n) - (n - 1) / n)


def test_reverse_kl_pseudo_reward_identity_for_the_best_of_n_target():
    """METHODS §7.1: reverse-KL f-DPG to π_n has R = (n−1) log F(r) − log(π/a) + log n − 1 − log Z where the reward
    law is atomless (every sampled reward distinct from the fitted ones)."""
    n = 8
    target = build_target({"kind": "best_of_n", "n": n, "samples": 50})
    target.fit_prompt("x", torch.linspace(-1, 1, 50))
    r = torch.tensor([[-0.99, 0.013, 0.5004, 2.0]])
    ref = torch.tensor([[-3.0, -4.0, -2.0, -6.0]], dtype=torch.float64)
    policy = torch.tensor([[-2.5, -4.5, -1.0, -7.0]], dtype=torch.float64)
    log_p = target.log_prob(ref, r, ["x"])
    objective = FDPG(FDPG.Params(divergence="reverse_kl", baseline="none"))
    objective.update_log_z(["x"], log_p, policy)
    _, metrics = objective.loss(policy.clone().requires_grad_(), log_p, policy, ["x"])
    cdf, _ = target.cdf("x", r[0])
    want = (n - 1) * cdf.log() - (policy - ref) + math.log(n) - 1 - objective.log_z["x"]
    torch.testing.assert_close(metrics["fdpg/pseudo_reward"].double(), want, rtol=0, atol=1e-5)


def test_best_of_n_state_round_trips():
    target = build_target({"kind": "best_of_n", "n": 3, "samples": 4})
    target.fit_prompt("x", torch.tensor([3.0, 1.0, 2.0, 2.0]))
    other = build_target({"kind": "best_of_n", "n": 3, "samples": 4})
    other.load_state_dict(target.state_dict())
    r = torch.tensor([[2.0, 0.0]])
    assert other.fitted("x") and not other.fitted("y")
    zeros = torch.zeros(1, 2)
    torch.testing.assert_close(other.log_prob(zeros, r, ["x"]), target.log_prob(zeros, r, ["x"]))
    assert isinstance(other, BestOfNTarget)


@pytest.mark.parametrize("section, message", [
    ({"kind": "exponential", "beta": 0}, "target.beta must be > 0"),
    ({"kind": "exponential", "beta": -1}, "target.beta must be > 0"),
    ({"kind": "best_of_n", "n": 1}, "target.n must be an integer >= 2"),
    ({"kind": "best_of_n", "samples": 1}, "target.samples must be an integer >= 2"),
    ({"kind": "constraint", "epsilon": 1.0}, "target.epsilon must be in [0, 1)"),
    ({"kind": "exponential", "n": 4}, "target.n: unknown key of target kind 'exponential'"),
    ({"kind": "boltzmann"}, "target.kind: unknown target kind 'boltzmann'"),
])
def test_bad_target_sections_name_the_key(section, message):
    with pytest.raises(ConfigError) as e:
        target_params(section)
    assert str(e.value).startswith(message), str(e.value)
