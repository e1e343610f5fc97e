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

The head init for a given seed is the same in every kind: row k = N(0, initializer_range²) drawn from a
`torch.Generator` seeded with `seeds[k]` (the distribution transformers itself uses for a fresh head), so K distinct
seeds give K distinct heads (METHODS §8 test 4). Seeds must be distinct.

Rewards. A row is `prompt + response` as tokens (`encode_pairs`), right-padded; the reward is the head applied to
the hidden state of each row's last attended token (the response's EOS), read from `attention_mask` rather than
from `pad_token_id`: transformers' own pooling looks for the last token that is not the pad id, which reads the
wrong position for tokenizers whose pad token is their EOS (common: the pad falls back to EOS when a tokenizer has
none). `model.config.pad_token_id` is still set from the tokenizer, so the plain `model(**inputs)` works too.
Rewards are returned in fp32 whatever the weights' dtype (METHODS §0).

LoRA forward: the adapter is switched by setting each PEFT layer's `_active_adapter` directly (as
`align/references/tr_dpo_lora.py` does), never with PEFT's `set_adapter`, which also rewrites `requires_grad` of the
adapters on every call. Every member's adapter and head stay trainable, and member k's reward depends only on
member k's parameters (tested). Activation checkpointing is refused with K > 1 LoRA members: its recomputation in
backward would run with whichever adapter is active at that time.

