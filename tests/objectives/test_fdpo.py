"""f-DPO / DPO loss (METHODS.md §1, §4), its objective wrapper, and agreement with TRL 1.16's real `_compute_loss`."""

import contextlib
import dataclasses
import itertools
import math
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from align.divergences import get_divergence
from align.errors import ConfigError
from align.logps import PairLogps
from align.objectives import (
    FDPO,
    OBJECTIVES,
    Objective,
    build_objective,
    fdpo_loss,
    get_objective,
    register_objective,
)

LOG2 = math.log(2.0)
ALL = [
    ("reverse_kl", {}),
    ("forward_kl", {}),
    ("js", {}),
    ("alpha", {"alpha": 0.3}),
    ("alpha", {"alpha": 0.5}),
    ("alpha", {"alpha": 0.7}),
]
IDS = [n + "".join(f"-{v}" for v in kw.values()) for n, kw in ALL]


def t64(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def loss_of(lw, ll, div, beta=0.1, eps=0.0):
    """Loss at log-ratios ℓ_w = lw, ℓ_l = ll (reference log-probs 0), fp64."""
    losses, _ = fdpo_loss(t64(lw), t64(ll), t64(0.0), t64(0.0), beta=beta, divergence=div, label_smoothing=eps)
    return losses.item()


# --------------------------------------------------------------------------------------------- METHODS vectors
@pytest.mark.parametrize(
    ("name", "kw", "expected"),
    [
        ("reverse_kl", {}, 0.5981388693815918),
        ("forward_kl", {}, 0.5825167134595296),
        ("js", {}, 0.6443966600735709),
        ("js_divergence", {}, 0.6443966600735709),
        ("alpha", {"alpha": 0.5}, 0.5943491229720279),
        ("alpha", {"alpha": 0.3}, 0.5967834048737661),
        ("alpha_divergence", {"alpha": 0.7}, 0.5906385539173805),
    ],
)
def test_methods_test_vectors(name, kw, expected):
    assert loss_of(1.0, -1.0, get_divergence(name, **kw)) == pytest.approx(expected, abs=1e-12)
    # the fp32 path is within fp32 rounding
    div = get_divergence(name, **kw)
    losses, _ = fdpo_loss(torch.tensor([1.0]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1), beta=0.1, divergence=div)
    assert losses.dtype == torch.float32
    assert losses.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("name", "kw"), ALL, ids=IDS)
def test_identity_gives_log2(name, kw):
    assert loss_of(0.0, 0.0, get_divergence(name, **kw)) == pytest.approx(LOG2, abs=1e-15)
    # and only the log-ratio matters, not the log-probs themselves
    div = get_divergence(name, **kw)
    losses, _ = fdpo_loss(t64(-37.5), t64(-12.25), t64(-37.5), t64(-12.25), beta=0.1, divergence=div)
    assert losses.item() == pytest.approx(LOG2, abs=1e-15)


def test_alpha_near_zero_is_reverse_kl_and_near_one_is_forward_kl():
    assert loss_of(1.0, -1.0, get_divergence("alpha", alpha=1e-6)) == pytest.approx(0.5981388693815918, abs=1e-4)
    # TRL <= 0.28 default coef 1.0 (paper formula) is forward KL
    assert loss_of(1.0, -1.0, get_divergence("alpha", alpha=1 - 1e-6)) == pytest.approx(0.5825167134595296, abs=1e-4)


def test_dpo_gradient_at_identity_is_minus_beta_over_two():
    beta = 0.1
    pc, pr = t64(-5.0).requires_grad_(), t64(-8.0).requires_grad_()
    losses, _ = fdpo_loss(pc, pr, t64(-5.0), t64(-8.0), beta=beta, divergence="reverse_kl")
    losses.sum().backward()
    # Δ = ℓ_w − ℓ_l, so ∂L/∂Δ = ∂L/∂ℓ_w = −∂L/∂ℓ_l = −β/2
    assert pc.grad.item() == pytest.approx(-beta / 2, abs=1e-15)
    assert pr.grad.item() == pytest.approx(beta / 2, abs=1e-15)


