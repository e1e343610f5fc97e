"""Model soups (SALSA, Chegini et al. 2024): θ_soup = Σ_k w_k θ_k over checkpoints of one architecture.

SALSA anchors alignment to the weight average of several SFT models (main setting: two seeds, w = (½, ½)) instead of
one SFT model. `align soup --out DIR CKPT... [--weights ...]` writes a soup as a normal `save_pretrained` checkpoint;
the reference kind `soup` builds one in memory. Averaging is done in fp32 (METHODS §3) and cast once to the first
ingredient's dtype; buffers are taken from the first ingredient (they are not trained).
"""

from __future__ import annotations

import json
import math
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


def _check_ingredient(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"soup ingredient '{path}': no such checkpoint directory")
    if (p / "adapter_config.json").exists():
        raise ConfigError(f"soup ingredient '{path}' is a LoRA adapter; merge it first (peft merge_and_unload) — "
                          "averaging merged LoRA deltas is not available yet")
    if not (p / "config.json").exists():
        raise ConfigError(f"soup ingredient '{path}': no config.json, not a save_pretrained checkpoint")
    return p


_CONFIG_KEYS_IGNORED = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"}


def _architecture(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _CONFIG_KEYS_IGNORED}


def build_soup(checkpoints: list[str], weights: list[float] | None = None, *, attn_implementation: str = "sdpa"):
    """Returns (model, tokenizer) of the soup Σ_k w_k θ_k, averaged in fp32 and cast to the first ingredient's dtype.

    Ingredients are loaded one at a time, so memory holds the running fp32 sum and one ingredient.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    weights = soup_weights(weights, len(checkpoints))
    paths = [_check_ingredient(c) for c in checkpoints]
    first_config = AutoConfig.from_pretrained(paths[0])
    first_vocab = AutoTokenizer.from_pretrained(paths[0]).get_vocab()
    for path in paths[1:]:  # all checks before any weights are loaded
        if _architecture(AutoConfig.from_pretrained(path)) != _architecture(first_config):
            raise ConfigError(f"soup ingredient '{path}' has a different architecture from '{paths[0]}'")
        if AutoTokenizer.from_pretrained(path).get_vocab() != first_vocab:
            raise ConfigError(f"soup ingredient '{path}' has a different tokenizer from '{paths[0]}'")

    soup = AutoModelForCausalLM.from_pretrained(paths[0], dtype=torch.float32, attn_implementation=attn_implementation)
    out_dtype = getattr(first_config, "dtype", None) or getattr(first_config, "torch_dtype", None) or torch.float32
    if isinstance(out_dtype, str):
        out_dtype = getattr(torch, out_dtype)
    params = dict(soup.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.mul_(weights[0])
        for path, w in zip(paths[1:], weights[1:]):
            ingredient = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            other = dict(ingredient.named_parameters())
            if other.keys() != params.keys() or any(other[n].shape != p.shape for n, p in params.items()):
                raise ConfigError(f"soup ingredient '{path}' has different parameter names or shapes")
            for name, p in params.items():
                p.add_(other[name], alpha=w)
            del ingredient, other
    return soup.to(out_dtype), AutoTokenizer.from_pretrained(paths[0])


def write_soup(out: str | Path, checkpoints: list[str], weights: list[float] | None = None) -> Path:
    """`align soup`: builds the soup and writes it (model, tokenizer, soup.json) atomically to `out`."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out '{out}' already exists; choose a new directory (nothing was overwritten)")
    weights = soup_weights(weights, len(checkpoints))
    model, tokenizer = build_soup(checkpoints, weights)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "soup.json", {"checkpoints": [str(c) for c in checkpoints], "weights": weights})
    return out


def soup_manifest(path: str | Path) -> dict | None:
    f = Path(path) / "soup.json"
    return json.loads(f.read_text()) if f.exists() else None
