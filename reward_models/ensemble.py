"""Reward-model ensembles (METHODS §8, Coste et al. 2023): K scalar reward models from one base checkpoint.

Three ways to hold K members (`ENSEMBLE_KINDS`), all built from the same base model (a causal-LM or SFT checkpoint,
loaded with `AutoModelForSequenceClassification`, which adds a fresh linear `score` head):

- `seeds`: K independent full models, member k's head initialised from torch seed `seeds[k]`. This is the Coste
  setup (members differ only by seed: head init and data order; METHODS §8). Memory and compute: K backbones.
- `multi_head`: ONE backbone with a [K, hidden] head (`num_labels = K`), row k initialised from `seeds[k]`. One
  backbone forward gives all K rewards (K× cheaper to score than `seeds`), but the members share every backbone
  weight, so they disagree less than independently trained models: a cheaper, weaker ensemble.
- `lora`: ONE frozen base with K LoRA adapters ("member-0", ...), each with its own copy of the score head (PEFT
  `task_type="SEQ_CLS"` puts the head in `modules_to_save`); adapter k and its head are initialised from `seeds[k]`.
  Memory: one backbone plus K adapters. Compute: K backbone forwards (one per adapter, as `seeds`), because every
  adapted layer changes the hidden states.

The head init for a given seed is the same in every kind (`reward_models.modeling.init_head_rows`), so K distinct
seeds give K distinct heads; seeds must be distinct. Rewards are read at each row's last attended token
(`reward_models.modeling.last_token_hidden`) and returned in fp32 whatever the weights' dtype (METHODS §0).

Which parameters member k's reward depends on (its gradient reaches nothing else; tested): `seeds`: `members[k]`;
`multi_head`: the shared backbone and row k of the head; `lora`: the parameters whose name holds the adapter name
`member-k` (its LoRA factors and its head copy); the base is frozen.

LoRA forward: the adapter is switched by setting each PEFT layer's `_active_adapter` directly
(`align.modeling.adapter_active`, as `align/references/tr_dpo_lora.py` does), never with PEFT's `set_adapter`, which
also rewrites `requires_grad` of the adapters on every call. Every member's adapter and head stay trainable.
Activation checkpointing is refused with K > 1 LoRA members (`check_activation_checkpointing`): its recomputation in
backward would run with whichever adapter is active at that time.

Saving and loading: `save` writes, and `load` checks before reading any weight, the directory format of
`reward_models.manifest`; `load` then checks the loaded weights against the manifest (number of heads or adapters).
Any mismatch is one `AlignError` naming the directory and the file.

Scoring tokenizes as training did (`align.data.tokenize_pairs`, the policy's rules) and truncates as training did:
`score` keeps the last `max_length` tokens of a longer row, `max_length` being the manifest's unless the caller gives
one (`score(max_length=...)`, `align rm score --max-length`).
"""

from __future__ import annotations

import abc
import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from align.data import tokenize_pairs
from align.errors import AlignError, ConfigError
from align.io import atomic_directory
from align.modeling import LoraSection, ModelConfig, adapter_active, dtype_name, load_tokenizer, resolve_dtype
from reward_models.aggregate import aggregate, check_aggregation, member_statistics, split_aggregation
from reward_models.aggregate import normalize as normalize_scores
from reward_models.manifest import (
    ENSEMBLE_KINDS,
    TRUNCATION_SIDES,
    check_files,
    member_name,
    read_manifest,
    write_manifest,
)
from reward_models.modeling import (
    init_head_rows,
    initializer_range,
    last_token_hidden,
    load_seq_cls,
    one_line,
    pad_right,
    score_head,
    set_pad,
)


def check_activation_checkpointing(kind: str, num_members: int, *, key: str = "activation checkpointing") -> None:
    """Refuses activation checkpointing for a LoRA ensemble of more than one member: the backward recomputation
    would run with whichever adapter is active then, not the member's. `key` names the setting in the error (the
    recipe key when a config is checked)."""
    if kind == "lora" and num_members > 1:
        raise ConfigError(f"{key}: not available for a LoRA ensemble with more than one member (the backward "
                          f"recomputation would run with the wrong adapter); use kind seeds or multi_head, or turn "
                          f"it off")


