"""`align rm score`: reward every (prompt, response) row of a file with a saved ensemble.

Input rows are `{"prompt": ..., "response": ...}`: text, or chat messages (`[{"role", "content"}, ...]`) for the
prompt with a text or message-list response, rendered with the ensemble tokenizer's chat template
(`reward_models.ensemble.encode_pairs`, the rule training used). Other fields are carried through unchanged. A
`.jsonl` file is read line by line (each row's fields exactly as written); other sources go through
`align.data.load_rows` (.json, .parquet, .csv, save_to_disk folders, Hub datasets).

Output: JSON Lines, one row per input row in input order, every input field plus `rewards` (the K member rewards,
z-scored when the ensemble stores normalisation statistics) and `reward` (their aggregate). It is written atomically
after every row is scored, and an existing output is refused unless `overwrite=True`. Every check (rows, ensemble
manifest and weights, aggregation) runs before anything is written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from align.data import check_messages, check_text, is_messages, load_rows
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
    parameters; `lam`/`ddof` alone change the saved method's). Returns `{"rows", "members", "aggregation",
    "output"}`."""
    from reward_models.ensemble import RewardEnsemble

    output = Path(output_path)
    if output.exists() and not overwrite:
        raise AlignError(f"{output_path}: already exists; pass --overwrite to replace it")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size: must be a positive integer, got {batch_size!r}")
    rows, source = read_response_rows(input_path)
    ensemble = RewardEnsemble.load(ensemble_dir, device=device)
    if aggregation is not None or lam is not None or ddof is not None:
        if aggregation is None:
            chosen = dict(ensemble.aggregation)
        else:
            chosen = {"method": aggregation}
        if lam is not None:
            chosen["lam"] = lam
        if ddof is not None:
            chosen["ddof"] = ddof
        try:
            ensemble.set_aggregation(chosen)
        except ConfigError as e:
            message = str(e)
            for key, flag in _FLAG_NAMES.items():
                message = message.replace(key, flag)
            raise ConfigError(message) from None
    overlap = sorted({key for row in rows for key in OUTPUT_FIELDS if key in row})
    if overlap:
        logger.warning("%s: input rows already have %s; the output replaces them", source,
                       " and ".join(f"'{k}'" for k in overlap))
    per_member, combined = ensemble.score([r["prompt"] for r in rows], [r["response"] for r in rows],
                                          batch_size=batch_size, progress=progress, max_length=max_length)
    lines = []
    for row, rewards, reward in zip(rows, per_member.tolist(), combined.tolist(), strict=True):
        lines.append(json.dumps({**row, "rewards": rewards, "reward": reward}, ensure_ascii=False) + "\n")
    atomic_write_text(output, "".join(lines))
    return {"rows": len(rows), "members": ensemble.num_members, "aggregation": ensemble.aggregation,
            "normalized": ensemble.normalization is not None, "output": str(output)}
