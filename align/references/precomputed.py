"""Reference kind `precomputed`: another kind's log-probs, computed in one pass before training and cached on disk.

The cache key is a sha256 over (a) every weight and buffer of the reference (name, dtype, shape, bytes), its model
config, attention implementation and mixed-precision mode, and (b) the token ids of every pair in order. The ids are
what the data, the tokenizer and the length settings produce, and all the reference ever sees of them: any change
that alters one id is a miss, a change that alters none (e.g. a larger `max_length` that cut nothing) reuses the cache.
Token-level log-probs are stored, so SamPO can down-sample them. Batches are matched to cached rows by content (a
digest of each row's ids), so shuffling, samplers and resumed runs need nothing from the data pipeline.

Layout: `<cache_dir>/<key>/logps.safetensors` (fp32 `chosen`, `rejected`: every pair's completion tokens back to back,
in data order; int64 `chosen_offsets`, `rejected_offsets` `[N + 1]`) and `meta.json` (format, key, N, the file's
sha256, what it was computed from). A cache that fails any check is an error, never overwritten.

Distributed (DDP, DeepSpeed): the main process decides hit or miss for every rank. On a hit it reads the cache and
broadcasts it; on a miss the ranks split the pass, each running the same number of forwards (ZeRO-3 gathers need
every rank), gather the results, and the main one writes. Every rank then serves lookups from memory, so the cache
folder need not be shared between nodes.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from align.errors import AlignError, ConfigError
from align.io import atomic_directory
from align.logps import PairLogps, _attention_implementation, packed_examples
from align.modeling import is_peft_model
from align.references.base import REFERENCES, Reference, build_reference, register_reference, resolve_kind
from align.references.frozen import PeftDisabledReference
from align.schema import ConfigKeyError, from_dict

logger = logging.getLogger("align.references")
_ID_KEYS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
FORMAT = 1  # part of the key: a new layout gets new directories instead of misreading old ones
_REFUSED = {"tr_dpo": "a TR-DPO reference moves toward the policy during training, so its log-probs cannot be "
                      "computed before training; use reference.kind: tr_dpo itself",
            "precomputed": "it would cache a cache; name the reference to cache (auto, frozen, soup, peft_disabled)"}


def _row_digest(prompt, chosen, rejected) -> bytes:
    parts = [np.asarray(x, dtype=np.int64) for x in (prompt, chosen, rejected)]
    h = hashlib.blake2b(np.array([len(p) for p in parts], dtype=np.int64).tobytes(), digest_size=16)
    for part in parts:
        h.update(part.tobytes())
    return h.digest()


def _weights_digest(model, skip: tuple[str, ...] = ()):
    """sha256 over every parameter and buffer; ZeRO-3 shards are gathered one tensor at a time (all ranks)."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if any(s in name for s in skip):
            continue
        gathered = contextlib.nullcontext()
        if hasattr(t, "ds_id"):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([t], modifier_rank=None)
        with gathered:
            data = t.detach().contiguous().view(-1)
            h.update(f"{name}|{data.dtype}|{tuple(t.shape)}\n".encode())
            h.update(data.view(torch.uint8).cpu().numpy())
    return h


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _unwrap(model):
    while hasattr(model, "module"):  # DDP, DeepSpeed engine
        model = model.module
    return model.get_base_model() if is_peft_model(model) else model


