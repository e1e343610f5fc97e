"""Model soups (SALSA, Chegini et al. 2024): θ_soup = Σ_k w_k θ_k over checkpoints of one architecture.

SALSA anchors alignment to the weight average of several SFT models (main setting: two seeds, w = (½, ½)) instead of
one SFT model. `align soup --out DIR CKPT... [--weights ...]` writes a soup as a normal checkpoint folder; the
reference kind `soup` has one process per node write it to a temporary folder and every process load it like a
`frozen` reference. Both write it tensor by tensor (`write_soup_weights`: no model in memory); `build_soup` builds
the same soup, bit for bit, as a model in memory (two fp32 models), and is what the writer falls back to for
checkpoints it cannot read by tensor name. Averaging is done in fp32 (METHODS §3) and cast once to the first
ingredient's dtype; buffers are taken from the first ingredient (they are not trained).

An ingredient is either a full `save_pretrained` checkpoint or a PEFT LoRA adapter folder (`adapter_config.json`).
An adapter ingredient k contributes its *merged* weights W0 + s_k B_k A_k (W0: its base model, named by
`base_model_name_or_path`; s_k = lora_alpha / r, or / √r with rsLoRA), merged in fp32 with peft's `merge_and_unload`.
Averaging the factors A and B separately would be wrong: B A is bilinear, so the mean of the factors' product is not
the product of their means (METHODS §2 toolkit note, §3).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from align.errors import ConfigError
from align.io import atomic_directory, atomic_write_json


def soup_weights(weights: list[float] | None, n: int) -> list[float]:
    """Validated mixing weights: uniform by default; otherwise n values, each >= 0, summing to 1."""
    if n < 2:
        raise ConfigError(f"a soup needs at least 2 checkpoints, got {n}")
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ConfigError(f"weights: {len(weights)} weights for {n} checkpoints")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ConfigError(f"weights must be >= 0, got {list(weights)}")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ConfigError(f"weights must sum to 1, got {list(weights)} (sum {sum(weights):.6g})")
    return [float(w) for w in weights]


@dataclass(frozen=True)
class Ingredient:
    """One soup ingredient, resolved before any weights are loaded.

    `path` is what the user gave (every error names it). Full weights come from `model_source` (the folder itself,
    or for an adapter its base model, a local folder or a Hub id, at `revision`); `adapter` is the LoRA folder
    merged on top, or None.
    """

    path: str
    model_source: str
    revision: str | None = None
    adapter: Path | None = None
    tokenizer_source: str = ""

    def describe(self) -> str:
        if self.adapter is None:
            return f"soup ingredient '{self.path}'"
        return f"soup ingredient '{self.path}' (LoRA adapter on base model '{self.model_source}')"


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _adapter_ingredient(path: str, folder: Path) -> Ingredient:
    """Reads and checks a PEFT adapter folder's `adapter_config.json` (no weights loaded)."""
    where = f"soup ingredient '{path}'"
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: cannot read adapter_config.json ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: adapter_config.json is not a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ConfigError(f"{where}: only LoRA adapters can be soup ingredients (adapter_config.json has peft_type "
                          f"{peft_type!r}); merge it into full weights first")
    # modules_to_save / trainable tokens are full trained copies of modules, not low-rank deltas, and a
    # modules_to_save copy of a tied embedding or LM head unties it on merge: the merged model would no longer have
    # the architecture of the other ingredients. Refuse rather than average something that is not a merged delta.
    for key in ("modules_to_save", "trainable_token_indices"):
        if config.get(key):
            raise ConfigError(f"{where}: adapter_config.json sets {key} ({config[key]!r}); only pure LoRA adapters "
                              "(low-rank deltas) can be soup ingredients, merge this one into full weights first")
    if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ConfigError(f"{where}: adapter_config.json but no adapter_model.safetensors (or .bin)")
    base = config.get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise ConfigError(f"{where}: adapter_config.json has no base_model_name_or_path, so its base model is "
                          "unknown")
    looks_local = Path(base).is_absolute() or base.startswith((".", "~")) or base.count("/") > 1  # Hub ids: org/name
    if looks_local:
        if not Path(base).expanduser().is_dir():
            raise ConfigError(f"{where}: its base model '{base}' (base_model_name_or_path in adapter_config.json) "
                              "does not exist; edit that field to where the base model is now")
        base = str(Path(base).expanduser())
    if (Path(base) / "adapter_config.json").exists():
        raise ConfigError(f"{where}: its base model '{base}' is itself a LoRA adapter; merge that one first")
    # A base given as a relative path is relative to the working directory, as for peft's own loaders.
    tokenizer_source = str(folder) if _has_tokenizer(folder) else base  # an adapter often ships no tokenizer
    return Ingredient(path=path, model_source=base, revision=config.get("revision"), adapter=folder,
                      tokenizer_source=tokenizer_source)


