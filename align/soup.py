"""Model soups (SALSA, Chegini et al. 2024): θ_soup = Σ_k w_k θ_k over checkpoints of one architecture.

SALSA anchors alignment to the weight average of several SFT models (main setting: two seeds, w = (½, ½)) instead of
one SFT model. `align soup --out DIR CKPT... [--weights ...]` writes a soup as a normal `save_pretrained` checkpoint;
the reference kind `soup` builds one in memory. Averaging is done in fp32 (METHODS §3) and cast once to the first
ingredient's dtype; buffers are taken from the first ingredient (they are not trained).

An ingredient is either a full `save_pretrained` checkpoint or a PEFT LoRA adapter folder (`adapter_config.json`).
An adapter ingredient k contributes its *merged* weights W0 + s_k B_k A_k (W0: its base model, named by
`base_model_name_or_path`; s_k = lora_alpha / r, or / √r with rsLoRA), merged in fp32 with peft's `merge_and_unload`.
Averaging the factors A and B separately would be wrong: B A is bilinear, so the mean of the factors' product is not
the product of their means (METHODS §2 toolkit note, §3).
"""

from __future__ import annotations

import json
import math
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


def _load_fp32(ingredient: Ingredient, attn_implementation: str):
    """The ingredient's full weights in fp32: the checkpoint, or the adapter's base with the adapter merged in.

    peft loads the adapter onto the fp32 base (fp16/bf16 adapter weights are upcast) and `merge_and_unload` adds
    s·B·A to each targeted weight in fp32, leaving a plain transformers model with the base's parameter names.
    """
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(ingredient.model_source, revision=ingredient.revision,
                                                     dtype=torch.float32, attn_implementation=attn_implementation)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{ingredient.describe()}: cannot load weights ({str(e).splitlines()[0]})") from None
    if ingredient.adapter is None:
        return model
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    try:
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
        return peft_model.merge_and_unload(safe_merge=True)  # safe_merge: refuse a merge that produces NaN/inf
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ConfigError(f"{ingredient.describe()}: cannot load or merge the adapter "
                          f"({str(e).splitlines()[0]})") from None


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

    weights = soup_weights(weights, len(checkpoints))
    ingredients = [resolve_ingredient(c) for c in checkpoints]
    first = ingredients[0]
    first_config = _load_config(first)
    first_vocab = _load_vocab(first)
    for ingredient in ingredients[1:]:  # all checks before any weights are loaded
        if _architecture(_load_config(ingredient)) != _architecture(first_config):
            raise ConfigError(f"{ingredient.describe()} has a different architecture from '{first.path}'")
        if _load_vocab(ingredient) != first_vocab:
            raise ConfigError(f"{ingredient.describe()} has a different tokenizer from '{first.path}'")

    soup = _load_fp32(first, attn_implementation)
    out_dtype = getattr(first_config, "dtype", None) or getattr(first_config, "torch_dtype", None) or torch.float32
    if isinstance(out_dtype, str):
        out_dtype = getattr(torch, out_dtype)
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
    return soup.to(out_dtype), _load_tokenizer(first, AutoTokenizer)


def write_soup(out: str | Path, checkpoints: list[str], weights: list[float] | None = None) -> Path:
    """`align soup`: builds the soup and writes it (model, tokenizer, soup.json) atomically to `out`."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out '{out}' already exists; choose a new directory (nothing was overwritten)")
    weights = soup_weights(weights, len(checkpoints))
    model, tokenizer = build_soup(checkpoints, weights)
    adapters = {}
    for c in checkpoints:  # cheap (files only); records what each adapter was merged onto
        ingredient = resolve_ingredient(c)
        if ingredient.adapter is not None:
            adapters[str(c)] = {"base_model_name_or_path": ingredient.model_source, "revision": ingredient.revision}
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {"checkpoints": [str(c) for c in checkpoints], "weights": weights}
        if adapters:
            manifest["lora_adapters"] = adapters
        atomic_write_json(tmp / "soup.json", manifest)
    return out


def soup_manifest(path: str | Path) -> dict | None:
    f = Path(path) / "soup.json"
    return json.loads(f.read_text()) if f.exists() else None
