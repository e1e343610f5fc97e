"""A reward-model ensemble as the core's reward interface (`align.rewards.RewardFunction`)."""

from __future__ import annotations

from collections.abc import Sequence

from align.data import finish_completion_ids, truncate_left
from align.errors import AlignError
from align.rewards import RewardFunction, RewardScores
from reward_models.ensemble import RewardEnsemble


class EnsembleReward(RewardFunction):
    """Scores with a `RewardEnsemble` and optimises its aggregate under `aggregation`.

    Args:
        ensemble: a loaded ensemble (`RewardEnsemble.load(DIR)`).
        aggregation: `{"method": "mean" | "wco" | "uwo", **params}`; None keeps the ensemble's own (its manifest's).
        batch_size: rows per scoring forward.
        max_length: keep the last `max_length` tokens of longer prompt + completion rows; None: the ensemble's own
            (`ensemble.max_length`, the length it was trained on, from its manifest; None there: no truncation).
    """

    def __init__(self, ensemble: RewardEnsemble, aggregation: dict | None = None, *, batch_size: int = 64,
                 max_length: int | None = None, policy_tokenizer=None):
        if aggregation is not None:
            ensemble.set_aggregation(aggregation)  # validated against K: wco/uwo need K >= 2
        self.ensemble, self.batch_size = ensemble, batch_size
        self.max_length = max_length if max_length is not None else ensemble.max_length
        #: True when the policy's token ids mean the same to the ensemble: samples are then scored as ids.
        self.shares_tokenizer = policy_tokenizer is not None and same_tokenizer(policy_tokenizer, ensemble.tokenizer)
        self.name = f"ensemble:{ensemble.aggregation['method']}"
        self.member_names = [f"member_{k}" for k in range(ensemble.num_members)]

    def score_tokens(self, prompt_ids, completion_ids, prompts, completions) -> RewardScores:
        if not self.shares_tokenizer:
            return self(prompts, completions)
        # The rows `align.data.tokenize_pairs` makes from text: a completion cut by max_new_tokens is scored at an
        # appended EOS, and a longer row keeps its last tokens.
        tokenizer = self.ensemble.tokenizer
        rows = [list(p) + finish_completion_ids(list(c), tokenizer) for p, c in zip(prompt_ids, completion_ids)]
        rows, _ = truncate_left(rows, self.max_length)
        members, reward = self.ensemble.score_ids(rows, batch_size=self.batch_size)
        return RewardScores(members=members, reward=reward)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> RewardScores:
        members, reward = self.ensemble.score(list(prompts), list(completions), batch_size=self.batch_size,
                                              max_length=self.max_length)
        return RewardScores(members=members, reward=reward)


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map every token to the same id and share BOS, EOS and PAD."""
    return (a.get_vocab() == b.get_vocab()
            and all(getattr(a, f"{t}_token_id") == getattr(b, f"{t}_token_id") for t in ("bos", "eos", "pad")))


def _unknown_rows(tokenizer, texts: list[str]) -> list[bool]:
    unk = tokenizer.unk_token_id
    if unk is None:
        return [False] * len(texts)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [unk in row for row in ids]


def check_tokenizers(base_tokenizer, ensemble_tokenizer, texts: list[str], *, what: str, ensemble_dir: str) -> None:
    """Refuses texts the ensemble's tokenizer maps to its unknown token where the base's tokenizer does not."""
    base_unk = _unknown_rows(base_tokenizer, texts)
    ens_unk = _unknown_rows(ensemble_tokenizer, texts)
    bad = [i for i, (b, e) in enumerate(zip(base_unk, ens_unk)) if e and not b]
    if bad:
        example = texts[bad[0]][:80]
        raise AlignError(f"ensemble '{ensemble_dir}': its tokenizer does not match the base policy's: {len(bad)} of "
                         f"{len(texts)} {what} contain words it maps to its unknown token "
                         f"{ensemble_tokenizer.unk_token!r} (e.g. {example!r}); the rewards would be read from unknown tokens. Use an ensemble "
                         f"trained on text of this policy's vocabulary (align rm train with this base's tokenizer)")