def resolve_ingredient(path: str) -> Ingredient:
    """Classifies `path` as a full checkpoint or a LoRA adapter folder and checks what can be checked from files."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"soup ingredient '{path}': no such checkpoint directory")
    if (p / "adapter_config.json").exists():
        return _adapter_ingredient(path, p)
    if not (p / "config.json").exists():
        raise ConfigError(f"soup ingredient '{path}': no config.json, not a save_pretrained checkpoint (or "
                          "adapter_config.json, a LoRA adapter)")
    return Ingredient(path=path, model_source=str(p), tokenizer_source=str(p))


_CONFIG_KEYS_IGNORED = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"}


def _architecture(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _CONFIG_KEYS_IGNORED}


def _load_config(ingredient: Ingredient):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ingredient.model_source, revision=ingredient.revision)
    except (OSError, ValueError) as e:
        if ingredient.adapter is not None:
            raise ConfigError(f"{ingredient.describe()}: cannot load the base model named by base_model_name_or_path "
                              f"in adapter_config.json ({str(e).splitlines()[0]})") from None
        raise ConfigError(f"{ingredient.describe()}: cannot load config.json ({str(e).splitlines()[0]})") from None


def _load_vocab(ingredient: Ingredient) -> dict:
    from transformers import AutoTokenizer

    return _load_tokenizer(ingredient, AutoTokenizer).get_vocab()


def _load_tokenizer(ingredient: Ingredient, auto_tokenizer):
    revision = ingredient.revision if ingredient.tokenizer_source == ingredient.model_source else None
    try:
        return auto_tokenizer.from_pretrained(ingredient.tokenizer_source, revision=revision)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{ingredient.describe()}: cannot load a tokenizer from '{ingredient.tokenizer_source}' "
                          f"({str(e).splitlines()[0]})") from None


@contextlib.contextmanager
def _whole_models():
    """Models loaded in the block are whole on this process, even when a ZeRO-3 `TrainingArguments` is alive.

    Under a live ZeRO-3 `HfDeepSpeedConfig`, `from_pretrained` and `from_config` build the model inside
    `deepspeed.zero.Init`, which partitions every parameter as it is created: `named_parameters()` then yields empty
    placeholders, and averaging those is a silent no-op (the soup would be the first ingredient's partitions). A soup
    is built from whole tensors, so transformers' pointer to the config (a module-level weakref, which it reads
    through `is_deepspeed_zero3_enabled`) is cleared for the block and put back afterwards.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers always ships it
        yield
        return
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    live = ref() if ref is not None else None
    if live is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(live)