Saving (`save`) writes a directory atomically (`align.io.atomic_directory`):

    manifest.json                    format version, kind, members, seeds, aggregation, normalization, base model,
                                     dtype, how rows are tokenized (`max_length`: the longest row training saw,
                                     null for no limit; `truncation_side`: "left", a longer row keeps its last
                                     tokens), and the sha256 and size of every file below
    tokenizer files                  (tokenizer.json, tokenizer_config.json, ...)
    seeds:      member-0/ ... member-{K-1}/     `save_pretrained` folders (num_labels = 1)
    multi_head: model/                          one `save_pretrained` folder (num_labels = K)
    lora:       base/                           the base seq-cls model without adapters
                adapters/member-0/ ...          PEFT adapter folders (LoRA factors + the member's head)

`load` checks the directory against the manifest before torch, safetensors or a tokenizer reads any file of it
(missing or extra members, changed, truncated, missing or unrecorded files, pickled weights, paths outside the
directory) and the loaded weights against it (number of heads or adapters), and reports any mismatch as one
`AlignError` naming the directory and the file. Verifying the digests reads every weight file once more (about a
second per GB); `verify=False` skips the hashing (sizes are still checked).

Scoring truncates as training did: `score` keeps the last `max_length` tokens of a longer row, `max_length` being
the manifest's unless the caller gives one (`score(max_length=...)`, `align rm score --max-length`). A manifest
written before these keys existed loads with `max_length` None (no truncation, the behaviour of that time).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from align.errors import AlignError, ConfigError, DataError
from align.io import atomic_directory
from align.modeling import LoraSection, ModelConfig, adapter_active, load_tokenizer
from reward_models.aggregate import aggregate, check_aggregation, member_statistics
from reward_models.aggregate import normalize as normalize_scores

logger = logging.getLogger("align.reward_models")

ENSEMBLE_KINDS = ("seeds", "multi_head", "lora")
MANIFEST = "manifest.json"
FORMAT = "align.reward_ensemble"
FORMAT_VERSION = 1
#: Texts per tokenizer call (as align.data): the fast tokenizer's batch path pays off, memory stays bounded.
TOKENIZE_CHUNK = 1000
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HASH_CHUNK = 1 << 20
#: How a row longer than `max_length` is cut: "left" drops its first tokens (the end of the response, where the reward
#: is read, is kept). The one rule `encode_pairs` and reward-model training implement.
TRUNCATION_SIDES = ("left",)
#: Files that unpickle when loaded (arbitrary code); an ensemble's weights are safetensors, so none is ever read.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def member_name(k: int) -> str:
    return f"member-{k}"


# ---------------------------------------------------------------------------------------------------------------
# Text → tokens (shared with reward-model training, so that training and scoring see the same ids)


def encode_pairs(tokenizer, prompts: Sequence, responses: Sequence, max_length: int | None = None, *,
                 source: str = "<pairs>") -> list[list[int]]:
    """Token ids of `prompt + response` for each pair → B lists of ids (unpadded).

    Tokenized as align/data.py tokenizes a DPO pair, so that a policy and its reward model see the same ids:
    - text prompt (str): the tokenizer's special tokens are added (`add_special_tokens=True`: BOS for Llama-style
      tokenizers); a doubled leading BOS (text that already began with it) is collapsed to one;
    - conversational prompt (a list of `{"role", "content"}` messages): prompt and response are rendered with the
      tokenizer's chat template by `trl.data_utils.apply_chat_template` (a str response becomes one assistant
      message; a list of messages is taken as it is), then tokenized with `add_special_tokens=False` (the template
      writes them); the whitespace the template writes after the response's end-of-turn is dropped;
    - the response gets no special tokens, then EOS is appended unless it is already the last token: the reward is
      read there, at the end of a complete response.
    An empty text prompt becomes BOS (when the tokenizer has one); an empty response is just EOS (a policy may stop
    at once). With `max_length`, a longer row keeps its LAST `max_length` tokens: the end of the response, where the
    reward is read, matters most; the prompt loses its beginning. Truncated rows are counted in a warning on the
    `align.reward_models` logger. Errors are `DataError`s naming `source`, the 1-based row and the field.
    """
    from align.data import check_messages, is_messages

    if len(prompts) != len(responses):
        raise DataError(source, None, None, f"{len(prompts)} prompts but {len(responses)} responses")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
        raise ConfigError(f"max_length: must be a positive integer or None, got {max_length!r}")
    text_rows, chat_rows = [], []
    for row, (prompt, response) in enumerate(zip(prompts, responses), start=1):
        if isinstance(prompt, str):
            if not isinstance(response, str):
                raise DataError(source, row, "response", f"must be a string when the prompt is a string, got "
                                                         f"{type(response).__name__}")
            text_rows.append(row - 1)
        elif isinstance(prompt, list):
            check_messages(prompt, source=source, row=row, name="prompt")
            if is_messages(response):
                check_messages(response, source=source, row=row, name="response")
            elif not isinstance(response, str):
                raise DataError(source, row, "response", f"must be a string or a list of chat messages, got "
                                                         f"{type(response).__name__}")
            chat_rows.append(row - 1)
        else:
            raise DataError(source, row, "prompt", f"must be a string or a list of chat messages, got "
                                                   f"{type(prompt).__name__}")

    n = len(prompts)
    prompt_ids: list[list[int] | None] = [None] * n
    response_ids: list[list[int] | None] = [None] * n
    if text_rows:
        for i, ids in zip(text_rows, _tokenize(tokenizer, [prompts[i] for i in text_rows], True)):
            prompt_ids[i] = ids
        for i, ids in zip(text_rows, _tokenize(tokenizer, [responses[i] for i in text_rows], False)):
            response_ids[i] = ids
    if chat_rows:
        from trl.data_utils import apply_chat_template

        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(source, chat_rows[0] + 1, "prompt", "is a list of chat messages but the tokenizer has no "
                                                                "chat template")
        rendered = []
        for i in chat_rows:
            response = responses[i]
            completion = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
            try:
                texts = apply_chat_template({"prompt": prompts[i], "completion": completion}, tokenizer)
            except Exception as e:  # noqa: BLE001 - jinja errors from the model's own template, TRL's checks
                raise DataError(source, i + 1, None, f"the chat template failed: {_one_line(e)}") from None
            rendered.append((texts["prompt"], texts["completion"].rstrip()))
        for i, ids in zip(chat_rows, _tokenize(tokenizer, [p for p, _ in rendered], False)):
            prompt_ids[i] = ids
        for i, ids in zip(chat_rows, _tokenize(tokenizer, [c for _, c in rendered], False)):
            response_ids[i] = ids

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for i in range(n):
        p, r = prompt_ids[i], response_ids[i]
        if bos is not None and len(p) >= 2 and p[0] == p[1] == bos:
            p = p[1:]
        if not p and bos is not None:
            p = [bos]
        if eos is not None and (not r or r[-1] != eos):
            r = r + [eos]
        ids = p + r
        if not ids:
            raise DataError(source, i + 1, "response", "prompt and response tokenize to no tokens (and the tokenizer "
                                                       "has neither BOS nor EOS)")
        out.append(ids)
    out, truncated = truncate_rows(out, max_length)
    if truncated:
        logger.warning("%s: %d of %d rows were longer than max_length=%d and kept their last %d tokens (the prompt "
                       "lost its beginning)", source, truncated, n, max_length, max_length)
    return out


def truncate_rows(rows: Sequence[Sequence[int]], max_length: int | None, truncation_side: str = "left"
                  ) -> tuple[list[list[int]], int]:
    """Rows of ids longer than `max_length` keep their last `max_length` ids (`truncation_side` "left", the only
    side: the end of the response, where the reward is read, matters most) → (rows, how many were cut). None: no
    limit."""
    if truncation_side not in TRUNCATION_SIDES:
        raise ConfigError(f"truncation_side: must be one of {', '.join(TRUNCATION_SIDES)}, got {truncation_side!r}")
    if max_length is None:
        return [list(row) for row in rows], 0
    out = [list(row[-max_length:]) if len(row) > max_length else list(row) for row in rows]
    return out, sum(len(row) > max_length for row in rows)


def _tokenize(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        ids.extend(tokenizer(texts[start:start + TOKENIZE_CHUNK], add_special_tokens=add_special_tokens)["input_ids"])
    return ids


def pad_right(sequences: Sequence[Sequence[int]], pad_token_id: int, device=None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads N id lists → `input_ids[N, T]` (long) and `attention_mask[N, T]` (long, 1 on tokens), T = the
    longest row."""
    if not sequences:
        raise ValueError("pad_right: no sequences")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


def _one_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------------------------------------------
# Model pieces shared by the kinds


def last_token_hidden(backbone: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                      ) -> torch.Tensor:
    """One backbone forward → the hidden state of each row's last attended token, `[N, H]` (model dtype).

    `input_ids`, `attention_mask`: `[N, T]`, right-padded (position ids are the backbone's default 0..T−1, right
    for right padding). The last attended position is found from the mask, so the pad id may equal EOS.
    """
    outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]  # [N, T, H]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask.to(positions.dtype)).argmax(dim=-1)  # [N]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _score_head(model, where: str) -> torch.nn.Module:
    """The linear reward head of a transformers seq-cls model (`score`: Llama, Qwen2, Mistral, Gemma, GPT-NeoX...)."""
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ConfigError(f"{where}: {type(model).__name__} has no linear `score` head; reward ensembles support "
                          "decoder models whose sequence-classification class scores the last token (Llama, Qwen2, "
                          "Mistral, Gemma, GPT-NeoX, ...)")
    return head


def _init_head_rows(head: torch.nn.Linear, seeds: Sequence[int], std: float) -> None:
    """Row k of the head's weight `[len(seeds), H]` ← N(0, std²) from a generator seeded with `seeds[k]`; bias ← 0.

    Drawn in fp32 on the CPU and copied (so a seed gives the same head on any device and in any kind)."""
    weight = head.weight
    if weight.shape[0] != len(seeds):
        raise ValueError(f"head has {weight.shape[0]} rows for {len(seeds)} seeds")
    with torch.no_grad():
        for row, seed in enumerate(seeds):
            generator = torch.Generator().manual_seed(int(seed))
            weight[row].copy_(torch.randn(weight.shape[1], generator=generator) * std)
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


def _initializer_range(model) -> float:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return float(getattr(config, "initializer_range", 0.02))


def _load_seq_cls(path, *, num_labels: int | None, dtype: torch.dtype, attn_implementation: str,
                  revision: str | None = None, trust_remote_code: bool = False, where: str,
                  local_files_only: bool = False):
    from transformers import AutoModelForSequenceClassification

    kwargs = {} if num_labels is None else {"num_labels": num_labels}
    if local_files_only:
        kwargs["local_files_only"] = True
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=dtype, attn_implementation=attn_implementation, revision=revision,
            trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{where}: cannot load '{path}' as a sequence-classification model "
                          f"({_one_line(e)})") from e
    model.config.use_cache = False  # training and scoring never reuse a KV cache
    return model


def _set_pad(model, tokenizer) -> None:
    # transformers' own seq-cls pooling finds the last token from pad_token_id; without one it refuses batches > 1.
    model.config.pad_token_id = tokenizer.pad_token_id


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """`auto`: float32 on CPU (bf16 matmuls are emulated there), bfloat16 on a GPU that supports it (ModelConfig's
    rule); else a torch dtype or its name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError(f"dtype must be auto, a torch dtype or one of {', '.join(_DTYPES)}; got {dtype!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
        check_aggregation(*_split_aggregation(aggregation), num_members=num_members)
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
    def members_parameters(self, k: int) -> list[torch.nn.Parameter]:
        """The trainable parameters member k's reward depends on (for optimisers and tests)."""

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

        Rows are tokenized by `encode_pairs` (as in training), sorted by length (longest first, so a batch that
        does not fit fails at once and padding is minimal) and scored `batch_size` at a time in eval mode (the
        module's train/eval mode is restored after). `normalize` (default: whether `self.normalization` is set)
        z-scores each member with the stored statistics before aggregating; `per_member` is then the normalised
        scores. `max_length`: a longer row keeps its last `max_length` tokens (`encode_pairs`); None: the ensemble's
        own `max_length` (the one it was trained with, from its manifest; None there: no truncation).
        """
        if max_length is None:
            max_length = self.max_length
        ids = encode_pairs(self.tokenizer, prompts, responses, max_length, source="<score>")
        return self.score_ids(ids, batch_size=batch_size, progress=progress, normalize=normalize)

    @torch.no_grad()
    def score_ids(self, ids: Sequence[Sequence[int]], *, batch_size: int = 16, progress: bool = False,
                  normalize: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`score` of rows that are already token ids of this ensemble's tokenizer (prompt + response, ending with
        EOS, as `encode_pairs` makes them) → `(per_member[B, K], aggregate[B])`. On-policy training scores its
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
        method, params = _split_aggregation(self.aggregation)
        return scores, aggregate(scores, method, **params)

    # --- aggregation and normalisation ----------------------------------------------------------------------------

    def set_aggregation(self, aggregation: dict | None) -> None:
        """Sets `{"method": ..., **params}` (None: mean), validated against K; defaults are filled in."""
        method, params = _split_aggregation(aggregation)
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
        """Enables activation checkpointing in every member model (refused for LoRA with K > 1, see the module
        docstring)."""
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
        """Writes the ensemble to `directory` atomically (see the module docstring for the layout). Refuses an
        existing directory that is not empty (or a file) unless `overwrite`, which replaces it in one rename."""
        directory = Path(directory)
        if directory.exists() and not overwrite and (not directory.is_dir() or any(directory.iterdir())):
            raise AlignError(f"reward ensemble '{directory}': already exists and is not empty; choose a new "
                             "directory (an ensemble is never overwritten)")
        with atomic_directory(directory) as tmp:
            members = self._save_weights(tmp)
            self.tokenizer.save_pretrained(tmp)
            files = {}
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                rel = path.relative_to(tmp).as_posix()
                files[rel] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "num_members": self.num_members,
                "members": members,
                "seeds": self.seeds,
                "aggregation": self.aggregation,
                "normalization": self.normalization,
                "base_model": self.base_model,
                "dtype": _dtype_name(next(self.parameters()).dtype),
                "attn_implementation": self.attn_implementation,
                "max_length": self.max_length,
                "truncation_side": self.truncation_side,
                "files": files,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    @abc.abstractmethod
    def _save_weights(self, directory: Path) -> list[dict[str, Any]]:
        """Writes the weights under `directory` → the manifest's member entries (name, path, seed, ...)."""

    @classmethod
    def load(cls, directory: str | Path, *, dtype: str | torch.dtype = "auto", device=None,
             verify: bool = True) -> RewardEnsemble:
        """Loads an ensemble written by `save` (local files only, no network).

        `dtype`: `auto` (float32 on CPU, bfloat16 on a GPU that supports it), a torch dtype or its name;
        `device`: default CUDA when available, else CPU; `verify`: check the sha256 of every file against the
        manifest (sizes are always checked). Any mismatch between the manifest and the files is an AlignError.
        """
        from transformers import AutoTokenizer

        directory = Path(directory)
        manifest = _read_manifest(directory)
        _check_files(directory, manifest, verify=verify)
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = _resolve_dtype(dtype, device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as e:
            raise AlignError(f"reward ensemble '{directory}': cannot load its tokenizer ({_one_line(e)})") from e
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


def _split_aggregation(aggregation: dict | None) -> tuple[str, dict[str, Any]]:
    if aggregation is None:
        return "mean", {}
    if not isinstance(aggregation, dict) or "method" not in aggregation:
        raise ConfigError(f"aggregation: must be a mapping with a 'method' (mean, wco, uwo), got {aggregation!r}")
    params = dict(aggregation)
    return params.pop("method"), params


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
            model = _load_seq_cls(model_config.name_or_path, num_labels=1, dtype=model_config.torch_dtype(),
                                  attn_implementation=model_config.attn_implementation,
                                  revision=model_config.revision, trust_remote_code=model_config.trust_remote_code,
                                  where="model.name_or_path")
            _set_pad(model, tokenizer)
            _init_head_rows(_score_head(model, "model.name_or_path"), [seed], _initializer_range(model))
            members.append(model)
        return cls(members, tokenizer, seeds=seeds, aggregation=aggregation, normalization=None,
                   base_model=model_config.name_or_path, attn_implementation=model_config.attn_implementation)

    def members_parameters(self, k):
        self._check_member(k)
        return [p for p in self.members[k].parameters() if p.requires_grad]

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
            model = _load_seq_cls(directory / entry["path"], num_labels=None, dtype=dtype,
                                  attn_implementation=manifest.get("attn_implementation", "sdpa"),
                                  where=f"reward ensemble '{directory}'", local_files_only=True)
            rows = _score_head(model, f"reward ensemble '{directory}'").weight.shape[0]
            if rows != 1:
                raise AlignError(f"reward ensemble '{directory}': {entry['path']}/ has {rows} reward heads, a "
                                 "'seeds' member must have exactly 1")
            _set_pad(model, tokenizer)
            members.append(model)
        return cls(members, tokenizer, **_manifest_kwargs(manifest))


# ---------------------------------------------------------------------------------------------------------------
# Kind `multi_head`: one backbone, K heads


class MultiHeadEnsemble(RewardEnsemble):
    """One backbone with a `[K, hidden]` score head; row k is member k, initialised from `seeds[k]`.

    `members_parameters(k)` is the shared backbone plus the whole head weight (member k owns row k only: the
    gradient of member k's reward reaches the other rows as zeros)."""

    kind = "multi_head"

    def __init__(self, model, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.model = model
        _score_head(model, "multi_head model")

    @classmethod
    def _build(cls, model_config, tokenizer, seeds, aggregation, lora):
        model = _load_seq_cls(model_config.name_or_path, num_labels=len(seeds), dtype=model_config.torch_dtype(),
                              attn_implementation=model_config.attn_implementation, revision=model_config.revision,
                              trust_remote_code=model_config.trust_remote_code, where="model.name_or_path")
        _set_pad(model, tokenizer)
        _init_head_rows(_score_head(model, "model.name_or_path"), seeds, _initializer_range(model))
        return cls(model, tokenizer, seeds=seeds, aggregation=aggregation, normalization=None,
                   base_model=model_config.name_or_path, attn_implementation=model_config.attn_implementation)

    def members_parameters(self, k):
        self._check_member(k)
        return [p for p in self.model.parameters() if p.requires_grad]

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
        model = _load_seq_cls(directory / "model", num_labels=None, dtype=dtype,
                              attn_implementation=manifest.get("attn_implementation", "sdpa"),
                              where=f"reward ensemble '{directory}'", local_files_only=True)
        rows = _score_head(model, f"reward ensemble '{directory}'").weight.shape[0]
        if rows != manifest["num_members"]:
            raise AlignError(f"reward ensemble '{directory}': model/ has {rows} reward heads but the manifest lists "
                             f"{manifest['num_members']} members")
        _set_pad(model, tokenizer)
        return cls(model, tokenizer, **_manifest_kwargs(manifest))


# ---------------------------------------------------------------------------------------------------------------
# Kind `lora`: one frozen base, K LoRA adapters each with its own head


def _adapter_parameter_pattern(adapter: str | None = None) -> re.Pattern:
    """Matches the parameter names of one adapter (or of any `member-k` adapter): LoRA factors and the adapter's
    copy of the score head (`...lora_A.member-0.weight`, `...score.modules_to_save.member-0.weight`)."""
    name = re.escape(adapter) if adapter is not None else r"member-\d+"
    return re.compile(rf"\.(lora_[A-Za-z_]+|modules_to_save)\.{name}(\.|$)")


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
        _score_head(model.get_base_model(), "lora model")
        # Every module that computes with "the active adapter": LoRA layers and the head's modules_to_save wrapper.
        self._switchable = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
        missing = [member_name(k) for k in range(self.num_members) if member_name(k) not in model.peft_config]
        if missing:
            raise AlignError(f"lora ensemble: adapter '{missing[0]}' is missing")
        pattern = _adapter_parameter_pattern()
        for name, param in model.named_parameters():
            # Base frozen; every member's factors and head trainable (set here, not by PEFT's set_adapter).
            param.requires_grad_(bool(pattern.search(name)))

    @classmethod
    def _build(cls, model_config, tokenizer, seeds, aggregation, lora):
        from peft import LoraConfig, get_peft_model

        base = _load_seq_cls(model_config.name_or_path, num_labels=1, dtype=model_config.torch_dtype(),
                             attn_implementation=model_config.attn_implementation, revision=model_config.revision,
                             trust_remote_code=model_config.trust_remote_code, where="model.name_or_path")
        _set_pad(base, tokenizer)
        std = _initializer_range(base)
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
            head = _score_head(model.get_base_model(), "model.name_or_path")
            _init_head_rows(head.modules_to_save[member_name(k)], [seed], std)
        return cls(model, tokenizer, seeds=seeds, aggregation=aggregation, normalization=None,
                   base_model=model_config.name_or_path, attn_implementation=model_config.attn_implementation)

    @contextlib.contextmanager
    def member_active(self, k: int) -> Iterator[None]:
        """Within the block every PEFT layer computes with adapter `member-k` (restored in `finally`)."""
        self._check_member(k)
        with adapter_active(self._switchable, member_name(k)):
            yield

    def members_parameters(self, k):
        self._check_member(k)
        pattern = _adapter_parameter_pattern(member_name(k))
        return [p for n, p in self.model.named_parameters() if p.requires_grad and pattern.search(n)]

    def backbones(self):
        return [self.model.get_base_model().base_model]

    def forward(self, input_ids, attention_mask):
        inner = self.model.get_base_model()  # the seq-cls model, LoRA layers injected; its body and its head
        backbone, head = inner.base_model, inner.score
        if (self.num_members > 1 and torch.is_grad_enabled()
                and any(getattr(m, "gradient_checkpointing", False) for m in backbone.modules())):
            raise ConfigError("activation checkpointing is not available for a LoRA ensemble with more than one "
                              "member: the backward recomputation would run with the wrong adapter")
        columns = []
        for k in range(self.num_members):
            with self.member_active(k):
                columns.append(head(last_token_hidden(backbone, input_ids, attention_mask)))
        return torch.cat(columns, dim=-1).float()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        if self.num_members > 1:
            raise ConfigError("activation checkpointing is not available for a LoRA ensemble with more than one "
                              "member: the backward recomputation would run with the wrong adapter")
        super().gradient_checkpointing_enable(gradient_checkpointing_kwargs)

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
        base = _load_seq_cls(directory / "base", num_labels=None, dtype=dtype,
                             attn_implementation=manifest.get("attn_implementation", "sdpa"), where=where,
                             local_files_only=True)
        _set_pad(base, tokenizer)
        model = None
        for entry in manifest["members"]:
            path = directory / entry["path"]
            try:
                if model is None:
                    model = PeftModel.from_pretrained(base, str(path), adapter_name=entry["name"], is_trainable=True)
                else:
                    model.load_adapter(str(path), adapter_name=entry["name"], is_trainable=True)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise AlignError(f"{where}: cannot load adapter {entry['path']}/ ({_one_line(e)})") from e
        head = _score_head(model.get_base_model(), where)
        copies = sorted(getattr(head, "modules_to_save", {}).keys())
        expected = sorted(entry["name"] for entry in manifest["members"])
        if copies != expected:
            raise AlignError(f"{where}: the adapters hold reward heads for {copies}, the manifest lists {expected}")
        return cls(model, tokenizer, **_manifest_kwargs(manifest))


_KIND_CLASSES: dict[str, type[RewardEnsemble]] = {
    "seeds": SeedsEnsemble, "multi_head": MultiHeadEnsemble, "lora": LoraEnsemble,
}

load_ensemble = RewardEnsemble.load


# ---------------------------------------------------------------------------------------------------------------
# Manifest checks


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _member_paths(kind: str, num_members: int) -> list[str]:
    if kind == "seeds":
        return [member_name(k) for k in range(num_members)]
    if kind == "multi_head":
        return ["model"] * num_members
    return [f"adapters/{member_name(k)}" for k in range(num_members)]


def read_manifest(directory: str | Path) -> dict:
    """The checked manifest of the ensemble in `directory` (keys, kinds, member layout, aggregation, tokenization,
    file records), read without touching any weight file: commands use it to check their options against the
    ensemble (K, aggregation) before loading it. Any problem is one AlignError naming the directory and the file."""
    return _read_manifest(Path(directory))


def _read_manifest(directory: Path) -> dict:
    where = f"reward ensemble '{directory}'"
    if not directory.exists():
        raise AlignError(f"{where}: directory not found")
    if not directory.is_dir():
        raise AlignError(f"{where}: is a file, not a directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise AlignError(f"{where}: no {MANIFEST} (not a directory written by RewardEnsemble.save)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AlignError(f"{where}: {MANIFEST} is not valid JSON ({_one_line(e)})") from None

    def fail(problem: str):
        raise AlignError(f"{where}: {MANIFEST}: {problem}")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fail(f"not a reward-ensemble manifest (format must be '{FORMAT}')")
    if manifest.get("format_version") != FORMAT_VERSION:
        fail(f"format_version {manifest.get('format_version')!r} is not supported (this version reads "
             f"{FORMAT_VERSION})")
    for key in ("kind", "num_members", "members", "seeds", "aggregation", "normalization", "base_model", "files"):
        if key not in manifest:
            fail(f"'{key}' is missing")
    if not isinstance(manifest.get("attn_implementation", "sdpa"), str):
        fail(f"attn_implementation must be a string, got {manifest['attn_implementation']!r}")
    kind, k = manifest["kind"], manifest["num_members"]
    if kind not in ENSEMBLE_KINDS:
        fail(f"unknown kind '{kind}'; known: {', '.join(ENSEMBLE_KINDS)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        fail(f"num_members must be an integer >= 1, got {k!r}")
    members, seeds = manifest["members"], manifest["seeds"]
    if not isinstance(members, list) or len(members) != k:
        fail(f"num_members is {k} but {len(members) if isinstance(members, list) else 'no'} members are listed")
    if not isinstance(seeds, list) or len(seeds) != k:
        fail(f"num_members is {k} but {len(seeds) if isinstance(seeds, list) else 'no'} seeds are listed")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        fail(f"seeds must be integers, got {seeds!r}")
    for i, (entry, path) in enumerate(zip(members, _member_paths(kind, k))):
        if not isinstance(entry, dict) or entry.get("name") != member_name(i) or entry.get("path") != path:
            fail(f"member {i} must be named '{member_name(i)}' with path '{path}', got {entry!r}")
    if not isinstance(manifest["files"], dict) or not manifest["files"]:
        fail("'files' must map every saved file to its digest")
    for rel, record in manifest["files"].items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or not parts or ".." in parts or rel == MANIFEST:
            fail(f"files: '{rel}' is not a path inside the ensemble directory")
        if not (isinstance(record, dict) and isinstance(record.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", record["sha256"])
                and isinstance(record.get("bytes"), int) and not isinstance(record["bytes"], bool)):
            fail(f"files: '{rel}' must be recorded as {{'sha256': 64 hex digits, 'bytes': int}}, got {record!r}")
        if rel.lower().endswith(_PICKLE_SUFFIXES):
            fail(f"files: '{rel}' is a pickle file, which could run code when loaded; an ensemble's weights are "
                 "safetensors")
    max_length, side = manifest.get("max_length"), manifest.get("truncation_side", "left")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        fail(f"max_length must be null or a positive integer, got {max_length!r}")
    if side not in TRUNCATION_SIDES:
        fail(f"truncation_side must be one of {', '.join(TRUNCATION_SIDES)}, got {side!r}")
    try:
        check_aggregation(*_split_aggregation(manifest["aggregation"]), num_members=k)
    except ConfigError as e:
        fail(str(e))
    normalization = manifest["normalization"]
    if normalization is not None and not (
            isinstance(normalization, dict) and set(normalization) == {"mean", "std"}
            and all(isinstance(normalization[key], list) and len(normalization[key]) == k for key in ("mean", "std"))):
        fail(f"normalization must be null or {{'mean': [{k} floats], 'std': [{k} floats]}}")
    return manifest


def _check_files(directory: Path, manifest: dict, *, verify: bool) -> None:
    """The directory holds exactly the members the manifest lists, and every recorded file unchanged."""
    where = f"reward ensemble '{directory}'"
    kind, k = manifest["kind"], manifest["num_members"]
    files: dict[str, dict] = manifest["files"]
    required = {"seeds": [], "multi_head": ["model"], "lora": ["base"]}[kind]
    for folder in required:
        if not (directory / folder).is_dir():
            raise AlignError(f"{where}: {folder}/ is missing (a '{kind}' ensemble keeps its "
                             f"{'base model' if folder == 'base' else 'model'} there)")
    # Member folders: each listed one present, none beyond them.
    parent = {"seeds": directory, "lora": directory / "adapters"}.get(kind)
    if parent is not None:
        for entry in manifest["members"]:
            if not (directory / entry["path"]).is_dir():
                raise AlignError(f"{where}: member '{entry['name']}' is missing (expected folder {entry['path']}/; "
                                 f"the manifest lists {k} members)")
        listed = {Path(entry["path"]).name for entry in manifest["members"]}
        if parent.is_dir():
            extra = sorted(p.name for p in parent.iterdir() if p.is_dir() and re.fullmatch(r"member-\d+", p.name)
                           and p.name not in listed)
            if extra:
                raise AlignError(f"{where}: unexpected member folder '{extra[0]}' (the manifest lists {k} members)")
    # No unrecorded file anywhere (the tokenizer and the weight loaders would read one), checked before any hashing.
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel not in files and rel != MANIFEST:
            raise AlignError(f"{where}: {rel} is not recorded in {MANIFEST} (a file added after saving?)")
    # Every recorded file present and unchanged, before torch, safetensors or a tokenizer opens any of them.
    for rel, record in files.items():
        path = directory / rel
        if not path.is_file():
            raise AlignError(f"{where}: {rel} is missing (recorded in {MANIFEST})")
        if path.stat().st_size != record["bytes"]:
            raise AlignError(f"{where}: {rel} does not match {MANIFEST} (size {path.stat().st_size} bytes, recorded "
                             f"{record['bytes']}): the file changed after saving (truncated or replaced)")
        if verify and _sha256(path) != record["sha256"]:
            raise AlignError(f"{where}: {rel} does not match {MANIFEST} (sha256 differs): the file changed after "
                             "saving")


__all__ = ["ENSEMBLE_KINDS", "TRUNCATION_SIDES", "LoraEnsemble", "MultiHeadEnsemble", "RewardEnsemble", "SeedsEnsemble",
           "encode_pairs", "last_token_hidden", "load_ensemble", "member_name", "pad_right", "read_manifest",
           "truncate_rows"]
