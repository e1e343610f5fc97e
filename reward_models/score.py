"""`align rm score`: reward every (prompt, response) row of a file with a saved ensemble.

Input rows are `{"prompt": ..., "response": ...}`: text, or chat messages (`[{"role", "content"}, ...]`) for the
prompt with a text or message-list response, rendered with the ensemble tokenizer's chat template
(`align.data.tokenize_pairs`, the rule training used). Other fields are carried through unchanged. A
`.jsonl` file is read line by line (each row's fields exactly as written); other sources go through
`align.data.load_rows` (.json, .parquet, .csv, save_to_disk folders, Hub datasets).

Rows are cut as the ensemble was trained: a row longer than the manifest's `max_length` keeps its last tokens (the
end of the response, where the reward is read), and the number of rows cut is logged as one warning line; an
explicit `max_length` (`--max-length`) replaces the manifest's.

Output: JSON Lines, one row per input row in input order, every input field plus `rewards` (the K member rewards,
z-scored when the ensemble stores normalisation statistics) and `reward` (their aggregate). It is written atomically
after every row is scored; an existing output is refused unless `overwrite=True`, and an output whose folder does not
exist is refused (not created). Every check (flags, output folder, rows, ensemble manifest and file digests) runs
before any weight is loaded, and nothing is written before every row is scored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from align.data import check_messages, check_text, is_messages, load_rows, tokenize_pairs, truncate_left
from align.errors import AlignError, ConfigError, DataError
from align.io import atomic_write_text

logger = logging.getLogger("align.reward_models")

OUTPUT_FIELDS = ("rewards", "reward")
# A check_aggregation message names the recipe key; on the command line the flag is what the user typed.
_FLAG_NAMES = {"aggregation.method": "--aggregation", "aggregation.lam": "--lam", "aggregation.ddof": "--ddof"}


def read_response_rows(path: str) -> tuple[list[dict], str]:
    """Reads and validates prompt/response rows → (rows as dicts, the name used in errors)."""
    file = Path(path)
    if file.suffix.lower() == ".jsonl" and file.is_file():
        rows = []
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(path, number, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(path, number, None, f"must be a JSON object with 'prompt' and 'response', got "
                                                        f"{type(row).__name__}")
                rows.append((number, row))
    else:
        dataset, path = load_rows(path)
        rows = list(enumerate(dataset.to_list(), start=1))
    if not rows:
        raise DataError(path, None, None, "has no rows")
    for number, row in rows:
        _check_row(row, source=path, number=number)
    return [row for _, row in rows], path


def _check_row(row: dict, *, source: str, number: int) -> None:
    for name in ("prompt", "response"):
        if row.get(name) is None:
            raise DataError(source, number, name, "is missing" if name not in row else "is null")
    prompt, response = row["prompt"], row["response"]
    if isinstance(prompt, str):
        check_text(prompt, source=source, row=number, name="prompt")
        if is_messages(response) or isinstance(response, list):
            raise DataError(source, number, "response", "is a list of chat messages but the prompt is text; give a "
                                                        "text response or a message-list prompt")
        check_text(response, source=source, row=number, name="response")
    elif isinstance(prompt, list):
        check_messages(prompt, source=source, row=number, name="prompt")
        if isinstance(response, list):
            check_messages(response, source=source, row=number, name="response")
        else:
            check_text(response, source=source, row=number, name="response")
    else:
        raise DataError(source, number, "prompt", f"must be a string or a list of chat messages, got "
                                                  f"{type(prompt).__name__}")


def score_file(ensemble_dir: str, input_path: str, output_path: str, *, batch_size: int = 16,
               aggregation: str | None = None, lam: float | None = None, ddof: int | None = None,
               max_length: int | None = None, overwrite: bool = False, progress: bool = True,
               device=None) -> dict:
    """Scores `input_path` with the ensemble in `ensemble_dir` and writes `output_path` (module docstring).

    `aggregation` / `lam` / `ddof` replace the ensemble's saved aggregation (a method alone takes its default
    parameters; `lam`/`ddof` alone change the saved method's). `max_length` (default: the manifest's, the length
    the ensemble was trained on) cuts longer rows to their last tokens; how many were cut is logged as one warning.
    Every option, the output's folder, the rows and the manifest are checked before any weight is loaded.
    Returns `{"rows", "members", "aggregation", "normalized", "max_length", "truncated", "output"}`."""
    from reward_models.ensemble import RewardEnsemble
    from reward_models.manifest import read_manifest

    output = Path(output_path)
    if output.exists() and not overwrite:
        raise AlignError(f"{output_path}: already exists; pass --overwrite to replace it")
    # A mistyped folder is refused rather than created: the scores would land somewhere the user is not looking.
    if not output.parent.is_dir():
        what = "is not a folder" if output.parent.exists() else "does not exist"
        raise AlignError(f"--output {output_path}: its folder '{output.parent}' {what}; create it or choose another "
                         f"--output")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size: must be a positive integer, got {batch_size!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ConfigError(f"--max-length: must be a positive integer, got {max_length!r}")
    manifest = read_manifest(ensemble_dir)  # no weights read: K, the saved aggregation and the trained length
    chosen = _chosen_aggregation(manifest, aggregation, lam, ddof)
    rows, source = read_response_rows(input_path)
    overlap = sorted({key for row in rows for key in OUTPUT_FIELDS if key in row})
    if overlap:
        logger.warning("%s: input rows already have %s; the output replaces them", source,
                       " and ".join(f"'{k}'" for k in overlap))

    ensemble = RewardEnsemble.load(ensemble_dir, device=device)
    if chosen is not None:
        ensemble.set_aggregation(chosen)  # already checked against K above
    limit = max_length if max_length is not None else ensemble.max_length
    ids = tokenize_pairs(ensemble.tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], None,
                         source=source)
    ids, truncated = truncate_left(ids, limit)
    if truncated:
        given = "--max-length" if max_length is not None else "the ensemble's trained max_length"
        logger.warning("%s: %d of %d rows are longer than %s (%d tokens) and were scored on their last %d tokens",
                       source, truncated, len(rows), given, limit, limit)
    per_member, combined = ensemble.score_ids(ids, batch_size=batch_size, progress=progress)
    lines = []
    for row, rewards, reward in zip(rows, per_member.tolist(), combined.tolist(), strict=True):
        lines.append(json.dumps({**row, "rewards": rewards, "reward": reward}, ensure_ascii=False) + "\n")
    atomic_write_text(output, "".join(lines))
    return {"rows": len(rows), "members": ensemble.num_members, "aggregation": ensemble.aggregation,
            "normalized": ensemble.normalization is not None, "max_length": limit, "truncated": truncated,
            "output": str(output)}


def _chosen_aggregation(manifest: dict, aggregation: str | None, lam: float | None, ddof: int | None
                        ) -> dict | None:
    """The aggregation the flags ask for (None: the saved one), checked against the manifest's K and named by flag."""
    from reward_models.aggregate import check_aggregation

    if aggregation is None and lam is None and ddof is None:
        return None
    chosen = dict(manifest["aggregation"]) if aggregation is None else {"method": aggregation}
    if lam is not None:
        chosen["lam"] = lam
    if ddof is not None:
        chosen["ddof"] = ddof
    params = dict(chosen)
    method = params.pop("method")
    try:
        check_aggregation(method, params, num_members=manifest["num_members"])
    except ConfigError as e:
        message = str(e)
        for key, flag in _FLAG_NAMES.items():
            message = message.replace(key, flag)
        raise ConfigError(message) from None
    return chosen
