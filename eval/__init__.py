"""Offline evaluation: best-of-n sampling and its KL estimates.

- `eval.best_of_n`: the unbiased best-of-n estimator from N samples per prompt (METHODS §8).
- `eval.kl`: KL(best-of-n ‖ base): the bound log n − (n−1)/n and Beirami et al.'s estimator (METHODS §7).
- `eval.bon`: the offline best-of-n study (`align bon --config configs/bon/X.yaml`): sample, score with a reward
  ensemble under several aggregations (and a gold scorer), curves of reward against KL.
"""

from eval.best_of_n import (
    bon_log_weights,
    bon_ns,
    bon_weights,
    expected_best_of_n,
    expected_best_of_n_by,
)
from eval.bon import BonConfig, BonPrompts, load_bon_config, run_bon
from eval.kl import bon_kl_bound, bon_kl_estimate, exact_bon_kl, exact_bon_pmf

__all__ = ["BonConfig", "BonPrompts", "bon_kl_bound", "bon_kl_estimate", "bon_log_weights", "bon_ns", "bon_weights",
           "exact_bon_kl", "exact_bon_pmf", "expected_best_of_n", "expected_best_of_n_by", "load_bon_config",
           "run_bon"]