# ---------------------------------------------------------------------------------------------------------------
# The ensemble


class RewardEnsemble(torch.nn.Module, abc.ABC):
    """K reward models scoring (prompt, response) pairs; `forward` gives `[N, K]` rewards, `score` adds the
    aggregate. Build with `RewardEnsemble.build(kind, ...)`, reload with `RewardEnsemble.load(directory)`.

    Attributes: `kind` (one of ENSEMBLE_KINDS), `num_members` (K), `seeds` (K ints), `aggregation`
    (`{"method": ..., **params}`, validated, defaults filled in), `normalization` (`{"mean": [K], "std": [K]}` or
    None), `tokenizer`, `base_model` (name or path the members were built from), `max_length` and
    `truncation_side` (how rows are cut: the training data's `max_length`, saved in the manifest; None: no limit).
    """

    kind: str = ""

    def __init__(self, tokenizer, *, seeds: Sequence[int], aggregation: dict | None, normalization: dict | None,
                 base_model: str, attn_implementation: str, max_length: int | None = None,
                 truncation_side: str = "left"):
        super().__init__()
        self.max_length: int | None = None
        self.truncation_side = "left"
        self.set_tokenization(max_length, truncation_side)
        self.tokenizer = tokenizer
        self.seeds = [int(s) for s in seeds]
        self.num_members = len(self.seeds)
        self.base_model = base_model
        self.attn_implementation = attn_implementation
        self.aggregation: dict[str, Any] = {}
        self.set_aggregation(aggregation)
        self.normalization: dict[str, list[float]] | None = None
        if normalization is not None:
            self.set_normalization(normalization["mean"], normalization["std"])

    # --- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, kind: str, model_config: ModelConfig, num_members: int, *, seeds: Sequence[int],
              aggregation: dict | None = None, lora: LoraSection | None = None) -> RewardEnsemble:
        """K fresh reward members from the base model `model_config.name_or_path` (see the module docstring).

        `seeds[k]` initialises member k's head (and, for `lora`, its adapter); `aggregation` defaults to the mean;
        `lora` (kind `lora` only) gives rank/alpha/targets, default `model_config.lora` or `LoraSection()`.
        """
        if kind not in ENSEMBLE_KINDS:
            raise ConfigError(f"kind: unknown reward ensemble kind '{kind}'; known: {', '.join(ENSEMBLE_KINDS)}")
        if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
            raise ConfigError(f"num_members: must be an integer >= 1, got {num_members!r}")
        seeds = list(seeds) if seeds is not None else []
        if len(seeds) != num_members:
            raise ConfigError(f"seeds: need one seed per member ({num_members}), got {len(seeds)}")
        if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
            raise ConfigError(f"seeds: must be integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds: must be distinct (members with the same seed start identical), got {seeds}")
        if kind != "lora" and (lora is not None or model_config.lora is not None):
            raise ConfigError(f"lora: LoRA settings are for kind 'lora' only, but kind is '{kind}'")
        # Validate the aggregation (against K) before spending time loading weights.
        check_aggregation(*split_aggregation(aggregation), num_members=num_members)
        if kind == "lora" and lora is None:
            lora = model_config.lora or LoraSection()
        tokenizer = load_tokenizer(model_config)
        tokenizer.padding_side = "right"
        return _KIND_CLASSES[kind]._build(model_config, tokenizer, seeds, aggregation, lora)

    @classmethod
    @abc.abstractmethod
    def _build(cls, model_config: ModelConfig, tokenizer, seeds: list[int], aggregation: dict | None,
               lora: LoraSection | None) -> RewardEnsemble:
        """Kind-specific part of `build` (arguments already validated)."""

    # --- members --------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def backbones(self) -> list[torch.nn.Module]:
        """The distinct transformer bodies (K for `seeds`, 1 for `multi_head` and `lora`)."""

    def _check_member(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_members:
            raise IndexError(f"member index {k!r} out of range for {self.num_members} members")

    # --- forward and scoring --------------------------------------------------------------------------------------

    @abc.abstractmethod
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards of right-padded rows `input_ids[N, T]`, `attention_mask[N, T]` → `[N, K]` fp32, member k in
        column k, read at each row's last attended token. Differentiable."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def score(self, prompts: Sequence, responses: Sequence, *, batch_size: int = 16, progress: bool = False,
              normalize: bool | None = None, max_length: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores B (prompt, response) pairs → `(per_member[B, K], aggregate[B])`, CPU fp32, in input order.

        Rows are tokenized by `align.data.tokenize_pairs` (as in training), sorted by length (longest first, so a
        batch that does not fit fails at once and padding is minimal) and scored `batch_size` at a time in eval mode
        (the module's train/eval mode is restored after). `normalize` (default: whether `self.normalization` is set)
        z-scores each member with the stored statistics before aggregating; `per_member` is then the normalised
        scores. `max_length`: a longer row keeps its last `max_length` tokens (`tokenize_pairs`); None: the
        ensemble's own `max_length` (the one it was trained with, from its manifest; None there: no truncation).
        """
        if max_length is None:
            max_length = self.max_length
        ids = tokenize_pairs(self.tokenizer, prompts, responses, max_length, source="<score>")
        return self.score_ids(ids, batch_size=batch_size, progress=progress, normalize=normalize)

    @torch.no_grad()
    def score_ids(self, ids: Sequence[Sequence[int]], *, batch_size: int = 16, progress: bool = False,
                  normalize: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`score` of rows that are already token ids of this ensemble's tokenizer (prompt + response, ending with
        EOS, as `tokenize_pairs` makes them) → `(per_member[B, K], aggregate[B])`. On-policy training scores its
        samples' own ids here when the policy shares the tokenizer, so nothing is decoded and re-tokenized."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size: must be a positive integer, got {batch_size!r}")
        if normalize is None:
            normalize = self.normalization is not None
        if normalize and self.normalization is None:
            raise AlignError("score: normalize=True but this ensemble has no normalization statistics (compute them "
                             "with fit_normalization on a reference set)")
        ids = [list(row) for row in ids]
        scores = torch.empty(len(ids), self.num_members, dtype=torch.float32)
        if ids:
            order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
            device, pad = self.device, self.tokenizer.pad_token_id
            was_training = self.training
            self.eval()
            try:
                from tqdm.auto import tqdm

                with tqdm(total=len(ids), desc="scoring", unit="row", disable=not progress) as bar:
                    for start in range(0, len(order), batch_size):
                        rows = order[start:start + batch_size]
                        input_ids, attention_mask = pad_right([ids[i] for i in rows], pad, device)
                        scores[rows] = self(input_ids, attention_mask).float().cpu()
                        bar.update(len(rows))
            finally:
                self.train(was_training)
        if normalize:
            scores = normalize_scores(scores, self.normalization["mean"], self.normalization["std"])
        method, params = split_aggregation(self.aggregation)
        return scores, aggregate(scores, method, **params)

    # --- aggregation and normalisation ----------------------------------------------------------------------------

    def set_aggregation(self, aggregation: dict | None) -> None:
        """Sets `{"method": ..., **params}` (None: mean), validated against K; defaults are filled in."""
        method, params = split_aggregation(aggregation)
        self.aggregation = {"method": method, **check_aggregation(method, params, num_members=self.num_members)}

    def set_tokenization(self, max_length: int | None, truncation_side: str = "left") -> None:
        """Sets how this ensemble cuts rows (saved in the manifest; `score`'s default): `max_length` a positive int or
        None (no limit), `truncation_side` one of TRUNCATION_SIDES."""
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ConfigError(f"max_length: must be a positive integer or None, got {max_length!r}")
        if truncation_side not in TRUNCATION_SIDES:
            raise ConfigError(f"truncation_side: must be one of {', '.join(TRUNCATION_SIDES)}, got "
                              f"{truncation_side!r}")
        self.max_length, self.truncation_side = max_length, truncation_side

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Stores per-member statistics (K means, K stds > 0) used by `score` to z-score members."""
        mean, std = [float(x) for x in mean], [float(x) for x in std]
        if len(mean) != self.num_members or len(std) != self.num_members:
            raise AlignError(f"normalization: needs {self.num_members} means and stds (one per member), got "
                             f"{len(mean)} and {len(std)}")
        if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
            raise AlignError("normalization: means must be finite and stds finite and > 0")
        self.normalization = {"mean": mean, "std": std}

    def fit_normalization(self, prompts: Sequence, responses: Sequence, *, batch_size: int = 16,
                          progress: bool = False, max_length: int | None = None) -> dict[str, list[float]]:
        """Scores a fixed reference set without normalisation and stores each member's mean and std (METHODS §8:
        optional, off by default; WCO/UWO are scale-sensitive). Returns the statistics."""
        scores, _ = self.score(prompts, responses, batch_size=batch_size, progress=progress, normalize=False,
                               max_length=max_length)
        mean, std = member_statistics(scores)
        self.set_normalization(mean.tolist(), std.tolist())
        return self.normalization

    # --- activation checkpointing (for trainers) -------------------------------------------------------------------

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Enables activation checkpointing in every member model (refused for LoRA with K > 1:
        `check_activation_checkpointing`)."""
        check_activation_checkpointing(self.kind, self.num_members)
        for model in self._pretrained_models():
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        for model in self._pretrained_models():
            model.gradient_checkpointing_disable()

    @abc.abstractmethod
    def _pretrained_models(self) -> list[torch.nn.Module]:
        """The transformers models held (for checkpointing switches)."""

    # --- saving and loading ---------------------------------------------------------------------------------------

    def save(self, directory: str | Path, *, overwrite: bool = False) -> None:
        """Writes the ensemble to `directory` atomically (the layout of `reward_models.manifest`). Refuses an
        existing directory that is not empty (or a file) unless `overwrite`, which replaces it in one rename."""
        directory = Path(directory)
        if directory.exists() and not overwrite and (not directory.is_dir() or any(directory.iterdir())):
            raise AlignError(f"reward ensemble '{directory}': already exists and is not empty; choose a new "
                             "directory (an ensemble is never overwritten)")
        with atomic_directory(directory) as tmp:
            members = self._save_weights(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_manifest(tmp, {
                "kind": self.kind,
                "num_members": self.num_members,
                "members": members,
                "seeds": self.seeds,
                "aggregation": self.aggregation,
                "normalization": self.normalization,
                "base_model": self.base_model,
                "dtype": dtype_name(next(self.parameters()).dtype),
                "attn_implementation": self.attn_implementation,
                "max_length": self.max_length,
                "truncation_side": self.truncation_side,
            })

    @abc.abstractmethod
    def _save_weights(self, directory: Path) -> list[dict[str, Any]]:
        """Writes the weights under `directory` → the manifest's member entries (name, path, seed, ...)."""

    @classmethod
    def load(cls, directory: str | Path, *, dtype: str | torch.dtype = "auto", device=None,
             verify: bool = True) -> RewardEnsemble:
        """Loads an ensemble written by `save` (local files only, no network).

        `dtype`: `auto` (float32 on CPU, bfloat16 on a GPU that supports it), a torch dtype or its name
        (`align.modeling.resolve_dtype`, the policy's rule); `device`: default CUDA when available, else CPU;
        `verify`: check the sha256 of every file against the manifest (sizes are always checked). Any mismatch
        between the manifest and the files is an AlignError (`reward_models.manifest`).
        """
        from transformers import AutoTokenizer

        directory = Path(directory)
        manifest = read_manifest(directory)
        check_files(directory, manifest, verify=verify)
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = resolve_dtype(dtype, device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as e:
            raise AlignError(f"reward ensemble '{directory}': cannot load its tokenizer ({one_line(e)})") from e
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        ensemble = _KIND_CLASSES[manifest["kind"]]._load_weights(directory, manifest, tokenizer, torch_dtype)
        return ensemble.to(device)

    @classmethod
    @abc.abstractmethod
    def _load_weights(cls, directory: Path, manifest: dict, tokenizer, dtype: torch.dtype) -> RewardEnsemble:
        """Kind-specific part of `load` (manifest and files already checked); checks the weights' structure."""

    def extra_repr(self) -> str:
        return f"kind={self.kind}, num_members={self.num_members}, aggregation={self.aggregation}"


def _manifest_kwargs(manifest: dict) -> dict[str, Any]:
    return {"seeds": manifest["seeds"], "aggregation": manifest["aggregation"],
            "normalization": manifest["normalization"], "base_model": manifest["base_model"],
            "attn_implementation": manifest.get("attn_implementation", "sdpa"),
            # Manifests written before these keys: no truncation, as scoring then did.
            "max_length": manifest.get("max_length"), "truncation_side": manifest.get("truncation_side", "left")}


# ---------------------------------------------------------------------------------------------------------------
# Kind `seeds`: K independent models


class SeedsEnsemble(RewardEnsemble):
    """K independent full reward models (`members[k]`), head k initialised from `seeds[k]`."""

    kind = "seeds"

    def __init__(self, members: list, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.members = torch.nn.ModuleList(members)

    @classmethod
    def _build(cls, model_config, tokenizer, seeds, aggregation, lora):
        members = []
        for k, seed in enumerate(seeds):
            model = load_seq_cls(model_config.name_or_path, num_labels=1, dtype=model_config.torch_dtype(),
                                 attn_implementation=model_config.attn_implementation,
                                 revision=model_config.revision, trust_remote_code=model_config.trust_remote_code,
                                 where="model.name_or_path")
            set_pad(model, tokenizer)
            init_head_rows(score_head(model, "model.name_or_path"), [seed], initializer_range(model))
            members.append(model)
        return cls(members, tokenizer, seeds=seeds, aggregation=aggregation, normalization=None,
                   base_model=model_config.name_or_path, attn_implementation=model_config.attn_implementation)

    def backbones(self):
        return [m.base_model for m in self.members]

    def forward(self, input_ids, attention_mask):
        columns = [model.score(last_token_hidden(model.base_model, input_ids, attention_mask))
                   for model in self.members]  # K x [N, 1]
        return torch.cat(columns, dim=-1).float()

    def _pretrained_models(self):
        return list(self.members)

    def _save_weights(self, directory):
        entries = []
        for k, (model, seed) in enumerate(zip(self.members, self.seeds)):
            model.save_pretrained(directory / member_name(k))
            entries.append({"name": member_name(k), "path": member_name(k), "seed": seed})
        return entries

    @classmethod
    def _load_weights(cls, directory, manifest, tokenizer, dtype):
        members = []
        for entry in manifest["members"]:
            model = load_seq_cls(directory / entry["path"], num_labels=None, dtype=dtype,
                                 attn_implementation=manifest.get("attn_implementation", "sdpa"),
                                 where=f"reward ensemble '{directory}'", local_files_only=True)
            rows = score_head(model, f"reward ensemble '{directory}'").weight.shape[0]
            if rows != 1:
                raise AlignError(f"reward ensemble '{directory}': {entry['path']}/ has {rows} reward heads, a "
                                 "'seeds' member must have exactly 1")
            set_pad(model, tokenizer)
            members.append(model)
        return cls(members, tokenizer, **_manifest_kwargs(manifest))


# ---------------------------------------------------------------------------------------------------------------
# Kind `multi_head`: one backbone, K heads


class MultiHeadEnsemble(RewardEnsemble):
    """One backbone with a `[K, hidden]` score head; row k is member k, initialised from `seeds[k]`. Member k's
    reward depends on the shared backbone and on row k of the head (its gradient reaches the other rows as zeros)."""

    kind = "multi_head"

    def __init__(self, model, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.model = model
        score_head(model, "multi_head model")

    @classmethod
    def _build(cls, model_config, tokenizer, seeds, aggregation, lora):
        model = load_seq_cls(model_config.name_or_path, num_labels=len(seeds), dtype=model_config.torch_dtype(),
                             attn_implementation=model_config.attn_implementation, revision=model_config.revision,
                             trust_remote_code=model_config.trust_remote_code, where="model.name_or_path")
        set_pad(model, tokenizer)
        init_head_rows(score_head(model, "model.name_or_path"), seeds, initializer_range(model))
        return cls(model, tokenizer, seeds=seeds, aggregation=aggregation, normalization=None,
                   base_model=model_config.name_or_path, attn_implementation=model_config.attn_implementation)

    def backbones(self):
        return [self.model.base_model]

    def forward(self, input_ids, attention_mask):
        # ONE backbone forward for all K heads: the point of this kind (tested with a forward hook).
        return self.model.score(last_token_hidden(self.model.base_model, input_ids, attention_mask)).float()

    def _pretrained_models(self):
        return [self.model]

    def _save_weights(self, directory):
        self.model.save_pretrained(directory / "model")
        return [{"name": member_name(k), "path": "model", "head_row": k, "seed": seed}
                for k, seed in enumerate(self.seeds)]

    @classmethod
    def _load_weights(cls, directory, manifest, tokenizer, dtype):
        model = load_seq_cls(directory / "model", num_labels=None, dtype=dtype,
                             attn_implementation=manifest.get("attn_implementation", "sdpa"),
                             where=f"reward ensemble '{directory}'", local_files_only=True)
        rows = score_head(model, f"reward ensemble '{directory}'").weight.shape[0]
        if rows != manifest["num_members"]:
            raise AlignError(f"reward ensemble '{directory}': model/ has {rows} reward heads but the manifest lists "
                             f"{manifest['num_members']} members")
        set_pad(model, tokenizer)
        return cls(model, tokenizer, **_manifest_kwargs(manifest))


# ---------------------------------------------------------------------------------------------------------------
# Kind `lora`: one frozen base, K LoRA adapters each with its own head


#: The parameter names of the `member-k` adapters: LoRA factors and each adapter's copy of the score head
#: (`...lora_A.member-0.weight`, `...score.modules_to_save.member-0.weight`).
_ADAPTER_PARAMETER = re.compile(r"\.(lora_[A-Za-z_]+|modules_to_save)\.member-\d+(\.|$)")


class LoraEnsemble(RewardEnsemble):
    """One frozen base seq-cls model with K LoRA adapters `member-k`, each with its own score-head copy.

    `forward` runs K backbone forwards, one per adapter (the adapter changes the hidden states); the adapter is
    switched through the PEFT layers' `_active_adapter`, never `set_adapter` (module docstring)."""

    kind = "lora"

    def __init__(self, model, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self.model = model  # a PeftModelForSequenceClassification
        score_head(model.get_base_model(), "lora model")
        # Every module that computes with "the active adapter": LoRA layers and the head's modules_to_save wrapper.
        self._switchable = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
        missing = [member_name(k) for k in range(self.num_members) if member_name(k) not in model.peft_config]
        if missing:
            raise AlignError(f"lora ensemble: adapter '{missing[0]}' is missing")
        for name, param in model.named_parameters():
            # Base frozen; every member's factors and head trainable (set here, not by PEFT's set_adapter).
            param.requires_grad_(bool(_ADAPTER_PARAMETER.search(name)))

    @classmethod
    def _build(cls, model_config, tokenizer, seeds, aggregation, lora):
        from peft import LoraConfig, get_peft_model

        base = load_seq_cls(model_config.name_or_path, num_labels=1, dtype=model_config.torch_dtype(),
                            attn_implementation=model_config.attn_implementation, revision=model_config.revision,
                            trust_remote_code=model_config.trust_remote_code, where="model.name_or_path")
        set_pad(base, tokenizer)
        std = initializer_range(base)
        # task_type SEQ_CLS: PEFT keeps `score` out of "all-linear" and gives each adapter its own trainable copy.
        config = LoraConfig(task_type="SEQ_CLS", r=lora.r, lora_alpha=lora.lora_alpha,
                            lora_dropout=lora.lora_dropout, target_modules=lora.target_modules)
        model = None
        for k, seed in enumerate(seeds):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # LoRA A init (B = 0 as usual) of adapter k
                if model is None:
                    model = get_peft_model(base, config, adapter_name=member_name(k))
                else:
                    model.add_adapter(member_name(k), config)
            head = score_head(model.get_base_model(), "model.name_or_path")
            init_head_rows(head.modules_to_save[member_name(k)], [seed], std)
        return cls(model, tokenizer, seeds=seeds, aggregation=aggregation, normalization=None,
                   base_model=model_config.name_or_path, attn_implementation=model_config.attn_implementation)

    @contextlib.contextmanager
    def member_active(self, k: int) -> Iterator[None]:
        """Within the block every PEFT layer computes with adapter `member-k` (restored in `finally`)."""
        self._check_member(k)
        with adapter_active(self._switchable, member_name(k)):
            yield

    def backbones(self):
        return [self.model.get_base_model().base_model]

    def forward(self, input_ids, attention_mask):
        inner = self.model.get_base_model()  # the seq-cls model, LoRA layers injected; its body and its head
        backbone, head = inner.base_model, inner.score
        columns = []
        for k in range(self.num_members):
            with self.member_active(k):
                columns.append(head(last_token_hidden(backbone, input_ids, attention_mask)))
        return torch.cat(columns, dim=-1).float()

    def _pretrained_models(self):
        return [self.model.get_base_model()]

    def _save_weights(self, directory):
        inner = self.model.get_base_model()
        # The base without adapters, under the names of a plain seq-cls model: LoRA-wrapped layers keep their base
        # weight under `.base_layer.`, the head's original under `.original_module.` (adapter copies are saved below).
        state = {}
        for name, tensor in inner.state_dict().items():
            if ".lora_" in name or ".modules_to_save." in name:
                continue
            state[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
        inner.save_pretrained(directory / "base", state_dict=state)
        names = [member_name(k) for k in range(self.num_members)]
        # Non-default adapter names go to adapters/<name>/ (PEFT's layout); no embedding layers (nothing to look up).
        self.model.save_pretrained(directory / "adapters", selected_adapters=names, save_embedding_layers=False)
        with contextlib.suppress(FileNotFoundError):
            (directory / "adapters" / "README.md").unlink()  # PEFT's model card, not part of the ensemble
        return [{"name": name, "path": f"adapters/{name}", "seed": seed} for name, seed in zip(names, self.seeds)]

    @classmethod
    def _load_weights(cls, directory, manifest, tokenizer, dtype):
        from peft import PeftModel

        where = f"reward ensemble '{directory}'"
        base = load_seq_cls(directory / "base", num_labels=None, dtype=dtype,
                            attn_implementation=manifest.get("attn_implementation", "sdpa"), where=where,
                            local_files_only=True)
        set_pad(base, tokenizer)
        model = None
        for entry in manifest["members"]:
            path = directory / entry["path"]
            try:
                if model is None:
                    model = PeftModel.from_pretrained(base, str(path), adapter_name=entry["name"], is_trainable=True)
                else:
                    model.load_adapter(str(path), adapter_name=entry["name"], is_trainable=True)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise AlignError(f"{where}: cannot load adapter {entry['path']}/ ({one_line(e)})") from e
        head = score_head(model.get_base_model(), where)
        copies = sorted(getattr(head, "modules_to_save", {}).keys())
        expected = sorted(entry["name"] for entry in manifest["members"])
        if copies != expected:
            raise AlignError(f"{where}: the adapters hold reward heads for {copies}, the manifest lists {expected}")
        return cls(model, tokenizer, **_manifest_kwargs(manifest))


_KIND_CLASSES: dict[str, type[RewardEnsemble]] = {
    "seeds": SeedsEnsemble, "multi_head": MultiHeadEnsemble, "lora": LoraEnsemble,
}

load_ensemble = RewardEnsemble.load


__all__ = ["ENSEMBLE_KINDS", "LoraEnsemble", "MultiHeadEnsemble", "RewardEnsemble", "SeedsEnsemble",
           "check_activation_checkpointing", "load_ensemble"]