@pytest.mark.parametrize("delta", [-30.0, -2.5, -0.1, 0.0, 0.7, 4.0, 55.0])
def test_dpo_antisymmetry(delta):
    beta = 0.1
    lhs = loss_of(delta, 0.0, "reverse_kl", beta) - loss_of(0.0, delta, "reverse_kl", beta)
    assert lhs == pytest.approx(-beta * delta, abs=1e-12)


@pytest.mark.parametrize(("name", "kw"), ALL, ids=IDS)
def test_fdpo_antisymmetry_in_the_margin(name, kw):
    # Swapping chosen and rejected negates the margin z, and L(z) − L(−z) = −z for the logistic loss.
    g = torch.Generator().manual_seed(0)
    lw = torch.randn(16, generator=g, dtype=torch.float64) * 3
    ll = torch.randn(16, generator=g, dtype=torch.float64) * 3
    div = get_divergence(name, **kw)
    zero = torch.zeros(16, dtype=torch.float64)
    a, ma = fdpo_loss(lw, ll, zero, zero, beta=0.3, divergence=div)
    b, mb = fdpo_loss(ll, lw, zero, zero, beta=0.3, divergence=div)
    torch.testing.assert_close(mb["rewards/margins"], -ma["rewards/margins"])
    torch.testing.assert_close((a - b).float(), -ma["rewards/margins"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.45])
@pytest.mark.parametrize(("name", "kw"), ALL[:3], ids=IDS[:3])
def test_label_smoothing_formula(name, kw, eps):
    div = get_divergence(name, **kw)
    beta = 0.1
    for lw, ll in [(1.0, -1.0), (-3.0, 2.0), (0.0, 0.0), (20.0, -4.0)]:
        z = beta * (div.score_from_log(t64(lw)) - div.score_from_log(t64(ll))).item()
        expected = -(1 - eps) * math.log(1 / (1 + math.exp(-z))) - eps * math.log(1 / (1 + math.exp(z)))
        got = loss_of(lw, ll, div, beta, eps)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
        # equivalently L_ε(z) = L_0(z) + ε z
        assert got == pytest.approx(loss_of(lw, ll, div, beta) + eps * z, rel=1e-12, abs=1e-12)
    assert loss_of(1.0, -1.0, div, beta, 0.1) != loss_of(1.0, -1.0, div, beta, 0.0)


def test_reverse_kl_is_dpo_written_out_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(64, generator=g) * 40 - 100 for _ in range(4))
    beta = 0.25
    ours, metrics = fdpo_loss(pc, pr, rc, rr, beta=beta, divergence="reverse_kl")
    by_hand = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    assert torch.equal(ours, by_hand)
    assert torch.equal(metrics["rewards/chosen"], beta * (pc - rc))
    assert torch.equal(metrics["rewards/rejected"], beta * (pr - rr))


@pytest.mark.parametrize(("name", "kw"), ALL, ids=IDS)
def test_metrics(name, kw):
    g = torch.Generator().manual_seed(2)
    pc, pr = torch.randn(8, generator=g) * 5, torch.randn(8, generator=g) * 5
    pc.requires_grad_(True)
    zero = torch.zeros(8)
    beta = 0.2
    div = get_divergence(name, **kw)
    losses, m = fdpo_loss(pc, pr, zero, zero, beta=beta, divergence=div)
    assert losses.shape == (8,) and losses.dtype == torch.float32 and losses.requires_grad
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert m[key].shape == (8,) and m[key].dtype == torch.float32 and not m[key].requires_grad
    # implicit reward of f-DPO: β·(f'(u) − f'(1)); margins = loss logit; accuracy = margin > 0
    torch.testing.assert_close(m["rewards/chosen"], beta * div.score_from_log(pc.detach()))
    torch.testing.assert_close(m["rewards/margins"], m["rewards/chosen"] - m["rewards/rejected"])
    torch.testing.assert_close(losses.detach(), -F.logsigmoid(m["rewards/margins"]))
    assert torch.equal(m["rewards/accuracies"], (m["rewards/margins"] > 0).float())
    assert 0 < m["rewards/accuracies"].sum() < 8  # the random batch has both outcomes
    torch.testing.assert_close(m["logratios/chosen"], pc.detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("name", "kw"), ALL, ids=IDS)
