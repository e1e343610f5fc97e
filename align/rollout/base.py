"""The rollout interface shared by every backend."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to sample. The same fields mean the same thing in every backend."""

    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens generated per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature; 0 means greedy."})
    top_k: int = field(default=0, metadata={"help": "Keep the k most likely tokens; 0 disables."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass; 1.0 disables."})
    seed: int | None = field(default=None, metadata={"help": "Seed for this call; None continues the global RNG."})


@dataclass
class Completion:
    """One sampled completion.

    Attributes:
        prompt_index: index of its prompt in the `generate` call.
        token_ids: generated ids, ending with EOS when `finished`.
        text: decoded text without special tokens.
        logps: `[len(token_ids)]` fp32 log-probs of the tokens under the sampling policy (temperature applied;
            top-k/top-p truncation not renormalised); None from an `HFRollout(score=False)`.
        finished: True when the completion ended with EOS (not cut by `max_new_tokens`).
    """

    prompt_index: int
    token_ids: list[int]
    text: str
    logps: torch.Tensor | None
    finished: bool


class RolloutBackend(abc.ABC):
    #: True when the backend samples from the very module it was last given (hf): no weights to sync.
    samples_live_policy: bool = False

    @abc.abstractmethod
    def generate(self, prompts: list, n: int = 1, sampling: SamplingParams | None = None
                 ) -> list[list[Completion]]:
        """`n` completions for each prompt: result[i][j] is the j-th completion of prompts[i].

        A prompt is text, a message list or token ids (`prompt_token_ids`); completions come back as token ids and
        their decoded text, so nothing needs to be re-tokenized."""

    @abc.abstractmethod
    def load_weights(self, model) -> None:
        """Makes the backend sample from `model`'s current weights (on-policy training)."""


def prompt_token_ids(tokenizer, prompts: list) -> list[list[int]]:
    """The ids every backend samples after: the data pipeline's own prompt tokenization (`align.data.tokenize_prompts`:
    text with the tokenizer's special tokens, message lists through the chat template, token ids as they are;
    a doubled BOS collapsed), so a policy is trained on exactly the ids it sampled after."""
    from align.data import tokenize_prompts

    return tokenize_prompts(tokenizer, list(prompts))
