"""Rollouts with vLLM's offline engine (`vllm.LLM`): the GPU backend, `pip install 'align[vllm]'`.

vLLM is imported only inside `VLLMRollout` (never at module import), so align imports, installs and tests without it.

Targets vLLM >= 0.10.2 (V1 engine), the first release with the `logprobs_mode` engine argument this backend needs;
an older vLLM is refused with a `ConfigError`. What it relies on, all documented offline API:

- `vllm.LLM(model=, tokenizer=, dtype=, seed=, gpu_memory_utilization=, enable_prefix_caching=,
  logprobs_mode="processed_logprobs", generation_config="vllm")`;
- `LLM.generate([TokensPrompt(prompt_token_ids=...)], vllm.SamplingParams(...), use_tqdm=)`, reading
  `RequestOutput.outputs[j].token_ids / .logprobs / .finish_reason`;
- `LLM.apply_model(fn)` (runs `fn(model)` in every worker) for the weight sync and `LLM.reset_prefix_cache()`.

Same contract as `HFRollout`:

- **Contexts.** Prompts are tokenized here with align's tokenizer (`add_special_tokens=True`, the data pipeline's
  tokenization) and handed to vLLM as token ids, so both backends sample after identical ids; `text` is decoded
  here with the same tokenizer (`skip_special_tokens=True`), vLLM's detokenizer is switched off.
- **Sampling.** `temperature=0` is greedy; `top_k=0` and `top_p=1` disable truncation; `seed` is vLLM's per-request
  seed (the n samples of a prompt are one request with `n=n`, so they are distinct draws and reproducible);
  `seed=None` continues the engine's RNG (seeded by `LLM(seed=)`). `generation_config="vllm"` stops vLLM from
  overriding these defaults (or adding stop tokens) from the checkpoint's `generation_config.json`. Generation
  stops at the tokenizer's EOS, which ends `token_ids` exactly as in `HFRollout`.
- **Log-probs.** `Completion.logps` means log-probs *with the temperature applied*. vLLM V1 returns, by default,
  `raw_logprobs` (before temperature), so the engine is built with `logprobs_mode="processed_logprobs"` and
  `SamplingParams(logprobs=0)` (the sampled token's log-prob only). Greedy requests get the untempered
  log-softmax, as in `HFRollout`. One documented difference: vLLM's processed log-probs are taken *after* top-k /
  top-p masking, i.e. renormalised over the kept tokens, where `HFRollout` reports them unrenormalised; with
  `top_k=0, top_p=1` (the default) the two conventions coincide. `align.rollout.logprob_gap` measures what is
  left (bf16 kernels, stale weights).
- **On-policy weights.** `load_weights(model)` copies the trainer's current weights into the engine's model with
  `LLM.apply_model(lambda m: m.load_weights(state_dict.items()))` (vLLM's model classes load HF-named
  checkpoints), then resets the prefix cache so no KV computed with old weights is reused. The engine is run
  in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` unless set), so the tensors are handed over, not pickled; this
  is the colocated single-GPU setup. (vLLM < 0.10 reached the model through
  `llm.llm_engine.model_executor.driver_worker.model_runner.model`; not supported here.)
"""

from __future__ import annotations

import functools
import os

import torch

from align.errors import ConfigError
from align.rollout.base import Completion, RolloutBackend, SamplingParams, prompt_token_ids

#: The oldest vLLM this backend supports (`logprobs_mode="processed_logprobs"`).
MIN_VLLM_VERSION = (0, 10, 2)

NOT_INSTALLED = ("rollout.backend: vllm is not installed; pip install 'align[vllm]' (needs a CUDA GPU) "
                 "or use rollout.backend: hf")


def import_vllm():
    """The `vllm` module, or a `ConfigError` saying what to do when it is missing or too old."""
    try:
        import vllm
    except ImportError as e:  # also an installed-but-broken vllm (e.g. no CUDA build of torch)
        raise ConfigError(f"{NOT_INSTALLED} (import failed: {e})") from e
    version = _parse_version(getattr(vllm, "__version__", "0"))
    if version < MIN_VLLM_VERSION:
        raise ConfigError(f"rollout.backend: vllm {vllm.__version__} is too old; align needs vllm >= "
                          f"{'.'.join(map(str, MIN_VLLM_VERSION))} (logprobs_mode='processed_logprobs'): "
                          f"pip install -U 'align[vllm]'")
    # Read when the engine is built: an in-process engine core lets `load_weights` hand tensors over instead of
    # pickling a whole state dict to a worker process.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return vllm


def _parse_version(text: str) -> tuple[int, ...]:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text).release[:3]
    except InvalidVersion:
        return (0,)