def test_finite_losses_and_grads_for_huge_log_ratios(name, kw, dtype):
    grid = [-100.0, -50.0, 0.0, 50.0, 100.0]
    pairs = list(itertools.product(grid, grid)) + [(lw, -1000.0) for lw in grid] + [(-1000.0, -1000.0)]
    lw = torch.tensor([p[0] for p in pairs], dtype=dtype, requires_grad=True)
    ll = torch.tensor([p[1] for p in pairs], dtype=dtype, requires_grad=True)
    zero = torch.zeros(len(pairs), dtype=dtype)
    for beta in (0.1, 1.0):
        lw.grad = ll.grad = None
        losses, m = fdpo_loss(lw, ll, zero, zero, beta=beta, divergence=get_divergence(name, **kw))
        assert torch.isfinite(losses).all(), losses
        assert all(torch.isfinite(v).all() for v in m.values())
        losses.sum().backward()
        assert lw.grad.dtype == dtype
        assert torch.isfinite(lw.grad).all() and torch.isfinite(ll.grad).all()
    if name in ("forward_kl", "alpha"):
        # past the exp cap the gradient is exactly zero (ℓ_l = −1000)
        assert (ll.grad[len(grid) ** 2 :] == 0).all()


# ------------------------------------------------------------------------------------------------ vs TRL 1.16
@pytest.fixture(scope="module")
def trl_compute_loss():
    """Run TRL's real `DPOTrainer._compute_loss` on sequence log-probs we control.

    The trainer is built with `object.__new__` and only the attributes `_compute_loss` reads; the fake model
    returns per-token log-probs `[2B, 1]` (one completion token per sequence, so the sequence sum is the value we
    set), reference log-probs come precomputed in the inputs, and the accelerator is a single-process stub.
    Returns `f(pc, pr, rc, rr, beta, f_divergence_type, coef, loss_types, loss_weights, label_smoothing) -> loss`
    (TRL returns the batch mean) with the policy log-probs receiving the gradient.
    """
    trl = pytest.importorskip("trl")
    from trl import DPOTrainer

    class Accelerator:
        device = torch.device("cpu")
        is_main_process = True

        def gather_for_metrics(self, x):
            return x

        gather = gather_for_metrics

        def autocast(self):
            return contextlib.nullcontext()

    class Model:
        training = True

        def __init__(self, log_probs):
            self.log_probs = log_probs

        def __call__(self, **kw):
            n, t = kw["input_ids"].shape
            zeros = torch.zeros(n, t - 1)
            return types.SimpleNamespace(
                log_probs=self.log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
            )

    def run(pc, pr, rc, rr, *, beta, ftype, coef=0.5, loss_types=("sigmoid",), loss_weights=None, label_smoothing=0.0):
        b = pc.shape[0]
        model = Model(torch.cat([pc, pr]).unsqueeze(1))
        trainer = object.__new__(DPOTrainer)
        trainer.__dict__.update(
            model=model,
            accelerator=Accelerator(),
            aux_loss_enabled=False,
            ld_alpha=None,
            precompute_ref_logps=True,
            f_divergence_type=ftype,
            f_alpha_divergence_coef=coef,
            loss_types=list(loss_types),
            loss_weights=list(loss_weights or [1.0] * len(loss_types)),
            beta=beta,
            label_smoothing=label_smoothing,
            use_weighting=False,
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
            _total_train_tokens=0,
            _tp_size=1,
        )
        inputs = {
            "input_ids": torch.zeros(2 * b, 2, dtype=torch.long),
            "attention_mask": torch.ones(2 * b, 2, dtype=torch.long),
            "completion_mask": torch.tensor([[0, 1]] * (2 * b)),
            "ref_chosen_logps": rc,
            "ref_rejected_logps": rr,
        }
        return trainer._compute_loss(model, inputs, False), trainer._metrics["train"]

    assert trl.__version__.split(".")[0] >= "1"
    return run


def _batch(seed, b=12, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, generator=g) * scale - 20 for _ in range(4)]


