"""SamPO down-sampling and loss (METHODS.md §6)."""

import math
import types

import pytest
import torch

from align.divergences import get_divergence
from align.errors import ConfigError
from align.logps import PairLogps
from align.objectives import SamPO, build_objective, fdpo_loss, get_objective, sampo_downsample_masks, sampo_loss

ALL = [("reverse_kl", {}), ("forward_kl", {}), ("js", {}), ("alpha", {"alpha": 0.4})]
IDS = [n for n, _ in ALL]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def masks(lengths_c, lengths_r, tc=12, tr=14, left_pad=False):
    """Completion masks with the given lengths (right padding, or left padding when `left_pad`)."""
    lc, lr = torch.tensor(lengths_c).unsqueeze(1), torch.tensor(lengths_r).unsqueeze(1)
    if left_pad:
        return torch.arange(tc) >= tc - lc, torch.arange(tr) >= tr - lr
    return torch.arange(tc) < lc, torch.arange(tr) < lr


def token_logps(mask, seed):
    """Distinct negative per-token log-probs, 0 on padding (like PairLogps)."""
    return torch.where(mask, -torch.rand(mask.shape, generator=gen(seed)) * 4 - 0.01, torch.zeros(()))


LC, LR = [3, 12, 7, 5, 1, 0, 9, 4], [10, 2, 7, 14, 1, 6, 0, 4]


@pytest.mark.parametrize("left_pad", [False, True])
def test_downsample_counts(left_pad):
    cm, rm = masks(LC, LR, left_pad=left_pad)
    for seed in range(5):
        sc, sr = sampo_downsample_masks(cm, rm, gen(seed))
        assert sc.dtype == torch.bool and sc.shape == cm.shape and sr.shape == rm.shape
        assert not (sc & ~cm).any() and not (sr & ~rm).any()  # subsets of the completion masks
        t_m = torch.minimum(cm.sum(-1), rm.sum(-1))
        assert torch.equal(sc.sum(-1), t_m) and torch.equal(sr.sum(-1), t_m)
        for b in range(len(LC)):
            if LC[b] <= LR[b]:
                assert torch.equal(sc[b], cm[b])  # the shorter (or equal) keeps every token
            if LR[b] <= LC[b]:
                assert torch.equal(sr[b], rm[b])
    # the longer response really is sub-sampled at random: two seeds give different subsets
    a, _ = sampo_downsample_masks(cm, rm, gen(0))
    b, _ = sampo_downsample_masks(cm, rm, gen(1))
    assert not torch.equal(a, b)


