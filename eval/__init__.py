"""Offline evaluation: best-of-n sampling and its KL estimates (filled by the best-of-n issue)."""