TRL_PAIRS = [
    ("reverse_kl", {}, "reverse_kl", 0.5),
    ("forward_kl", {}, "forward_kl", 0.5),
    ("js", {}, "js_divergence", 0.5),
    ("alpha", {"alpha": 0.5}, "alpha_divergence", 0.5),
    ("alpha", {"alpha": 0.3}, "alpha_divergence", 0.7),
    ("alpha", {"alpha": 0.8}, "alpha_divergence", 0.2),
]


@pytest.mark.parametrize("beta", [0.1, 0.7])
@pytest.mark.parametrize(("name", "kw", "ftype", "coef"), TRL_PAIRS, ids=[p[2] + f"-{p[3]}" for p in TRL_PAIRS])
def test_matches_trl_loss_and_gradients(trl_compute_loss, name, kw, ftype, coef, beta):
    pc, pr, rc, rr = _batch(3)
    pc_t, pr_t = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    trl_loss, trl_metrics = trl_compute_loss(pc_t, pr_t, rc, rr, beta=beta, ftype=ftype, coef=coef)
    trl_loss.backward()

    pc_o, pr_o = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    losses, m = fdpo_loss(pc_o, pr_o, rc, rr, beta=beta, divergence=get_divergence(name, **kw))
    losses.mean().backward()

    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-6, atol=1e-7)
    # the gradient of the batch mean w.r.t. each example's log-probs checks every per-example loss
    torch.testing.assert_close(pc_o.grad, pc_t.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(pr_o.grad, pr_t.grad, rtol=1e-5, atol=1e-8)
    # TRL logs β·ℓ as rewards whatever the divergence; we log β·(f'(u) − f'(1)). Equal for reverse KL.
    assert trl_metrics["rewards/chosen"][0] == pytest.approx((beta * m["logratios/chosen"]).mean().item(), rel=1e-6)
    if name == "reverse_kl":
        assert trl_metrics["rewards/margins"][0] == pytest.approx(m["rewards/margins"].mean().item(), rel=1e-6)


def test_trl_coef_bridge_test_vector(trl_compute_loss):
    # TRL >= 0.29 coef c = 0.7 is paper α = 0.3 (METHODS §4 test 3)
    one, zero = torch.ones(1), torch.zeros(1)
    trl_loss, _ = trl_compute_loss(one, -one, zero, zero, beta=0.1, ftype="alpha_divergence", coef=0.7)
    assert trl_loss.item() == pytest.approx(0.5967834048737661, rel=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.3])
@pytest.mark.parametrize(("name", "kw", "ftype", "coef"), TRL_PAIRS[:4], ids=[p[2] for p in TRL_PAIRS[:4]])
def test_label_smoothing_matches_trl_combination(trl_compute_loss, name, kw, ftype, coef, eps):
    # TRL 1.16's `sigmoid` ignores label_smoothing. Its `robust` loss is
    #   [−(1−ε) log σ(z) + ε log σ(−z)] / (1 − 2ε),
    # so 2(1−ε)·sigmoid − (1−2ε)·robust = −(1−ε) log σ(z) − ε log σ(−z), the cDPO loss we implement.
    pc, pr, rc, rr = _batch(4)
    trl_loss, _ = trl_compute_loss(
        pc, pr, rc, rr, beta=0.2, ftype=ftype, coef=coef, loss_types=("sigmoid", "robust"),
        loss_weights=(2 * (1 - eps), -(1 - 2 * eps)), label_smoothing=eps,
    )
    losses, _ = fdpo_loss(pc, pr, rc, rr, beta=0.2, divergence=get_divergence(name, **kw), label_smoothing=eps)
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- objective wrapper
def _pair_logps(seed, b=5, tc=7, tr=9):
    g = torch.Generator().manual_seed(seed)
    chosen_mask = torch.arange(tc) < torch.randint(1, tc + 1, (b, 1), generator=g)
    rejected_mask = torch.arange(tr) < torch.randint(1, tr + 1, (b, 1), generator=g)
    chosen = torch.where(chosen_mask, -torch.rand(b, tc, generator=g) * 3, torch.zeros(()))
    rejected = torch.where(rejected_mask, -torch.rand(b, tr, generator=g) * 3, torch.zeros(()))
    return PairLogps(chosen, chosen_mask, rejected, rejected_mask)


