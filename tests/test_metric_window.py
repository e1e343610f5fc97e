"""`align.metric_window.MetricWindow`: the logging window both trainers average their per-example metrics over."""

import pytest
import torch

from align.metric_window import MetricWindow


def test_window_means_are_over_examples_of_every_rank_and_reset_on_flush():
    window = MetricWindow()
    assert not window
    window.add({"loss": torch.tensor([1.0, 2.0, 3.0]), "acc": torch.tensor([[1.0], [0.0], [1.0]])})
    window.add({"loss": torch.tensor([10.0])})  # a short last batch weighs what it holds: no mean of means
    assert window
    assert window.flush("eval_") == {"eval_loss": pytest.approx(4.0), "eval_acc": pytest.approx(2 / 3)}
    assert not window and window.flush() == {}
    # a second rank's values arrive through the trainer's gather
    window.add({"loss": torch.tensor([1.0, 3.0])}, gather=lambda t: torch.cat([t, torch.tensor([5.0])]))
    assert window.flush() == {"loss": pytest.approx(3.0)}
