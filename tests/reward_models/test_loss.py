"""The Bradley–Terry loss (reward_models/loss.py) against hand computations (METHODS §8 test 4)."""

import math

import pytest
import torch

from reward_models.aggregate import aggregate
from reward_models.loss import bradley_terry_loss, pairwise_accuracy

LOG2 = math.log(2.0)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_hand_computed_losses():
    # −log σ(d) = log(1 + e^{−d}): d = +1 → 0.3132617, d = −1 → 1.3132617, d = 0 → log 2
    chosen = torch.tensor([[2.0, 0.0], [0.5, 3.0]])
    rejected = torch.tensor([[1.0, 0.0], [1.5, -1.0]])
    losses, _ = bradley_terry_loss(chosen, rejected)
    expected = torch.tensor([[softplus(-1.0), LOG2], [softplus(1.0), softplus(-4.0)]])
    assert losses.shape == (2, 2) and losses.dtype == torch.float32
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(losses[0, 0], torch.tensor(0.31326169), atol=1e-7, rtol=0)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_equal_rewards_give_log_2(k, label_smoothing):
    rewards = torch.randn(5, k)
    losses, metrics = bradley_terry_loss(rewards, rewards.clone(), label_smoothing=label_smoothing)
    torch.testing.assert_close(losses, torch.full((5, k), LOG2))
    assert torch.all(metrics["accuracy"] == 0.5)  # a tie is half right: a constant model is at chance


def test_margin_shifts_the_difference():
    chosen = torch.tensor([[2.0], [1.0], [0.0]])
    rejected = torch.tensor([[1.0], [1.0], [1.0]])
    losses, _ = bradley_terry_loss(chosen, rejected, margin=0.5)
    expected = torch.tensor([[softplus(-(1.0 - 0.5))], [softplus(0.5)], [softplus(1.5)]])
    torch.testing.assert_close(losses, expected)
    # a per-pair margin [B] applies to every member of its pair
    chosen2 = chosen.repeat(1, 2)
    losses2, _ = bradley_terry_loss(chosen2, rejected.repeat(1, 2), margin=torch.tensor([0.5, 0.0, 2.0]))
    expected2 = torch.tensor([softplus(-0.5), softplus(0.0), softplus(3.0)])[:, None].repeat(1, 2)
    torch.testing.assert_close(losses2, expected2)


def test_label_smoothing_formula():
    # −(1−ε)·log σ(z) − ε·log σ(−z), z = d − m
    eps, m = 0.1, 0.25
    chosen = torch.tensor([[3.0], [-1.0]])
    rejected = torch.tensor([[1.0], [0.5]])
    losses, _ = bradley_terry_loss(chosen, rejected, margin=m, label_smoothing=eps)
    for i, d in enumerate([2.0, -1.5]):
        z = d - m
        expected = (1 - eps) * softplus(-z) + eps * softplus(z)
        assert losses[i, 0].item() == pytest.approx(expected, rel=1e-6)


def test_stable_and_finite_gradients_for_huge_rewards():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        chosen = torch.tensor([[1e4, -3e4], [60000.0, 0.0]], dtype=dtype, requires_grad=True)
        rejected = torch.tensor([[-1e4, 3e4], [-60000.0, 0.0]], dtype=dtype, requires_grad=True)
        losses, _ = bradley_terry_loss(chosen, rejected, label_smoothing=0.1)
        assert torch.isfinite(losses).all(), dtype
        losses.sum().backward()
        assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all(), dtype
    # d = −6e4 in fp32: the loss is the difference itself, not inf
    losses, _ = bradley_terry_loss(torch.tensor([[-3e4]]), torch.tensor([[3e4]]))
    assert losses.item() == pytest.approx(6e4)


def test_gradient_matches_the_closed_form():
    # d/dr_w of −log σ(d) is −σ(−d) = σ(d) − 1; d/dr_l is the negative
    chosen = torch.tensor([[0.7]], requires_grad=True)
    rejected = torch.tensor([[-0.4]], requires_grad=True)
    losses, _ = bradley_terry_loss(chosen, rejected)
    losses.sum().backward()
    sig = 1.0 / (1.0 + math.exp(-1.1))
    assert chosen.grad.item() == pytest.approx(sig - 1.0, rel=1e-6)
    assert rejected.grad.item() == pytest.approx(1.0 - sig, rel=1e-6)


def test_members_are_independent_under_the_summed_loss():
    # The trainer sums the members' mean losses: member k's gradient is what it would get alone.
    chosen = torch.randn(6, 3, requires_grad=True)
    rejected = torch.randn(6, 3)
    losses, _ = bradley_terry_loss(chosen, rejected)
    losses.mean(dim=0).sum().backward()
    alone = chosen.detach()[:, 1:2].clone().requires_grad_(True)
    single, _ = bradley_terry_loss(alone, rejected[:, 1:2])
    single.mean().backward()
    torch.testing.assert_close(chosen.grad[:, 1:2], alone.grad)


def test_accuracy_metrics_per_member_and_of_the_aggregate():
    chosen = torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    rejected = torch.tensor([[1.0, 2.0, 1.0], [1.0, -1.0, 0.5]])
    _, metrics = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(metrics["accuracy"], torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(metrics["margin"], chosen - rejected)
    # mean of pair 0: 4/3 vs 4/3 → tie (½); pair 1: 0 vs 1/6 → wrong
    torch.testing.assert_close(metrics["ensemble_accuracy"], torch.tensor([0.5, 0.0]))
    # WCO: min(3, 0, 1) = 0 vs min(1, 2, 1) = 1 → wrong; min(0,0,0)=0 vs min(1,−1,0.5)=−1 → right
    _, wco = bradley_terry_loss(chosen, rejected, aggregate=lambda r: aggregate(r, "wco"))
    torch.testing.assert_close(wco["ensemble_accuracy"], torch.tensor([0.0, 1.0]))
    assert not any(v.requires_grad for v in metrics.values())


def test_pairwise_accuracy_ties_count_half():
    torch.testing.assert_close(pairwise_accuracy(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 1.0])),
                               torch.tensor([0.5, 0.0, 1.0]))


def test_bad_shapes_and_options_are_refused():
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        bradley_terry_loss(torch.zeros(3, 2), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="label_smoothing"):
        bradley_terry_loss(torch.zeros(3, 1), torch.zeros(3, 1), label_smoothing=0.5)
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(torch.zeros(3, 1), torch.zeros(3, 1), margin=torch.zeros(2))