def test_objective_equals_pure_function():
    pol, ref = _pair_logps(0), _pair_logps(1)
    ref = PairLogps(ref.chosen * pol.chosen_mask, pol.chosen_mask, ref.rejected * pol.rejected_mask, pol.rejected_mask)
    obj = get_objective("fdpo", divergence="js", beta=0.3, label_smoothing=0.1)
    losses, metrics = obj(pol, ref)
    expected, exp_m = fdpo_loss(
        pol.chosen_sum(), pol.rejected_sum(), ref.chosen_sum(), ref.rejected_sum(),
        beta=0.3, divergence="js", label_smoothing=0.1,
    )
    assert torch.equal(losses, expected)
    assert metrics.keys() == exp_m.keys()
    assert obj.state_dict() == {}
    obj.load_state_dict({})


def test_dpo_alias_and_defaults():
    obj = get_objective("dpo")
    assert isinstance(obj, FDPO) and OBJECTIVES["dpo"] is OBJECTIVES["fdpo"] is FDPO
    assert obj.params.beta == 0.1 and obj.params.divergence == "reverse_kl" and obj.params.label_smoothing == 0.0
    assert get_objective("fdpo", divergence="alpha").divergence.alpha == 0.5
    assert get_objective("fdpo", divergence="alpha_divergence", alpha=0.25).divergence.alpha == 0.25
    assert build_objective({"name": "fdpo", "divergence": "jsd", "beta": 1}).params.beta == 1.0


def test_every_params_field_is_documented():
    assert {"fdpo", "sampo"} <= set(OBJECTIVES)
    for cls in set(OBJECTIVES.values()):
        assert dataclasses.is_dataclass(cls.Params)
        for f in dataclasses.fields(cls.Params):
            assert len(f.metadata.get("help", "")) > 20, (cls.name, f.name)
            assert f.default is not dataclasses.MISSING, (cls.name, f.name)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"beta": 0}, "beta must be > 0"),
        ({"beta": -0.1}, "beta must be > 0"),
        ({"beta": float("inf")}, "beta must be finite"),
        ({"beta": "0.1"}, "beta must be a number"),
        ({"label_smoothing": 0.5}, "label_smoothing must be < 0.5"),
        ({"label_smoothing": -0.1}, "label_smoothing must be >= 0"),
        ({"divergence": "tv"}, "does not admit the f-DPO closed form"),
        ({"divergence": "chi2"}, "does not admit the f-DPO closed form"),
        ({"divergence": "kl_forward"}, "unknown divergence 'kl_forward'; known: alpha"),
        ({"divergence": "js", "alpha": 0.3}, "alpha is only used with divergence 'alpha'"),
        ({"divergence": "alpha", "alpha": 1.5}, r"alpha must be in \(0, 1\), got 1.5"),
        ({"betta": 0.1}, "unknown parameter 'betta' for objective 'fdpo'"),
    ],
)
def test_config_errors(params, needle):
    with pytest.raises(ConfigError, match=needle):
        get_objective("fdpo", **params)


def test_unknown_objective_lists_known():
    with pytest.raises(ConfigError, match="unknown objective 'ipo'; known: .*fdpo.*sampo"):
        get_objective("ipo")
    with pytest.raises(ConfigError, match="needs a 'name'"):
        build_objective({"beta": 0.1})


def test_register_objective_decorator_forms():
    saved = dict(OBJECTIVES)
    try:

        @register_objective("toy_obj", "toy_alias")
        class Toy(Objective):
            @dataclasses.dataclass
            class Params:
                scale: float = dataclasses.field(default=2.0, metadata={"help": "a scale for testing only"})

            def __call__(self, policy, reference):
                return policy.chosen_sum() * 0, {}

        assert OBJECTIVES["toy_alias"] is Toy and Toy.name == "toy_obj"
        assert get_objective("toy_obj", scale=3.0).params.scale == 3.0
        with pytest.raises(ValueError, match="already registered"):

            @register_objective
            class Clash(Objective):
                name = "fdpo"
    finally:
        OBJECTIVES.clear()
        OBJECTIVES.update(saved)
