"""One logging-window helper for every trainer: per-example metrics averaged over the steps between two logs."""

from __future__ import annotations

from collections import defaultdict

import torch


class MetricWindow:
    """Running [sum, count] per metric since the last `flush`, over every process.

    Per-example values are gathered across processes before they are summed, so a logged mean is over all examples
    of the window on all ranks, and a short last batch weighs what it holds (no mean of means).
    """

    def __init__(self):
        self._totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])

    def add(self, values: dict[str, torch.Tensor], gather=lambda t: t) -> None:
        """Adds per-example values: `values[name]` is a tensor of any shape (one number per example).

        Args:
            gather: the trainer's cross-process gather (`accelerator.gather`); every rank must call `add` alike.
        """
        for name, value in values.items():
            value = gather(value.detach().float().reshape(-1).contiguous())
            total = self._totals[name]
            total[0] += value.sum().item()
            total[1] += value.numel()

    def flush(self, prefix: str = "") -> dict[str, float]:
        """The window's means as `{prefix + name: mean}` (NaN for a metric with no examples); starts a new window."""
        means = {prefix + name: total / count if count else float("nan")
                 for name, (total, count) in self._totals.items()}
        self._totals.clear()
        return means

    def __bool__(self) -> bool:
        return bool(self._totals)