def test_downsample_accepts_int_masks_and_rejects_non_cpu_generator():
    cm, rm = masks(LC, LR)
    a = sampo_downsample_masks(cm.long(), rm.long(), gen(3))
    b = sampo_downsample_masks(cm, rm, gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    cuda_like = types.SimpleNamespace(device=torch.device("cuda", 0))  # no GPU here; the guard reads .device only
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        sampo_downsample_masks(cm, rm, cuda_like)


def test_inclusion_is_uniform_and_sampled_sum_is_unbiased():
    # one pair repeated n times: T_w = 4, T_l = 10 -> each rejected position kept with probability 4/10, and
    # E[sampled sum] = (T_m / T_long) · full sum (sampling without replacement).
    n, t_long, t_m = 4000, 10, 4
    cm, rm = masks([t_m] * n, [t_long] * n, tc=t_m, tr=t_long)
    values = torch.linspace(-3.0, -0.1, t_long, dtype=torch.float64)
    _, sr = sampo_downsample_masks(cm, rm, gen(0))
    freq = sr.double().mean(0)
    p = t_m / t_long
    assert (freq - p).abs().max() < 5 * math.sqrt(p * (1 - p) / n)
    sums = (sr.double() * values).sum(-1)
    var = t_m * values.var(unbiased=False) * (t_long - t_m) / (t_long - 1)  # finite-population variance
    assert abs(sums.mean() - p * values.sum()) < 5 * math.sqrt(var / n)
    assert sums.std() > 0.1  # not a constant subset


def test_fixed_index_set_sum_and_loss():
    cm, rm = masks(LC, LR)
    pc, pr, rc, rr = token_logps(cm, 1), token_logps(rm, 2), token_logps(cm, 3), token_logps(rm, 4)
    sc, sr = sampo_downsample_masks(cm, rm, gen(7))  # the same draw sampo_loss will make with seed 7
    losses, m = sampo_loss(pc, pr, rc, rr, cm, rm, beta=0.1, divergence="reverse_kl", generator=gen(7))
    manual_c = torch.stack([pc[b][sc[b]].sum() for b in range(len(LC))])
    manual_r = torch.stack([pr[b][sr[b]].sum() for b in range(len(LC))])
    torch.testing.assert_close(m["logps/chosen"], manual_c)
    torch.testing.assert_close(m["logps/rejected"], manual_r)
    ref_c = torch.stack([rc[b][sc[b]].sum() for b in range(len(LC))])
    ref_r = torch.stack([rr[b][sr[b]].sum() for b in range(len(LC))])
    expected, _ = fdpo_loss(manual_c, manual_r, ref_c, ref_r, beta=0.1, divergence="reverse_kl")
    torch.testing.assert_close(losses, expected)
    t_m = torch.minimum(cm.sum(-1), rm.sum(-1)).float()
    valid = (cm.sum(-1) + rm.sum(-1)).float().clamp(min=1)
    torch.testing.assert_close(m["sampo/kept_fraction"], 2 * t_m / valid)


def test_unselected_tokens_get_zero_gradient():
    cm, rm = masks(LC, LR)
    pc, pr = token_logps(cm, 1).requires_grad_(), token_logps(rm, 2).requires_grad_()
    rc, rr = token_logps(cm, 3), token_logps(rm, 4)
    sc, sr = sampo_downsample_masks(cm, rm, gen(11))
    losses, _ = sampo_loss(pc, pr, rc, rr, cm, rm, beta=0.1, divergence="js", generator=gen(11))
    losses.sum().backward()
    assert torch.equal(pc.grad != 0, sc) and torch.equal(pr.grad != 0, sr)
    for b in range(len(LC)):  # every kept token of a row gets the same gradient dL/dℓ
        if sc[b].any():
            assert torch.allclose(pc.grad[b][sc[b]], pc.grad[b][sc[b]][0])
    # shorter response untouched: all of its tokens receive gradient
    shorter_c = torch.tensor(LC) <= torch.tensor(LR)
    assert torch.equal((pc.grad != 0)[shorter_c], cm[shorter_c])


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize(("name", "kw"), ALL, ids=IDS)
def test_equal_lengths_is_exactly_fdpo(name, kw, shared):
    lengths = [3, 12, 7, 1, 9]
    cm, rm = masks(lengths, lengths)
    pc, pr, rc, rr = token_logps(cm, 1), token_logps(rm, 2), token_logps(cm, 3), token_logps(rm, 4)
    div = get_divergence(name, **kw)
    losses, m = sampo_loss(pc, pr, rc, rr, cm, rm, beta=0.2, divergence=div, generator=gen(0), shared_indices=shared)
    sums = [(x * mk).sum(-1) for x, mk in ((pc, cm), (pr, rm), (rc, cm), (rr, rm))]
    expected, em = fdpo_loss(*sums, beta=0.2, divergence=div)
    assert torch.equal(losses, expected)
    assert torch.equal(m["rewards/margins"], em["rewards/margins"])
    assert torch.equal(m["sampo/kept_fraction"], torch.ones(len(lengths)))


@pytest.mark.parametrize(("name", "kw"), ALL, ids=IDS)
def test_every_divergence_seeds_and_finiteness(name, kw):
    cm, rm = masks(LC, LR)
    pc, pr, rc, rr = token_logps(cm, 1), token_logps(rm, 2), token_logps(cm, 3), token_logps(rm, 4)
    div = get_divergence(name, **kw)
    run = lambda s: sampo_loss(pc, pr, rc, rr, cm, rm, beta=0.1, divergence=div, generator=gen(s))[0]
    a, b, c = run(5), run(5), run(6)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)  # same seed -> identical
    lc, lr = torch.tensor(LC), torch.tensor(LR)
    random_rows = (lc != lr) & (torch.minimum(lc, lr) > 0)  # T_m = 0 keeps nothing: deterministic
    assert (a != c)[random_rows].all()  # different seed -> different loss wherever lengths differ
    assert torch.equal(a[~random_rows], c[~random_rows])
    torch.testing.assert_close(a[torch.minimum(lc, lr) == 0], torch.full((2,), math.log(2.0)))
    # huge per-token log-ratios in half precision stay finite
    for dtype in (torch.float16, torch.bfloat16):
        big_c = (pc * 30).to(dtype).requires_grad_()
        big_r = (pr * 30).to(dtype).requires_grad_()
        losses, _ = sampo_loss(
            big_c, big_r, rc.to(dtype), rr.to(dtype), cm, rm, beta=0.1, divergence=div, generator=gen(5)
        )
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(big_c.grad).all() and torch.isfinite(big_r.grad).all()