def _attach_adapter(model, ingredient: Ingredient):
    """`model` (the adapter's base, fp32) wrapped by peft with the ingredient's LoRA adapter, checked: every tensor
    saved in the adapter has landed on a module of the base."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    with warnings.catch_warnings():  # turned into the error below, which names the ingredient
        warnings.filterwarnings("ignore", message="Found missing adapter keys")
        peft_model = PeftModel.from_pretrained(model, str(ingredient.adapter), is_trainable=False)
    # peft only warns about adapter tensors that match no module (or modules left without weights): a silently
    # half-loaded adapter would merge as a no-op, so every saved tensor must have landed somewhere.
    saved = set(load_peft_weights(str(ingredient.adapter), device="cpu"))
    live = set(get_peft_model_state_dict(peft_model))
    if saved != live:
        odd = sorted(saved ^ live)
        raise ConfigError(f"{ingredient.describe()}: the adapter's weights do not match its base model "
                          f"({len(odd)} tensors differ, e.g. '{odd[0]}')")
    return peft_model


def _load_fp32(ingredient: Ingredient, attn_implementation: str):
    """The ingredient's full weights in fp32: the checkpoint, or the adapter's base with the adapter merged in.

    peft loads the adapter onto the fp32 base (fp16/bf16 adapter weights are upcast) and `merge_and_unload` adds
    s·B·A to each targeted weight in fp32, leaving a plain transformers model with the base's parameter names.
    """
    from transformers import AutoModelForCausalLM

    try:
        with _whole_models():
            model = AutoModelForCausalLM.from_pretrained(ingredient.model_source, revision=ingredient.revision,
                                                         dtype=torch.float32, attn_implementation=attn_implementation)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{ingredient.describe()}: cannot load weights ({str(e).splitlines()[0]})") from None
    if ingredient.adapter is None:
        return model
    try:
        return _attach_adapter(model, ingredient).merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN/inf
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ConfigError(f"{ingredient.describe()}: cannot load or merge the adapter "
                          f"({str(e).splitlines()[0]})") from None


def check_ingredients(checkpoints: list[str], weights: list[float] | None = None):
    """Everything about a soup that can be checked without loading weights: the mixing weights, each ingredient's
    folder (or adapter_config.json), and that all ingredients share the first one's architecture and tokenizer.
    Returns (weights, ingredients, the first ingredient's config). Cheap (configs and tokenizers only), so every
    process of a distributed job runs it and a bad soup is the same one-line error on every rank."""
    weights = soup_weights(weights, len(checkpoints))
    ingredients = [resolve_ingredient(c) for c in checkpoints]
    first = ingredients[0]
    first_config = _load_config(first)
    first_vocab = _load_vocab(first)
    for ingredient in ingredients[1:]:
        if _architecture(_load_config(ingredient)) != _architecture(first_config):
            raise ConfigError(f"{ingredient.describe()} has a different architecture from '{first.path}'")
        if _load_vocab(ingredient) != first_vocab:
            raise ConfigError(f"{ingredient.describe()} has a different tokenizer from '{first.path}'")
    return weights, ingredients, first_config


def _soup_dtype(config) -> torch.dtype:
    """The soup's dtype: the first ingredient's (as `align soup` writes it)."""
    out_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, out_dtype) if isinstance(out_dtype, str) else out_dtype


def build_soup(checkpoints: list[str], weights: list[float] | None = None, *, attn_implementation: str = "sdpa"):
    """Returns (model, tokenizer) of the soup Σ_k w_k θ_k, averaged in fp32 and cast to the first ingredient's dtype.

    Ingredients are full checkpoints or LoRA adapter folders (merged onto their base in fp32, see the module
    docstring), in any mix. All configs and tokenizers are checked before any weights are loaded; then ingredients
    are loaded one at a time, so memory holds the running fp32 soup and one ingredient (for an adapter: its base with
    the adapter merged in).

    The soup is accumulated as a running weighted mean, S ← S + (w_k / W_k)(θ_k − S) with W_k = w_1 + … + w_k, which
    equals Σ_k w_k θ_k but keeps a tensor that is the same in every ingredient bit-exactly unchanged (θ_k − S = 0):
    with several adapters on one base, every weight no adapter touches is exactly the base's. The plain sum
    w_1 θ + w_2 θ can be one ulp off θ in fp32 (≈10% of elements for w = (0.3, 0.7)).
    """
    from transformers import AutoTokenizer

    weights, ingredients, first_config = check_ingredients(checkpoints, weights)  # before any weights are loaded
    return _build_in_memory(ingredients, weights, first_config, attn_implementation), \
        _load_tokenizer(ingredients[0], AutoTokenizer)


def _build_in_memory(ingredients: list[Ingredient], weights: list[float], first_config, attn_implementation: str):
    """The soup as a model (see `build_soup`): the running fp32 soup and one loaded ingredient in memory."""
    first = ingredients[0]
    soup = _load_fp32(first, attn_implementation)
    out_dtype = _soup_dtype(first_config)
    params = dict(soup.named_parameters())  # tied weights (embeddings / LM head) appear, and are averaged, once
    if weights[0] == 0.0:  # the running mean starts at the first ingredient with a positive weight
        soup_start = next(k for k, w in enumerate(weights) if w > 0.0)
    else:
        soup_start = 0
    cumulative = weights[0]
    with torch.no_grad():
        for k, (ingredient, w) in enumerate(zip(ingredients[1:], weights[1:]), start=1):
            cumulative += w
            if w == 0.0:
                continue  # contributes nothing; its config and tokenizer were checked above
            other_model = _load_fp32(ingredient, attn_implementation)
            other = dict(other_model.named_parameters())
            if other.keys() != params.keys() or any(other[n].shape != p.shape for n, p in params.items()):
                raise ConfigError(f"{ingredient.describe()} has different parameter names or shapes")
            for name, p in params.items():
                if k == soup_start:
                    p.copy_(other[name])  # first positive weight: S = θ_k exactly
                else:  # S += (w_k / W_k)(θ_k − S), reusing the ingredient's storage for θ_k − S
                    p.add_(other[name].sub_(p), alpha=w / cumulative)
            del other_model, other
    return soup.to(out_dtype)


# --- Streaming: the soup written tensor by tensor, no model in memory ----------------------------------------------

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin")


class _CheckpointFiles:
    """A checkpoint's tensors read by name, one at a time, without building the model: `model.safetensors` (sharded
    or not; `safe_open`) or, for older checkpoints, `pytorch_model.bin` (`torch.load(mmap=True)`).

    Each read opens the file and closes it again: a handle kept open keeps the pages it has read mapped into the
    process, so after one pass over K ingredients the process would map all K checkpoints (counted in its resident
    set, and pinned until closed). Re-opening costs a header parse per tensor, small next to reading the tensor."""

    def __init__(self, files: dict[str, Path]):
        self.files = files  # tensor name -> file holding it

    @classmethod
    def find(cls, source: str, revision: str | None) -> _CheckpointFiles | None:
        """The weight files of a local folder or of a Hub model in the local cache; None when there are none that
        can be read this way (the caller then builds the soup in memory, whose loader reports what is wrong)."""
        def locate(name: str) -> Path | None:
            if Path(source).is_dir():
                path = Path(source) / name
                return path if path.is_file() else None
            from huggingface_hub import try_to_load_from_cache

            try:
                cached = try_to_load_from_cache(source, name, revision=revision)
            except ValueError:  # not a valid repo id
                return None
            return Path(cached) if isinstance(cached, str) else None

        for name in _WEIGHT_FILES:
            path = locate(name)
            if path is None:
                continue
            if name.endswith(".index.json"):
                weight_map = json.loads(path.read_text()).get("weight_map", {})
                shards = {shard: locate(shard) for shard in set(weight_map.values())}
                if not weight_map or any(p is None for p in shards.values()):
                    return None
                return cls({key: shards[shard] for key, shard in weight_map.items()})
            keys = cls._read_keys(path)
            return None if keys is None else cls(dict.fromkeys(keys, path))
        return None

    @staticmethod
    def _read_keys(path: Path) -> list[str] | None:
        """The tensor names in one weight file; None when it cannot be read by name (e.g. a `.bin` in the legacy
        pre-zip format, which `torch.load(mmap=True)` refuses): the in-memory build then loads it."""
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    return list(f.keys())
            return list(torch.load(path, mmap=True, weights_only=True, map_location="cpu"))
        except Exception:  # noqa: BLE001 - any unreadable file: fall back to from_pretrained, which explains it
            return None

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        path = self.files[name]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return tuple(f.get_slice(name).get_shape())
        return tuple(torch.load(path, mmap=True, weights_only=True, map_location="cpu")[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        path = self.files[name]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return _SAFETENSORS_DTYPES[f.get_slice(name).get_dtype()]
        return torch.load(path, mmap=True, weights_only=True, map_location="cpu")[name].dtype

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored; it may map the file (read-only), so callers copy it before writing to it."""
        path = self.files[name]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return f.get_tensor(name)
        return torch.load(path, mmap=True, weights_only=True, map_location="cpu")[name]


