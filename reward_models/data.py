"""Preference pairs for reward-model training: the formats `align train` reads → token rows for a scalar head.

Loading and validation are `align.data`'s (`load_rows`, `validate_preference_rows`): the same TRL preference formats
(explicit or implicit prompt, text or conversational), and every bad row is one `DataError` naming the file, the
1-based row and the field; missing, null, empty and whitespace-only prompts and responses are refused.

Tokens are the scoring path's (`align.data.tokenize_pairs`, the policy's rules), so that a reward model is trained on
exactly the ids `RewardEnsemble.score` and `align rm score` later feed it: each pair gives two rows,
`prompt + chosen` and `prompt + rejected`, with EOS appended to the response (the reward is read at the last token).

Length policy (`data.max_length` bounds one row, prompt + response; `data.max_prompt_length` is not used and must
be null, see `RMConfig`):
- `truncate`: a longer row keeps its LAST `max_length` tokens (`align.data.truncate_left`: the end of the response,
  where the reward is read, matters most; the prompt loses its beginning);
- `drop`: a pair with either row longer than `max_length` is left out.
Counts go into an `align.data.LengthReport` (chosen/rejected truncated, pairs dropped), logged on `align.data`.

Label noise (METHODS §8; Coste et al. train proxies on labels with 25% noise): `inject_label_noise` picks exactly
round(fraction·N) pairs with a seeded generator and `RewardPairs.flip` swaps their chosen and rejected.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch

from align.data import (
    DataConfig,
    LengthReport,
    load_config_rows,
    tokenize_pairs,
    truncate_left,
    validate_preference_rows,
)
from align.errors import ConfigError, DataError
from reward_models.modeling import pad_right

logger = logging.getLogger("align.data")


@dataclass
class RewardPairs(torch.utils.data.Dataset):
    """Tokenized preference pairs for a reward model.

    `chosen_input_ids[i]` / `rejected_input_ids[i]`: token ids of prompt + response (unpadded lists);
    `prompts`, `chosen`, `rejected`: the validated rows (text or chat messages), kept for normalisation reference
    sets and reports; `flipped`: the indices whose chosen and rejected were swapped by `flip` (label noise).
    Items: `{"chosen_input_ids": list[int], "rejected_input_ids": list[int]}`.
    """

    chosen_input_ids: list[list[int]]
    rejected_input_ids: list[list[int]]
    prompts: list
    chosen: list
    rejected: list
    flipped: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.chosen_input_ids)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"chosen_input_ids": self.chosen_input_ids[index], "rejected_input_ids": self.rejected_input_ids[index]}

    def flip(self, indices) -> None:
        """Swaps chosen and rejected (ids and rows) of the pairs `indices`, in place; records them in `flipped`."""
        indices = sorted({int(i) for i in indices})
        if indices and not 0 <= indices[0] <= indices[-1] < len(self):
            raise IndexError(f"flip: indices must be in [0, {len(self)}), got {indices[0]}..{indices[-1]}")
        for i in indices:
            self.chosen_input_ids[i], self.rejected_input_ids[i] = self.rejected_input_ids[i], self.chosen_input_ids[i]
            self.chosen[i], self.rejected[i] = self.rejected[i], self.chosen[i]
        self.flipped = tuple(sorted(set(self.flipped) ^ set(indices)))  # flipping twice restores a pair


def inject_label_noise(n_pairs: int, fraction: float, seed: int) -> list[int]:
    """The pairs whose label is flipped: exactly round(fraction·n_pairs) distinct indices (halves round up), drawn
    uniformly without replacement by `random.Random(seed)` → sorted list. Same arguments, same indices."""
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 0:
        raise ValueError(f"n_pairs must be a non-negative integer, got {n_pairs!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    count = math.floor(fraction * n_pairs + 0.5)
    return sorted(random.Random(seed).sample(range(n_pairs), count))


def tokenize_reward_pairs(rows, tokenizer, *, source: str = "<rows>", max_length: int | None = 1024,
                          length_policy: str = "truncate") -> tuple[RewardPairs, LengthReport]:
    """Validates preference rows (a `datasets.Dataset` or a list of dicts) and tokenizes them as reward-model rows
    (module docstring) → (RewardPairs, LengthReport). `source` names the rows in errors and the report."""
    if length_policy not in ("truncate", "drop"):
        raise ConfigError(f"data.length_policy: must be one of truncate, drop, got {length_policy!r}")
    checked, _ = validate_preference_rows(rows, source=source)
    prompts = [r["prompt"] for r in checked]
    chosen = [r["chosen"] for r in checked]
    rejected = [r["rejected"] for r in checked]
    # Untruncated here so that the length policy can count (and `drop` can see) what is over.
    chosen_ids = tokenize_pairs(tokenizer, prompts, chosen, None, source=source)
    rejected_ids = tokenize_pairs(tokenizer, prompts, rejected, None, source=source)

    report = LengthReport(source=source, rows=len(checked), kept=0)
    if length_policy == "drop":
        def fits(ids):
            return max_length is None or len(ids) <= max_length

        keep = [i for i, (c, r) in enumerate(zip(chosen_ids, rejected_ids, strict=True)) if fits(c) and fits(r)]
        report.dropped = len(checked) - len(keep)
    else:
        chosen_ids, report.chosen_truncated = truncate_left(chosen_ids, max_length)
        rejected_ids, report.rejected_truncated = truncate_left(rejected_ids, max_length)
        keep = list(range(len(checked)))
    report.kept = len(keep)
    logger.log(logging.WARNING if report.changed else logging.INFO, "%s", report.summary())
    if not keep:
        raise DataError(source, None, None, f"all {report.rows} pairs were dropped by length_policy 'drop' "
                                            f"(max_length={max_length}); raise data.max_length or use "
                                            f"length_policy: truncate")
    pairs = RewardPairs(chosen_input_ids=[chosen_ids[i] for i in keep],
                        rejected_input_ids=[rejected_ids[i] for i in keep],
                        prompts=[prompts[i] for i in keep], chosen=[chosen[i] for i in keep],
                        rejected=[rejected[i] for i in keep])
    return pairs, report


def build_reward_dataset(config: DataConfig, tokenizer, which: str = "train") -> tuple[RewardPairs, LengthReport]:
    """Loads and tokenizes the `which` ("train" or "eval") data of `config` (errors name file, row and field)."""
    rows, name = load_config_rows(config, which)
    return tokenize_reward_pairs(rows, tokenizer, source=name, max_length=config.max_length,
                                 length_policy=config.length_policy)


class RewardCollator:
    """Batches pairs into one right-padded block of rows: chosen rows first, then rejected.

    B items `{"chosen_input_ids", "rejected_input_ids"}` → `{"input_ids": [2B, T], "attention_mask": [2B, T]}`
    (long); row i is pair i's chosen, row B + i its rejected, T the longest of the 2B rows. One forward then scores
    both responses of every pair.
    """

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ValueError("RewardCollator needs a pad token id")
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        input_ids, attention_mask = pad_right(rows, self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}