def test_shared_vs_independent_indices():
    cm, rm = masks(LC, LR)
    pc, pr = token_logps(cm, 1), token_logps(rm, 2)
    differs = torch.tensor(LC) != torch.tensor(LR)
    # policy == reference: shared subsets give ℓ = 0 exactly (loss log 2); independent subsets do not.
    shared, ms = sampo_loss(pc, pr, pc, pr, cm, rm, beta=0.1, divergence="reverse_kl", generator=gen(0))
    assert torch.equal(ms["logratios/chosen"], torch.zeros(len(LC)))
    torch.testing.assert_close(shared, torch.full((len(LC),), math.log(2.0)))
    indep, mi = sampo_loss(
        pc, pr, pc, pr, cm, rm, beta=0.1, divergence="reverse_kl", generator=gen(0), shared_indices=False
    )
    nonzero = (mi["logratios/chosen"] != 0) | (mi["logratios/rejected"] != 0)
    assert torch.equal(nonzero, differs & (torch.minimum(torch.tensor(LC), torch.tensor(LR)) > 0))
    # independent mode = policy uses the first draw, reference the second (the official repo's order)
    g = gen(0)
    p_sel = sampo_downsample_masks(cm, rm, g)
    r_sel = sampo_downsample_masks(cm, rm, g)
    rc, rr = token_logps(cm, 3), token_logps(rm, 4)
    losses, _ = sampo_loss(
        pc, pr, rc, rr, cm, rm, beta=0.1, divergence="reverse_kl", generator=gen(0), shared_indices=False
    )
    expected, _ = fdpo_loss(
        (pc * p_sel[0]).sum(-1), (pr * p_sel[1]).sum(-1), (rc * r_sel[0]).sum(-1), (rr * r_sel[1]).sum(-1),
        beta=0.1, divergence="reverse_kl",
    )
    torch.testing.assert_close(losses, expected)


def _pairs(seed):
    cm, rm = masks(LC, LR)
    pol = PairLogps(token_logps(cm, seed), cm, token_logps(rm, seed + 1), rm)
    ref = PairLogps(token_logps(cm, seed + 2), cm, token_logps(rm, seed + 3), rm)
    return pol, ref


def test_objective_seed_state_dict_and_resume():
    pol, ref = _pairs(0)
    obj = get_objective("sampo", seed=123, divergence="alpha", alpha=0.3, beta=0.2)
    assert isinstance(obj, SamPO)
    first, m = obj(pol, ref)
    keys = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "sampo/kept_fraction"}
    assert set(m) >= keys and all(m[k].shape == (len(LC),) for k in keys)
    state = obj.state_dict()
    second, _ = obj(pol, ref)
    assert not torch.equal(first, second)  # a fresh draw every call
    # same run seed -> same sequence of draws
    again = get_objective("sampo", seed=123, divergence="alpha", alpha=0.3, beta=0.2)
    assert torch.equal(again(pol, ref)[0], first)
    # a resumed objective (any seed) continues exactly from the saved state
    resumed = get_objective("sampo", seed=999, divergence="alpha", alpha=0.3, beta=0.2)
    resumed.load_state_dict(state)
    assert torch.equal(resumed(pol, ref)[0], second)
    with pytest.raises(ValueError, match="generator"):
        resumed.load_state_dict({})


def test_params_seed_overrides_run_seed():
    pol, ref = _pairs(0)
    a = build_objective({"name": "sampo", "seed": 5}, seed=1)
    b = get_objective("sampo", seed=5)
    c = get_objective("sampo", seed=1)
    assert torch.equal(a(pol, ref)[0], b(pol, ref)[0])
    assert not torch.equal(get_objective("sampo", seed=5)(pol, ref)[0], c(pol, ref)[0])


def test_objective_matches_pure_function_and_shared_flag():
    pol, ref = _pairs(10)
    for shared in (True, False):
        obj = build_objective({"name": "sampo", "shared_indices": shared, "divergence": "js"}, seed=3)
        losses, _ = obj(pol, ref)
        expected, _ = sampo_loss(
            pol.chosen, pol.rejected, ref.chosen, ref.rejected, pol.chosen_mask, pol.rejected_mask,
            beta=0.1, divergence="js", generator=gen(3), shared_indices=shared,
        )
        assert torch.equal(losses, expected)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"shared_indices": "yes"}, "shared_indices must be true or false"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"beta": 0}, "beta must be > 0"),
        ({"divergence": "tv"}, "does not admit"),
        ({"sample": True}, "unknown parameter 'sample' for objective 'sampo'"),
    ],
)
def test_sampo_config_errors(params, needle):
    with pytest.raises(ConfigError, match=needle):
        build_objective({"name": "sampo", **params})


def test_misaligned_reference_is_rejected():
    pol, _ = _pairs(0)
    short = PairLogps(pol.chosen[:, :5], pol.chosen_mask[:, :5], pol.rejected, pol.rejected_mask)
    with pytest.raises(ValueError, match="per-token reference"):
        get_objective("sampo")(pol, short)