def _fp32(tensor: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of a floating tensor (a copy of any other), owned: the running mean writes into it."""
    return tensor.to(torch.float32, copy=True) if tensor.is_floating_point() else tensor.clone()


class _FullSource:
    """A full checkpoint ingredient, tensor by tensor in fp32 (as `from_pretrained(dtype=float32)` would give it)."""

    def __init__(self, ingredient: Ingredient, files: _CheckpointFiles):
        self.ingredient, self.files = ingredient, files

    def names(self) -> list[str]:
        return self.files.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.files.dtype(name)

    def get_fp32(self, name: str) -> torch.Tensor:
        return _fp32(self.files.get(name))


def _placeholder_weights(model) -> None:
    """Gives every parameter and buffer of a meta-device model a CPU tensor of its shape and dtype that owns one
    element (all strides 0): peft can then wrap the model and load an adapter onto it as onto a real one (it moves
    the adapter to its base layer's device, which must not be `meta`), at the memory cost of the adapter alone."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty_strided(p.shape, (0,) * p.dim(), dtype=p.dtype), requires_grad=False)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty_strided(b.shape, (0,) * b.dim(), dtype=b.dtype)


class _AdapterSource(_FullSource):
    """A LoRA adapter ingredient, tensor by tensor: its base's tensors, and for each targeted layer peft's own merge
    of that one layer.

    The adapter is loaded by peft (`PeftModel.from_pretrained`, checked as in `_load_fp32`) onto the base
    architecture built with placeholder weights; when a tensor of a targeted layer is asked for, that layer's own
    weights are read from the base's files in fp32, `layer.merge(safe_merge=True)` (the code `merge_and_unload`
    runs, so LoRA, rsLoRA, DoRA and LoRA biases merge exactly as there) adds the adapter's delta, and the layer gets
    its placeholders back. Memory: the adapter and one layer."""

    def __init__(self, ingredient: Ingredient, files: _CheckpointFiles, peft_model, layers: dict):
        super().__init__(ingredient, files)
        self.peft_model = peft_model
        self.layers = layers  # base tensor name -> (peft LoRA layer, its base layer, parameter name)
        self.merged: dict[str, torch.Tensor] = {}  # merged tensors of a layer not yet asked for (its bias)

    def get_fp32(self, name: str) -> torch.Tensor:
        if name in self.merged:
            return self.merged.pop(name)
        if name not in self.layers:
            return _fp32(self.files.get(name))
        lora_layer, base_layer, _ = self.layers[name]
        prefix = name.rsplit(".", 1)[0]
        placeholders = {pname: p for pname, p in base_layer._parameters.items() if p is not None}
        try:
            for pname in placeholders:
                base_layer._parameters[pname] = torch.nn.Parameter(
                    _fp32(self.files.get(f"{prefix}.{pname}")), requires_grad=False)
            lora_layer.merge(safe_merge=True)
            merged = {f"{prefix}.{pname}": base_layer._parameters[pname].data for pname in placeholders}
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"{self.ingredient.describe()}: cannot load or merge the adapter "
                              f"({str(e).splitlines()[0]})") from None
        finally:
            base_layer._parameters.update(placeholders)
            lora_layer.merged_adapters.clear()  # the layer is whole again (placeholders), nothing merged in it
        value = merged.pop(name)
        self.merged.update(merged)
        return value


def _meta_model(config, attn_implementation: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    # A copy: from_config writes `dtype` into the config it is given, and the caller's config names the soup's dtype.
    with _whole_models(), torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype,
                                                attn_implementation=attn_implementation)


def _adapter_source(ingredient: Ingredient, files: _CheckpointFiles, attn_implementation: str):
    """`_AdapterSource` of an adapter ingredient, or None when one of its targeted layers is not a plain
    `nn.Linear`/`nn.Embedding` whose own tensors are all stored by name in the base's files (e.g. a LoRA on an LM
    head tied to the embeddings, which the files store once, under the embedding's name)."""
    from peft.tuners.lora import LoraLayer

    model = _meta_model(_load_config(ingredient), attn_implementation)
    _placeholder_weights(model)
    try:
        peft_model = _attach_adapter(model, ingredient)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ConfigError(f"{ingredient.describe()}: cannot load or merge the adapter "
                          f"({str(e).splitlines()[0]})") from None
    stored = set(files.names())
    layers = {}
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base_layer = module.get_base_layer()
        if type(base_layer) not in (torch.nn.Linear, torch.nn.Embedding):
            return None
        prefix = module_name.removeprefix("base_model.model.")
        for pname, p in base_layer._parameters.items():
            if p is None:  # e.g. `bias` of a Linear without one
                continue
            if f"{prefix}.{pname}" not in stored:
                return None
            layers[f"{prefix}.{pname}"] = (module, base_layer, pname)
    return _AdapterSource(ingredient, files, peft_model, layers)


def _stream_sources(ingredients: list[Ingredient], first_config, attn_implementation: str):
    """(sources, names of stored buffers) when every ingredient can be read tensor by tensor and agrees with the
    first on the stored tensor names and shapes, which are all names of the model's own state (no renaming on
    load); None otherwise."""
    sources = []
    for ingredient in ingredients:
        files = _CheckpointFiles.find(ingredient.model_source, ingredient.revision)
        if files is None:
            return None
        if ingredient.adapter is None:
            sources.append(_FullSource(ingredient, files))
        else:
            source = _adapter_source(ingredient, files, attn_implementation)
            if source is None:
                return None
            sources.append(source)
    meta = _meta_model(first_config, attn_implementation)
    state_names = set(meta.state_dict())
    buffers = {name for name, _ in meta.named_buffers()} & state_names  # persistent buffers only
    names = sources[0].names()
    if not set(names) <= state_names:
        return None  # stored under other names than the model's (renamed on load): from_pretrained's business
    for source in sources[1:]:
        if set(source.names()) != set(names) or any(source.shape(n) != sources[0].shape(n) for n in names):
            return None
    return sources, buffers


def _write_safetensors(path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors) -> None:
    """Writes a `model.safetensors` whose tensors arrive one at a time, in `layout` order.

    The format is an 8-byte little-endian header length, a JSON header (name → dtype, shape, byte range), then the
    tensors' bytes. Every name, dtype and shape is known before any value is (the ingredients' files say), so the
    header is written first and each tensor is appended as it is computed and then dropped: no shard is held in
    memory (`safetensors.torch.save_file` needs the whole dict, and serialises it once more)."""
    names = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in layout:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for (name, dtype, shape), (got_name, tensor) in zip(layout, tensors, strict=True):
            if got_name != name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise RuntimeError(f"soup tensor '{got_name}' {tensor.dtype} {tuple(tensor.shape)} does not match "
                                   f"the header's '{name}' {dtype} {shape}")
            f.write(tensor.contiguous().view(torch.uint8).reshape(-1).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def _streamed_tensors(sources, buffers: set[str], weights: list[float], out_dtype: torch.dtype):
    """(name, soup tensor in `out_dtype`) for every stored tensor, in the first ingredient's order: per tensor, the
    same running weighted mean with the same fp32 operations as `_build_in_memory`, so bit-exactly its result."""
    soup_start = next(k for k, w in enumerate(weights) if w > 0.0)
    for name in sources[0].names():
        if name in buffers:  # not trained: the first ingredient's, as in `_build_in_memory`
            value = sources[0].get_fp32(name)
        else:
            value, cumulative = None, weights[0]
            for k, (source, w) in enumerate(zip(sources, weights)):
                if k > 0:
                    cumulative += w
                if w == 0.0:
                    continue
                if k == soup_start:
                    value = source.get_fp32(name)  # first positive weight: S = θ_k exactly
                else:  # S += (w_k / W_k)(θ_k − S)
                    value.add_(source.get_fp32(name).sub_(value), alpha=w / cumulative)
        yield name, value.to(out_dtype) if value.is_floating_point() else value


def _generation_config(ingredient: Ingredient):
    """The first ingredient's `generation_config.json` (for an adapter: its base's), which the in-memory soup
    inherits from `from_pretrained`: sampling from the reference (`best_of_n`) must stop at the same end-of-turn
    ids (a chat model's list often has more than config.json's `eos_token_id`). None when there is none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(ingredient.model_source, revision=ingredient.revision)
    except (OSError, ValueError):
        return None


def write_soup_weights(out: str | Path, checkpoints: list[str], weights: list[float] | None = None, *,
                       attn_implementation: str = "sdpa", checked=None) -> bool:
    """Writes the soup's config, generation config and weights (no tokenizer) atomically to `out`, a folder
    `from_pretrained` loads.

    The same soup as `build_soup`, bit for bit (same fp32 running mean, same cast to the first ingredient's dtype),
    but streamed: for each stored tensor name, each ingredient's tensor is read from its files, mixed into the
    running mean, cast, and appended to `model.safetensors` (`_write_safetensors`), so memory holds a few tensors
    (the running fp32 mean, one ingredient's fp32 copy, the cast result), never a model (an adapter ingredient adds
    its adapter and one layer, see `_AdapterSource`). When an ingredient cannot be read that way
    (no safetensors/.bin files found, tensors stored under other names than the model's, a LoRA layer that is not a
    plain Linear/Embedding stored by name) the soup is built in memory by `build_soup`'s code and saved instead
    (memory: two fp32 models). Returns True when the soup was streamed.

    `checked`: the result of `check_ingredients(checkpoints, weights)` when the caller has it already.
    """
    weights, ingredients, first_config = checked or check_ingredients(checkpoints, weights)
    with torch.no_grad():
        plan = _stream_sources(ingredients, first_config, attn_implementation)  # errors before any file is written
        with atomic_directory(out) as tmp:
            _write_soup_into(tmp, plan, ingredients, weights, first_config, attn_implementation)
    return plan is not None


def _write_soup_into(folder: Path, plan, ingredients, weights, first_config, attn_implementation: str) -> None:
    """`write_soup_weights` into an existing (temporary) folder: streamed when `plan` (`_stream_sources`) is one."""
    if plan is None:
        _build_in_memory(ingredients, weights, first_config, attn_implementation).save_pretrained(folder)
        return
    sources, buffers = plan
    out_dtype = _soup_dtype(first_config)
    layout = []
    for name in sources[0].names():
        stored = sources[0].dtype(name)
        layout.append((name, out_dtype if stored.is_floating_point else stored, sources[0].shape(name)))
    _write_safetensors(folder / "model.safetensors", layout, _streamed_tensors(sources, buffers, weights, out_dtype))
    config = copy.deepcopy(first_config)
    config.dtype = out_dtype  # what `from_pretrained(dtype="auto")` reads
    config.save_pretrained(folder)
    generation_config = _generation_config(ingredients[0])
    if generation_config is not None:
        generation_config.save_pretrained(folder)


def write_soup(out: str | Path, checkpoints: list[str], weights: list[float] | None = None) -> Path:
    """`align soup`: writes the soup (model, tokenizer, soup.json) atomically to `out`, streamed tensor by tensor as
    `write_soup_weights` does (the same bytes the `soup` reference loads)."""
    from transformers import AutoTokenizer

    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out '{out}' already exists; choose a new directory (nothing was overwritten)")
    weights, ingredients, first_config = check_ingredients(checkpoints, weights)
    tokenizer = _load_tokenizer(ingredients[0], AutoTokenizer)
    adapters = {}
    for c in checkpoints:  # cheap (files only); records what each adapter was merged onto
        ingredient = resolve_ingredient(c)
        if ingredient.adapter is not None:
            adapters[str(c)] = {"base_model_name_or_path": ingredient.model_source, "revision": ingredient.revision}
    with torch.no_grad():
        plan = _stream_sources(ingredients, first_config, "sdpa")
        with atomic_directory(out) as tmp:
            _write_soup_into(tmp, plan, ingredients, weights, first_config, "sdpa")
            tokenizer.save_pretrained(tmp)
            manifest = {"checkpoints": [str(c) for c in checkpoints], "weights": weights}
            if adapters:
                manifest["lora_adapters"] = adapters
            atomic_write_json(tmp / "soup.json", manifest)
    return out

