"""The reward interface of the core: what on-policy training and studies optimise, whatever computes it.

A `RewardFunction` scores B (prompt, completion) pairs and returns every member's score and the aggregate that is
optimised (`RewardScores`). The core knows rewards only through this interface; implementations:

- `CallableReward`: any Python function `fn(prompts, completions) -> [B] or [B, K]` (a user's `module:function`,
  loaded with `load_callable_reward`), validated on every call;
- `align.toy_world.gold_reward_function()`: the toy world's gold reward;
- `reward_models.reward.EnsembleReward`: a reward-model ensemble under mean / wco / uwo (built on the core; only the
  recipe layer wires it in, so nothing in `align/` imports `reward_models/`).
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from align.errors import AlignError, ConfigError


@dataclass
class RewardScores:
    """Rewards of B completions.

    Attributes:
        members: `[B, K]` fp32, each member's score (K = 1 for a single scorer).
        reward: `[B]` fp32, the aggregate that is optimised.
    """

    members: torch.Tensor
    reward: torch.Tensor


class RewardFunction(abc.ABC):
    """Scores completions. `name` names it in errors and logs; `member_names` names the K columns of `members`."""

    name: str = "reward"
    member_names: list[str] = ["reward"]

    @abc.abstractmethod
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> RewardScores:
        """Rewards of `completions[i]` as an answer to `prompts[i]` (B of each)."""

    def score_tokens(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                     prompts: Sequence, completions: Sequence[str]) -> RewardScores:
        """Rewards of sampled completions given as the sampler's token ids (and their texts). A reward that reads
        token ids of the policy's tokenizer (an ensemble sharing it) scores the ids, never re-tokenizing decoded
        text; the default scores the texts."""
        return self(prompts, completions)


class CallableReward(RewardFunction):
    """A plain function as a `RewardFunction`. Its output is checked on every call: B finite numbers (or `[B, K]`
    with K members, aggregated by their mean); anything else is an `AlignError` naming the function."""

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn = fn
        self.name = name or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
        self.member_names = [self.name]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> RewardScores:
        if len(prompts) != len(completions):
            raise AlignError(f"reward {self.name}: {len(prompts)} prompts but {len(completions)} completions")
        try:
            out = torch.as_tensor(self.fn(list(prompts), list(completions)), dtype=torch.float32).cpu()
        except (TypeError, ValueError, RuntimeError) as e:
            raise AlignError(f"reward {self.name}: returned something that is not numbers ({e})") from None
        B = len(completions)
        if out.dim() == 1 and out.shape[0] == B:
            out = out[:, None]
        if out.dim() != 2 or out.shape[0] != B or out.shape[1] < 1:
            raise AlignError(f"reward {self.name}: returned shape {tuple(out.shape)} for {B} completions; expected "
                             f"[{B}] or [{B}, K]")
        if not torch.isfinite(out).all():
            bad = int((~torch.isfinite(out)).any(dim=1).nonzero()[0])
            raise AlignError(f"reward {self.name}: returned a non-finite reward ({out[bad].tolist()}) for completion "
                             f"{bad} ({completions[bad]!r})")
        if out.shape[1] != len(self.member_names):
            self.member_names = [f"{self.name}[{k}]" for k in range(out.shape[1])] if out.shape[1] > 1 else [self.name]
        return RewardScores(members=out, reward=out.mean(dim=1))


def load_callable_reward(spec: str, key: str = "reward.callable") -> CallableReward:
    """`"package.module:function"` → a `CallableReward`; a `ConfigError` naming `key` when it cannot be imported."""
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}: expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import module {module_name!r} ({e})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"{key}: module {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ConfigError(f"{key}: {spec!r} is not callable")
    return CallableReward(fn, name=spec)


#: `reward.kind` values: the toy world's gold reward, a reward-model ensemble, or a user's function. The recipe layer
#: builds them (`align.recipes.train_on_policy.build_reward`); the core only sees `RewardFunction`s.
REWARD_KINDS = ("toy_world", "ensemble", "callable")


@dataclass
class RewardConfig:
    """The `reward:` section of an on-policy recipe: what r(y) the target is built from."""

    kind: str = field(metadata={"help": "toy_world (the toy world's gold reward), ensemble (a reward-model ensemble "
                                        "of `align rm train`) or callable (a `module:function`)."})
    ensemble: str | None = field(default=None, metadata={
        "help": "kind ensemble: the ensemble directory (`<output_dir>/ensemble` of `align rm train`)."})
    aggregation: dict | None = field(default=None, metadata={
        "help": "kind ensemble: {method: mean | wco | uwo, <params>} (Coste et al.; null: the ensemble's own)."})
    callable: str | None = field(default=None, metadata={
        "help": "kind callable: 'package.module:function', called as fn(prompts, completions) -> [B] or [B, K]."})
    batch_size: int = field(default=64, metadata={"help": "kind ensemble: rows per scoring forward."})
    max_length: int | None = field(default=None, metadata={
        "help": "kind ensemble: keep the last max_length tokens of longer prompt + completion rows (null: the "
                "ensemble's trained max_length, from its manifest; all tokens for an ensemble saved without one)."})

    def __post_init__(self):
        if self.kind not in REWARD_KINDS:
            raise ConfigError(f"kind: must be one of {', '.join(REWARD_KINDS)}, got {self.kind!r}")
        needs = {"ensemble": "ensemble", "callable": "callable"}.get(self.kind)
        if needs and not getattr(self, needs):
            raise ConfigError(f"{needs}: required by reward kind '{self.kind}'")
        for name in ("ensemble", "aggregation", "callable"):
            if name != needs and getattr(self, name) is not None and not (name == "aggregation"
                                                                          and self.kind == "ensemble"):
                raise ConfigError(f"{name}: not an option of reward kind '{self.kind}'")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