def to_vllm_sampling_params(vllm, sampling: SamplingParams, n: int):
    """align's `SamplingParams` as a `vllm.SamplingParams` asking for `n` samples and the sampled tokens' log-probs."""
    greedy = sampling.temperature <= 0
    return vllm.SamplingParams(
        n=n,
        temperature=0.0 if greedy else float(sampling.temperature),
        top_k=0 if greedy else int(sampling.top_k),  # vLLM >= 0.10: 0 (or -1) keeps all tokens
        top_p=1.0 if greedy else float(sampling.top_p),
        max_tokens=int(sampling.max_new_tokens),
        seed=sampling.seed,
        logprobs=0,  # the sampled token's log-prob only
        detokenize=False,  # text is decoded with align's tokenizer
    )


def completions_from_outputs(outputs, tokenizer, eos_token_id: int) -> list[list[Completion]]:
    """`RequestOutput`s (one per prompt, in prompt order) as align `Completion`s."""
    result: list[list[Completion]] = []
    for i, request in enumerate(outputs):
        group = []
        for out in sorted(request.outputs, key=lambda o: o.index):
            ids = [int(t) for t in out.token_ids]
            if out.logprobs is None or len(out.logprobs) != len(ids):
                raise RuntimeError(f"vLLM returned {0 if out.logprobs is None else len(out.logprobs)} log-probs "
                                   f"for {len(ids)} tokens; align needs SamplingParams(logprobs=0)")
            logps = torch.tensor([step[t].logprob for step, t in zip(out.logprobs, ids)], dtype=torch.float32)
            group.append(Completion(prompt_index=i, token_ids=ids, logps=logps,
                                    finished=bool(ids) and ids[-1] == eos_token_id,
                                    text=tokenizer.decode(ids, skip_special_tokens=True)))
        result.append(group)
    return result


def _load_weights_into(weights, model) -> None:
    """Runs inside each vLLM worker (`LLM.apply_model`): load HF-named tensors into vLLM's model."""
    model.load_weights(weights=iter(weights))


class VLLMRollout(RolloutBackend):
    """Samples with a `vllm.LLM` offline engine (GPU). See the module docstring for the exact contract.

    Args:
        model_or_path: a model directory / Hub id, or a transformers model (its `name_or_path` builds the engine,
            then its in-memory weights are loaded, so a model being trained is sampled as it is now).
        tokenizer: align's tokenizer (the one the data pipeline uses); vLLM gets token ids, never text.
        dtype: vLLM's `dtype` ("auto" = the checkpoint's; "float32" for exact agreement with an fp32 trainer).
        seed: the engine's seed (used by requests whose `SamplingParams.seed` is None).
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache); leave room for the
            trainer when colocated.
        enable_prefix_caching: reuse the KV of shared prompt prefixes (the n samples of a prompt share it).
        progress: vLLM's progress bar.
        llm_kwargs: any other `vllm.LLM` argument (e.g. `max_model_len`, `enforce_eager`).
    """

    def __init__(self, model_or_path, tokenizer, *, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.5, enable_prefix_caching: bool = True, progress: bool = False,
                 **llm_kwargs):
        vllm = import_vllm()
        if not torch.cuda.is_available():
            raise ConfigError("rollout.backend: vllm needs a CUDA GPU and none is visible; "
                              "use rollout.backend: hf on CPU")
        from vllm.inputs import TokensPrompt

        self._vllm, self._tokens_prompt = vllm, TokensPrompt
        self.tokenizer, self.progress = tokenizer, progress
        model = None if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
        path = str(model_or_path) if model is None else _name_or_path(model)
        self.llm = vllm.LLM(model=path, tokenizer=path, dtype=dtype, seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization,
                            enable_prefix_caching=enable_prefix_caching, logprobs_mode="processed_logprobs",
                            generation_config="vllm", **llm_kwargs)
        if model is not None:
            self.load_weights(model)

    def load_weights(self, model) -> None:
        model = getattr(model, "module", model)  # DDP-style wrappers
        weights = [(name, t.detach()) for name, t in model.state_dict().items()]
        self.llm.apply_model(functools.partial(_load_weights_into, weights))
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    def generate(self, prompts: list[str], n: int = 1, sampling: SamplingParams | None = None
                 ) -> list[list[Completion]]:
        sampling = sampling or SamplingParams()
        ids = prompt_token_ids(self.tokenizer, prompts)
        requests = [self._tokens_prompt(prompt_token_ids=p) for p in ids]
        outputs = self.llm.generate(requests, to_vllm_sampling_params(self._vllm, sampling, n),
                                    use_tqdm=self.progress)
        return completions_from_outputs(outputs, self.tokenizer, self.tokenizer.eos_token_id)


def _name_or_path(model) -> str:
    model = getattr(model, "module", model)
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ConfigError("rollout.backend: vllm builds its engine from a model directory; this model has no "
                          "name_or_path (save it with save_pretrained and pass the directory)")
    return str(path)
