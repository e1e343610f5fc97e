"""The `rollout:` section of a recipe: which backend samples, and the vLLM engine's options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from align.errors import ConfigError

#: The fields of `RolloutConfig` that are vLLM engine options (passed to `VLLMRollout`; ignored by `hf`).
VLLM_ENGINE_FIELDS = ("dtype", "gpu_memory_utilization", "enforce_eager", "max_model_len", "tensor_parallel_size",
                      "enable_prefix_caching", "enable_sleep_mode", "engine_kwargs")


@dataclass
class RolloutConfig:
    """How completions are sampled (`align.rollout.build_rollout`). The engine options apply to `backend: vllm`."""

    backend: Literal["hf", "vllm"] = field(default="hf", metadata={
        "help": "hf (transformers generate, batched with a KV cache; works everywhere) or vllm (vLLM's offline "
                "engine: `pip install 'align[vllm]'` on GPU, vLLM's CPU build on CPU; README 'Installing')."})
    dtype: str = field(default="auto", metadata={
        "help": "vllm: the engine's dtype: auto (the checkpoint's), float32, bfloat16 or float16. float32 makes the "
                "sampler's log-probs agree with an fp32 trainer's to ~1e-5."})
    gpu_memory_utilization: float | None = field(default=None, metadata={
        "help": "vllm: fraction of memory the engine reserves for weights and KV cache: of the GPU's, or on CPU of "
                "the memory node's (there it sizes the KV cache). null: 0.5 on a GPU (room for a colocated "
                "trainer), 0.2 on CPU."})
    enforce_eager: bool = field(default=False, metadata={
        "help": "vllm: run eagerly, without CUDA graphs or torch.compile: starts in seconds instead of compiling "
                "(about 3 s instead of 21 s for a tiny model on CPU), decodes more slowly on a GPU."})
    max_model_len: int | None = field(default=None, metadata={
        "help": "vllm: longest prompt + completion the engine serves (null: the model's maximum). Smaller values "
                "leave more room for the KV cache."})
    tensor_parallel_size: int = field(default=1, metadata={
        "help": "vllm: GPUs one engine is sharded over. Above 1 with weight sync (on-policy training), use "
                "engine_kwargs: {distributed_executor_backend: external_launcher} under torchrun."})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "vllm: reuse the KV of shared prompt prefixes (the n samples of a prompt share one)."})
    enable_sleep_mode: bool = field(default=False, metadata={
        "help": "vllm, GPU only: free the engine's GPU memory between samplings (sleep level 1 after each "
                "generate; woken for the next weight sync in vLLM's documented order: weights, reload, KV cache)."})
    engine_kwargs: dict = field(default_factory=dict, metadata={
        "help": "vllm: any other vllm.EngineArgs field (checked against the installed vLLM), e.g. "
                "{swap_space: 4}."})

    def __post_init__(self):
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len: must be >= 1 or null, got {self.max_model_len}")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size: must be >= 1, got {self.tensor_parallel_size}")

    def backend_options(self) -> dict:
        """The keyword options `build_rollout` passes to this backend (the engine options for vllm, none for hf)."""
        if self.backend != "vllm":
            return {}
        return {name: getattr(self, name) for name in VLLM_ENGINE_FIELDS}


@dataclass
class GenerationConfig:
    """The `generation:` section of an on-policy recipe: what is sampled each step."""

    num_samples: int = field(default=4, metadata={
        "help": "G: completions sampled per prompt. The batch of a step is per_device_train_batch_size prompts × G."})
    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens per completion."})
    temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature (> 0). Away from 1 the sampler q is not π_θ and importance weights correct it."})
    top_k: int = field(default=0, metadata={"help": "Keep the k most likely tokens when sampling; 0 disables."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass; 1.0 disables."})
    sync_every: int = field(default=1, metadata={
        "help": "rollout.backend vllm: load the policy's weights into the engine every sync_every optimizer steps "
                "(1: always on-policy; more: cheaper, off-policy in between, corrected by importance weights). "
                "hf samples from the live policy and takes only 1."})
    steps_per_generation: int = field(default=1, metadata={
        "help": "Optimizer steps trained on the samples of one generate call (TRL's name): the call samples for the "
                "prompts of that many steps at once (cheaper per sample), and the later steps are off-policy, "
                "corrected by the importance weights π_θ/q. training.save_steps must be a multiple of it."})
    batch_size: int = field(default=64, metadata={"help": "hf: sequences per forward while sampling."})

    def __post_init__(self):
        for name in ("num_samples", "max_new_tokens", "sync_every", "steps_per_generation", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 (on-policy training samples), got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k}, {self.top_p}")

    def exact_sampler(self) -> bool:
        """True when the sampler's distribution is the policy being trained at every step (temperature 1, no
        truncation, one step per generation)."""
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0 and self.steps_per_generation == 1
