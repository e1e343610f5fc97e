"""Rollouts: sample completions from a policy behind one interface (`RolloutBackend`).

Backends (config key `rollout.backend`, section `RolloutConfig`): `hf` (transformers `generate`, batched with KV
cache; works everywhere) and `vllm` (vLLM's offline engine, on a GPU or on vLLM's CPU build; vLLM is imported only
when this backend is built). Both take the same `SamplingParams` and return the same `Completion`s; `load_weights`
makes either sample from a policy's current weights; `logprob_gap` reports how far the sampler's log-probs are from
the trainer's on the sampled tokens.
"""

from __future__ import annotations

import inspect
import os

from align.errors import ConfigError
from align.registry import Registry
from align.rollout.base import Completion, RolloutBackend, SamplingParams, prompt_token_ids
from align.rollout.config import RolloutConfig
from align.rollout.health import logprob_gap
from align.rollout.hf import HFRollout

__all__ = ["BACKENDS", "ROLLOUT_BACKENDS", "Completion", "RolloutBackend", "RolloutConfig", "SamplingParams",
           "HFRollout", "build_rollout", "logprob_gap", "prompt_token_ids"]

#: `rollout.backend` → a function returning the backend's class (imported on demand: vllm only when asked for).
ROLLOUT_BACKENDS = Registry("backend")
ROLLOUT_BACKENDS.register("hf")(lambda: HFRollout)


@ROLLOUT_BACKENDS.register("vllm")
def _vllm_backend():
    from align.rollout.vllm import VLLMRollout  # a module without top-level vllm import; vllm itself is lazy

    return VLLMRollout


#: `rollout.backend` values.
BACKENDS = tuple(ROLLOUT_BACKENDS)


def build_rollout(backend: str, model_or_path, tokenizer, **options) -> RolloutBackend:
    """The rollout backend named by `rollout.backend`.

    Args:
        backend: "hf" or "vllm".
        model_or_path: a transformers model (the policy being trained) or a model directory / Hub id. `hf` loads a
            path with `AutoModelForCausalLM`; `vllm` builds its engine from the path (a model's `name_or_path`)
            and then loads the model's in-memory weights.
        tokenizer: the data pipeline's tokenizer; both backends tokenize prompts with it.
        options: the backend's keyword options (`hf`: batch_size, progress; `vllm`: seed, progress and the engine
            options of `RolloutConfig.backend_options()`). An option the backend does not take is a `ConfigError`
            naming `rollout.<option>`.
    """
    cls = ROLLOUT_BACKENDS.lookup(backend, "rollout.backend")()
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_any:
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise ConfigError(f"rollout.{unknown[0]}: not an option of rollout.backend {backend!r} "
                              f"(its options: {', '.join(p for p in params if p not in ('self', 'model', 'tokenizer'))})")
    if backend == "hf" and isinstance(model_or_path, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        model_or_path = AutoModelForCausalLM.from_pretrained(str(model_or_path))
    return cls(model_or_path, tokenizer, **options)