@register_reference("precomputed")
class PrecomputedReference(Reference):
    """Log-probs of the reference `of`, computed once before training (`precompute`) and cached on disk; the model
    is then released, so training holds one model and does one forward per step."""

    @dataclass
    class Params:
        of: dict = field(
            default_factory=lambda: {"kind": "auto"},
            metadata={"help": "The reference whose log-probs are cached, itself a reference section: {kind: frozen, "
                              "name_or_path: ...}, {kind: soup, checkpoints: [...]}, {kind: peft_disabled} or "
                              "{kind: auto} (default). tr_dpo is refused: it moves during training."})
        cache_dir: str | None = field(
            default=None,
            metadata={"help": "Folder of the caches, one subfolder per key. Default: $ALIGN_CACHE_DIR/reference_logps "
                              "if ALIGN_CACHE_DIR is set, else ~/.cache/align/reference_logps."})

        def __post_init__(self):
            of = dict(self.of)
            kind = of.pop("kind", "auto")
            # Keys relative to this section (`of.kind`): `from_dict` puts them under `reference`.
            if kind in _REFUSED:
                raise ConfigKeyError("of.kind", f"'{kind}' cannot be precomputed: {_REFUSED[kind]}")
            if kind == "auto":
                if of:
                    raise ConfigKeyError(("of", next(iter(of))), "kind 'auto' takes no parameters")
            else:
                cls = REFERENCES.lookup(kind, "of.kind", also_known=["auto"])
                from_dict(cls.Params, of, "of.", owner=f"reference kind '{kind}'")

    def __init__(self, params, *, policy, model_config):
        super().__init__(params, policy=policy, model_config=model_config)
        of = dict(params.of)
        self.of_kind = resolve_kind(of.pop("kind", "auto"), policy)
        try:
            self.inner = build_reference(self.of_kind, of, policy=policy, model_config=model_config)
        except ConfigKeyError as e:
            if e.path[0] != "reference":  # about another section (model.lora, training.deepspeed)
                raise
            # The inner kind names its keys `reference.x`; here they live under `reference.of`.
            raise ConfigKeyError(("reference", "of", *e.path[1:]), e.problem, e.joiner) from None
        except ConfigError as e:
            raise ConfigKeyError("reference.of", str(e)) from None
        if type(self.inner).on_step_end is not Reference.on_step_end:
            raise ConfigError(f"reference.of.kind: '{self.of_kind}' changes during training, so its log-probs cannot "
                              "be computed before training")
        # peft_disabled runs the policy itself: its weights are the policy's minus the adapter.
        self._policy = policy if isinstance(self.inner, PeftDisabledReference) else None
        root = params.cache_dir or Path(os.environ.get("ALIGN_CACHE_DIR", "~/.cache/align")) / "reference_logps"
        self.cache_dir = Path(root).expanduser()
        self.cache_info: dict[str, tuple[Path, bool]] = {}  # dataset name → (cache folder, was it a hit)
        self._rows: dict[bytes, tuple] = {}  # row digest → (store, index in it, its offsets as lists)
        self._digest = None  # sha256 state over the reference's weights and settings, computed once

    def prepare(self, accelerator) -> None:
        super().prepare(accelerator)
        if self._policy is not None and getattr(accelerator.state, "deepspeed_plugin", None) is not None:
            raise ConfigError("reference.of.kind: peft_disabled cannot be precomputed under DeepSpeed (the policy is "
                              "not initialised by DeepSpeed before training); use of: {kind: frozen}")
        self.inner.prepare(accelerator)

    # --- the pass before training -----------------------------------------------------------------------------

    def precompute(self, datasets, collator, batch_size: int) -> None:
        acc = self.accelerator
        world, main = (acc.num_processes, acc.is_main_process) if acc is not None else (1, True)
        for name, dataset in datasets.items():
            if dataset is None:
                continue
            examples = [dataset[i] for i in range(len(dataset))]
            rows = [_row_digest(*(e[k] for k in _ID_KEYS)) for e in examples]
            h = self._model_digest()
            for row in rows:
                h.update(row)
            path = self.cache_dir / h.hexdigest()
            # The main process decides hit or miss for everyone, so all ranks take the same path (ZeRO-3 lock-step).
            status, store = "miss", None
            if main and path.exists():
                try:
                    store, status = self._read(path, examples), "hit"
                except AlignError as e:
                    status = str(e)
            if world > 1:
                from accelerate.utils import broadcast_object_list

                status, store = broadcast_object_list([status, store if status == "hit" else None])
            if status not in ("hit", "miss"):
                raise AlignError(status)
            if status == "miss":
                logger.info("reference log-probs of %s (%d pairs): computing, cache %s", name, len(examples), path)
                store = self._compute(examples, collator, batch_size, name)
                if main and not path.exists():
                    self._write(path, store, name)
            else:
                logger.info("reference log-probs of %s: cache hit %s", name, path)
            self.cache_info[name] = (path, status == "hit")
            offsets = (store["chosen_offsets"].tolist(), store["rejected_offsets"].tolist())
            self._rows.update((row, (store, i, offsets)) for i, row in enumerate(rows))
        self._release()

    def _model_digest(self):
        if self._digest is None:
            if self._policy is not None:
                model, skip = self._policy, ("lora_", "modules_to_save")
            else:
                model, skip = self.inner.model, ()
            model = _unwrap(model)
            config = {k: v for k, v in model.config.to_dict().items()
                      if not k.startswith("_") and k not in ("transformers_version", "use_cache")}
            header = {"format": FORMAT, "config": config, "attn_implementation": _attention_implementation(model),
                      "mixed_precision": getattr(self.accelerator, "mixed_precision", "no")}
            self._digest = _weights_digest(model, skip)
            self._digest.update(json.dumps(header, sort_keys=True, default=str).encode())
        return self._digest.copy()

    @torch.no_grad()
    def _compute(self, examples: list[dict], collator, batch_size: int, name: str) -> dict:
        from tqdm.auto import tqdm

        if self.inner is None:
            raise AlignError(f"reference (precomputed): {name} is not cached and the reference model was already "
                             "released after the first precompute")
        acc = self.accelerator
        rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
        model = self._policy if self._policy is not None else self.inner.model
        device = acc.device if acc is not None else next(model.parameters()).device
        # Similar lengths share a batch (less padding); rank r takes batches r, r + world, ... and every rank runs
        # the same number of forwards (a repeated batch, discarded), as ZeRO-3's gathers need.
        order = sorted(range(len(examples)), key=lambda i: sum(len(examples[i][k]) for k in _ID_KEYS))
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        mine = [batches[k] if k < len(batches) else None for k in range(rank, -(-len(batches) // world) * world, world)]
        was_training = self._policy is not None and self._policy.training
        if self._policy is not None:
            self._policy.eval()
        part = ([], [], [])  # indices, chosen token logps, rejected token logps
        autocast = acc.autocast() if acc is not None else contextlib.nullcontext()
        with autocast:
            for indices in tqdm(mine, desc=f"reference log-probs ({name})", disable=rank != 0):
                batch = collator([examples[i] for i in indices or batches[0]])
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                logps = self.inner.logps(self._policy, batch)
                if indices is None:
                    continue
                for values, mask, out in ((logps.chosen, logps.chosen_mask, part[1]),
                                          (logps.rejected, logps.rejected_mask, part[2])):
                    values, mask = values.float().cpu(), mask.cpu()
                    out.extend(values[i][mask[i]] for i in range(len(indices)))
                part[0].extend(indices)
        if was_training:
            self._policy.train()
        parts = [part]
        if world > 1:
            from accelerate.utils import gather_object

            parts = gather_object([part])
        chosen, rejected = [None] * len(examples), [None] * len(examples)
        for indices, c, r in parts:
            for i, ci, ri in zip(indices, c, r):
                chosen[i], rejected[i] = ci, ri
        store = {}
        for key, values in (("chosen", chosen), ("rejected", rejected)):
            store[key] = torch.cat(values)
            store[f"{key}_offsets"] = torch.tensor([0] + [len(v) for v in values]).cumsum(0)
        return store

    def _write(self, path: Path, store: dict, name: str) -> None:
        from safetensors.torch import save_file

        try:
            with atomic_directory(path) as tmp:
                save_file(store, tmp / "logps.safetensors")
                of = {k: v for k, v in self.params.of.items() if k != "kind"}
                meta = {"format": FORMAT, "key": path.name, "examples": len(store["chosen_offsets"]) - 1,
                        "sha256": _file_sha256(tmp / "logps.safetensors"), "dataset": name,
                        "computed_from": {"kind": self.of_kind, **of}}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        except OSError as e:  # the log-probs are in memory: training can go on without the cache
            logger.warning("could not write the reference cache %s (%s); this run keeps its log-probs in memory",
                           path, e)

    def _read(self, path: Path, examples: list[dict]) -> dict:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        def bad(problem: str):
            raise AlignError(f"reference cache {path}: {problem}; delete this folder to recompute it")

        try:
            meta, digest = json.loads((path / "meta.json").read_text()), _file_sha256(path / "logps.safetensors")
        except (OSError, ValueError) as e:
            bad(f"cannot read it ({type(e).__name__}: {e})")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("key") != path.name:
            bad(f"meta.json does not belong here (expected format {FORMAT} and key {path.name})")
        if meta.get("examples") != len(examples):
            bad(f"meta.json counts {meta.get('examples')} pairs, the data has {len(examples)}")
        if meta.get("sha256") != digest:
            bad("logps.safetensors does not match the sha256 in meta.json (truncated or modified)")
        try:
            store = load_file(path / "logps.safetensors")
            for key in ("chosen", "rejected"):
                lengths = store[f"{key}_offsets"].diff().tolist()
                ok = (store[key].dtype == torch.float32 and len(store[key]) == int(store[f"{key}_offsets"][-1])
                      and lengths == [len(e[f"{key}_input_ids"]) for e in examples])
                if not ok:
                    bad(f"its {key} log-probs do not fit the data's {key} lengths")
        except (SafetensorError, KeyError, ValueError, RuntimeError, OSError) as e:
            bad(f"logps.safetensors is unreadable ({type(e).__name__}: {e})")
        return store

    def _release(self) -> None:
        """Drops the reference model: after the pass only the cached log-probs are needed."""
        model = getattr(self.inner, "model", None)
        if model is not None:
            if self.accelerator is not None:  # prepare_model keeps a reference to every model it prepared
                self.accelerator._models = [m for m in self.accelerator._models if m is not model]
            if hasattr(model, "destroy"):  # DeepSpeed engine
                model.destroy()
            del model
        self.inner, self._policy = None, None
        if torch.cuda.is_available():  # wrappers (autocast forward, engine) form cycles: return the memory now
            gc.collect()
            torch.cuda.empty_cache()

    # --- during training --------------------------------------------------------------------------------------

    def completion_logps(self, policy, batch: dict):
        raise AlignError("reference kind 'precomputed' has log-probs only for the preference pairs it cached before "
                         "training; on-policy training scores sampled completions: use frozen, peft_disabled, soup "
                         "or tr_dpo")

    def logps(self, policy, batch: dict) -> PairLogps:
        """Cached log-probs shaped as `pair_logps` would return them: `[B, Tc]`, `[B, Tr]` fp32, 0 off the masks."""
        if not self._rows:
            raise AlignError("reference kind 'precomputed': nothing was precomputed (PreferenceTrainer calls "
                             "precompute() with its datasets)")
        masks = batch["chosen_mask"].cpu(), batch["rejected_mask"].cpu()
        out = torch.zeros(masks[0].shape), torch.zeros(masks[1].shape)
        for i, (prompt, (chosen, rejected)) in enumerate(packed_examples(batch)):
            entry = self._rows.get(_row_digest(prompt.cpu(), chosen.cpu(), rejected.cpu()))
            if entry is None:
                raise AlignError(
                    f"reference kind 'precomputed': batch example {i} (prompt {len(prompt)}, chosen {len(chosen)}, "
                    f"rejected {len(rejected)} tokens) is not among the precomputed pairs; only the datasets given "
                    f"to the trainer ({', '.join(self.cache_info)}) have reference log-probs")
            store, j, offsets = entry
            for k, key in enumerate(("chosen", "rejected")):
                out[k][i, masks[k][i]] = store[key][offsets[k][j]:offsets[k][j + 1]]
        device = batch["chosen_mask"].device
        return PairLogps(out[0].to(device), batch["chosen_mask"], out[1].to(device), batch["rejected_mask"])
