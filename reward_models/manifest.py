"""The on-disk format of a saved reward ensemble: its directory layout, `manifest.json`, and the checks `load` makes
before torch, safetensors or a tokenizer reads any file of the directory.

`RewardEnsemble.save` writes a directory atomically (`align.io.atomic_directory`):

    manifest.json                    format version, kind, members, seeds, aggregation, normalization, base model,
                                     dtype, how rows are tokenized (`max_length`: the longest row training saw,
                                     null for no limit; `truncation_side`: "left", a longer row keeps its last
                                     tokens), and the sha256 and size of every file below
    tokenizer files                  (tokenizer.json, tokenizer_config.json, ...)
    seeds:      member-0/ ... member-{K-1}/     `save_pretrained` folders (num_labels = 1)
    multi_head: model/                          one `save_pretrained` folder (num_labels = K)
    lora:       base/                           the base seq-cls model without adapters
                adapters/member-0/ ...          PEFT adapter folders (LoRA factors + the member's head)

`read_manifest` checks the manifest itself (keys, kind, member layout, aggregation, tokenization, file records);
`check_files` checks the directory against it: missing or extra members, changed, truncated, missing or unrecorded
files, pickled weights, paths outside the directory. Any mismatch is one `AlignError` naming the directory and the
file. Verifying the digests reads every weight file once more (about a second per GB); `verify=False` skips the
hashing (sizes are still checked). A manifest written before `max_length` and `truncation_side` existed loads with
no truncation (the behaviour of that time).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from align.errors import AlignError, ConfigError
from reward_models.aggregate import check_aggregation, split_aggregation
from reward_models.modeling import one_line

#: How an ensemble may hold its K members (`reward_models.ensemble` has one class per kind).
ENSEMBLE_KINDS = ("seeds", "multi_head", "lora")
#: How a row longer than `max_length` is cut: "left" drops its first tokens (`align.data.truncate_left`, the one
#: rule reward-model training and scoring use).
TRUNCATION_SIDES = ("left",)
MANIFEST = "manifest.json"
FORMAT = "align.reward_ensemble"
FORMAT_VERSION = 1
_HASH_CHUNK = 1 << 20
#: Files that unpickle when loaded (arbitrary code); an ensemble's weights are safetensors, so none is ever read.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def member_name(k: int) -> str:
    """Member k's name: its folder (kind `seeds`), its adapter (kind `lora`), its manifest entry."""
    return f"member-{k}"


def member_path(kind: str, k: int) -> str:
    """Where member k's weights are, relative to the ensemble directory (the layout above)."""
    if kind == "seeds":
        return member_name(k)
    if kind == "multi_head":
        return "model"
    return f"adapters/{member_name(k)}"


def sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, fields: dict[str, Any]) -> None:
    """Writes `directory/manifest.json`: the format and its version, `fields` (kind, members, seeds, ...: the keys
    `read_manifest` reads) and the sha256 and size of every file already under `directory`."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        files[path.relative_to(directory).as_posix()] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **fields, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(directory: str | Path) -> dict:
    """The checked manifest of the ensemble in `directory` (keys, kinds, member layout, aggregation, tokenization,
    file records), read without touching any weight file: commands use it to check their options against the
    ensemble (K, aggregation) before loading it. Any problem is one AlignError naming the directory and the file."""
    directory = Path(directory)
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
        raise AlignError(f"{where}: {MANIFEST} is not valid JSON ({one_line(e)})") from None

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
    for i, entry in enumerate(members):
        path = member_path(kind, i)
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
        check_aggregation(*split_aggregation(manifest["aggregation"]), num_members=k)
    except ConfigError as e:
        fail(str(e))
    normalization = manifest["normalization"]
    if normalization is not None and not (
            isinstance(normalization, dict) and set(normalization) == {"mean", "std"}
            and all(isinstance(normalization[key], list) and len(normalization[key]) == k for key in ("mean", "std"))):
        fail(f"normalization must be null or {{'mean': [{k} floats], 'std': [{k} floats]}}")
    return manifest


def check_files(directory: Path, manifest: dict, *, verify: bool) -> None:
    """The directory holds exactly the members `manifest` (from `read_manifest`) lists, and every recorded file
    unchanged: sizes always, sha256 digests when `verify`."""
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
        if verify and sha256(path) != record["sha256"]:
            raise AlignError(f"{where}: {rel} does not match {MANIFEST} (sha256 differs): the file changed after "
                             "saving")
