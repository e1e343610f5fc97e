"""Loading policies and tokenizers: one code path for a Hub name and a local `save_pretrained` folder."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from align.errors import ConfigError
from align.schema import ConfigKeyError
from align.logps import MASKABLE_ATTENTION

#: The weight dtypes a recipe or a loader may name (besides `auto`, see `resolve_dtype`).
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
    """The torch dtype weights are loaded in: a torch dtype or a name in `_DTYPES` as it is; `auto` is float32 on a
    CPU (bf16 matmuls are emulated there, ~60x slower) and bfloat16 on a GPU that supports it. `device`: where the
    weights will live (None: CUDA when available, else CPU). The one rule policies and reward models share."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device is None:
            on_gpu = torch.cuda.is_available()
        else:
            on_gpu = torch.device(device).type == "cuda"
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError(f"dtype must be auto, a torch dtype or one of {', '.join(_DTYPES)}; got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` → "bfloat16", the name `resolve_dtype` reads back."""
    return str(dtype).removeprefix("torch.")


@dataclass
class LoraSection:
    """LoRA adapter trained instead of the full weights (`peft.LoraConfig`). The default reference (`auto`) is then
    the base model with the adapter disabled, and a `tr_dpo` reference is a second adapter on the same base: no
    second model in memory either way."""

    r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: Any = field(
        default="all-linear",
        metadata={"help": "Module names (list) or 'all-linear' to adapt every linear layer except the LM head."},
    )

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"r must be >= 1, got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class ModelConfig:
    """The policy model: a Hub name or a local folder, loaded with `AutoModelForCausalLM.from_pretrained`."""

    name_or_path: str = field(default="", metadata={"help": "Hub model id or local `save_pretrained` folder."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Weight dtype: float32 | bfloat16 | float16 | auto. `auto` is float32 on CPU (bf16 matmuls "
                          "are emulated there, ~60x slower) and bfloat16 on a GPU that supports it."},
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "sdpa | eager. align packs chosen and rejected behind one shared prompt with a custom 4D "
                          "attention mask, which flash-attention kernels cannot take."},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the Hub."})
    lora: LoraSection | None = field(default=None, metadata={"help": "Train a LoRA adapter (see LoraSection)."})

    def __post_init__(self):
        if not self.name_or_path:
            raise ConfigError("name_or_path is required")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got '{self.dtype}'")
        if self.attn_implementation not in MASKABLE_ATTENTION:
            raise ConfigError(f"attn_implementation must be sdpa or eager, got '{self.attn_implementation}' "
                              "(align's shared-prompt mask needs an attention that takes a 4D mask)")

    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a torch dtype (`resolve_dtype`; `auto` decided for this machine)."""
        return resolve_dtype(self.dtype)


#: A Hugging Face Hub repo id: `name` or `owner/name`, letters, digits, `-`, `_`, `.` (huggingface_hub's rule, at most
#: 96 characters).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def model_path_problem(name_or_path: str, revision: str | None = None) -> str | None:
    """Why `name_or_path` cannot name a model, found without touching the network, or None when it may.

    A missing path that looks local (`./x`, `/x`, `~/x`, `a/b/c`, not a valid Hub id, or whose first component is a
    local folder, as `outputs/nope` is) is refused at once: left to transformers it becomes a Hub lookup with a minute
    of retries and a connection error that never says the folder is missing. With HF_HUB_OFFLINE set, a Hub id that
    is not in the local cache is refused the same way.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return None if path.is_dir() else "is a file, not a model folder (save_pretrained writes a folder)"
    first = Path(name_or_path).parts[0] if Path(name_or_path).parts else ""
    looks_local = (name_or_path.startswith(("/", ".", "~")) or not _HUB_ID.match(name_or_path)
                   or (first != name_or_path and Path(first).is_dir()))
    if looks_local:
        return "does not exist (not a local folder; a Hub id looks like owner/name)"
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
        if not isinstance(cached, str):
            return ("is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE is set "
                    f"(cache: {constants.HF_HUB_CACHE})")
    return None


def check_model_path(name_or_path: str, *, key: str = "model.name_or_path", revision: str | None = None) -> None:
    """Raises a one-line ConfigError naming `key` when `model_path_problem` finds one. Called by every loader before
    transformers is asked (recipes validate configs whose folders a previous step has yet to write, so the check
    belongs to loading, not to config validation)."""
    problem = model_path_problem(name_or_path, revision)
    if problem:
        raise ConfigKeyError(key, f"'{name_or_path}' {problem}")


def load_tokenizer(config: ModelConfig):
    from transformers import AutoTokenizer

    check_model_path(config.name_or_path, revision=config.revision)

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.name_or_path, revision=config.revision,
                                                  trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path '{config.name_or_path}': cannot load a tokenizer "
                          f"({str(e).splitlines()[0]})") from e
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(config: ModelConfig, name_or_path: str | None = None, *, key: str = "model.name_or_path"):
    """Loads `name_or_path` (default: the policy's) with the policy's dtype and attention settings; `key` names the
    config key it came from in errors."""
    from transformers import AutoModelForCausalLM

    path = name_or_path or config.name_or_path
    check_model_path(path, key=key, revision=config.revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=config.torch_dtype(), attn_implementation=config.attn_implementation,
            revision=config.revision, trust_remote_code=config.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise ConfigKeyError(key, f"cannot load model '{path}' ({str(e).splitlines()[0]})") from e
    # The KV cache is useless in training and the packed forward never asks for it.
    model.config.use_cache = False
    return model


def load_policy(config: ModelConfig):
    """The trainable policy: the causal LM, wrapped in a fresh LoRA adapter when `config.lora` is set."""
    model = load_causal_lm(config)
    if config.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(task_type="CAUSAL_LM", r=config.lora.r, lora_alpha=config.lora.lora_alpha,
                          lora_dropout=config.lora.lora_dropout, target_modules=config.lora.target_modules)
        model = get_peft_model(model, lora)
    return model


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def adapter_active(layers, name: str):
    """Within the block, every PEFT layer in `layers` computes with adapter `name`; restored in `finally`.

    Sets each layer's `_active_adapter` directly, not through PEFT's `set_adapter`: that also rewrites
    `requires_grad` of the adapters on every call (here: several times per step, while the step's autograd graph is
    alive), which no caller wants; the switch is all a forward with another adapter needs (the TR-DPO reference
    adapter, a member of a LoRA reward ensemble).
    """
    saved = [(layer, layer._active_adapter) for layer in layers]
    try:
        for layer, _ in saved:
            layer._active_adapter = name
        yield
    finally:
        for layer, active in saved:
            layer._active_adapter = active
