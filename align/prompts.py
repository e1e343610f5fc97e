"""Prompt sets: the `prompts:` section shared by `align bon` and on-policy training, and its loader.

A prompt file is `.jsonl` (one object per line) or `.json` (a list of objects), each with a non-empty string
`prompt`; a dataset (`dataset:` a Hub dataset id, a `save_to_disk` folder or a data file, read by `align.data`) has a
`prompt` column of text or of chat-message lists (TRL's prompt-only format); or the toy world's prompt stream. Every
problem is one `DataError` naming the file, the 1-based row and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from align.errors import ConfigError, DataError


@dataclass
class PromptsConfig:
    """Where prompts come from (`prompts:` of `align bon` and of on-policy recipes): exactly one of `file`,
    `dataset` and `toy_world`."""

    file: str | None = field(default=None, metadata={
        "help": "A .jsonl file (one JSON object per line) or a .json file (a list of objects), each with a non-empty "
                "string field `prompt`; other fields are ignored."})
    dataset: str | None = field(default=None, metadata={
        "help": "A dataset with a `prompt` column (text, or chat-message lists rendered with the policy's chat "
                "template): a Hub dataset id such as trl-lib/ultrafeedback-prompt, a save_to_disk folder or a "
                ".jsonl/.json/.parquet/.csv file. On-policy training only (`align bon` takes text prompts)."})
    split: str = field(default="train", metadata={"help": "Split of `dataset`."})
    toy_world: int | None = field(default=None, metadata={
        "help": "Generate this many toy-world prompts (`align.toy_world.make_prompts(K, seed)`)."})
    seed: int = field(default=0, metadata={"help": "Seed of the toy-world prompts."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first `limit` prompts (None: all)."})

    def __post_init__(self):
        if sum(x is not None for x in (self.file, self.dataset, self.toy_world)) != 1:
            raise ConfigError("file: give exactly one of prompts.file (a .jsonl/.json file with a `prompt` field), "
                              "prompts.dataset (a dataset with a `prompt` column) and prompts.toy_world (a number of "
                              "toy prompts)")
        if self.toy_world is not None and self.toy_world < 1:
            raise ConfigError(f"toy_world: must be >= 1 (the number of toy prompts), got {self.toy_world}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be >= 1 or null, got {self.limit}")


def load_prompts(section: PromptsConfig) -> list[str]:
    """The prompts of a `prompts:` section (see PromptsConfig). Errors name the file, the 1-based row and the field.
    Needs no tokenizer, so a recipe can call it before loading any model."""
    from align import toy_world
    from align.data import read_json_records

    if section.toy_world is not None:
        prompts = toy_world.make_prompts(section.toy_world, seed=section.seed)
    elif section.dataset is not None:
        prompts = _dataset_prompts(section.dataset, section.split)
    else:
        path = Path(section.file)
        source = str(path)
        if not path.is_file():
            raise DataError(source, None, None, "prompts file not found (prompts.file)")
        if path.suffix not in (".json", ".jsonl"):
            raise DataError(source, None, None, "prompts.file must be a .jsonl or .json file of {\"prompt\": ...} rows")
        # The reader of `align.data`, so a prompts file and a data file fail the same way: bad JSON, a row that is
        # not an object or an empty file is one error naming the line (row = line number in a .jsonl file).
        try:
            numbered = list(read_json_records(path, source))
        except OSError as e:
            raise DataError(source, None, None, f"cannot read ({e})") from None
        prompts = []
        for row, obj in numbered:
            if "prompt" not in obj:
                raise DataError(source, row, "prompt", "missing (each row must be an object with a string `prompt`)")
            prompt = obj["prompt"]
            if not isinstance(prompt, str):
                raise DataError(source, row, "prompt", f"must be a string, got {type(prompt).__name__}")
            if not prompt.strip():
                raise DataError(source, row, "prompt", "is empty; remove the row or give it a prompt")
            prompts.append(prompt)
    if section.limit is not None:
        prompts = prompts[:section.limit]
    if not prompts:
        raise DataError(prompts_source(section), None, None, "no prompts")
    return prompts




def prompts_source(section: PromptsConfig) -> str:
    """What a `prompts:` section reads, as errors name it."""
    return section.file or section.dataset or "prompts.toy_world"


def _dataset_prompts(source: str, split: str) -> list:
    from align.data import check_messages, check_text, is_messages, load_rows

    rows, name = load_rows(source, split)
    if "prompt" not in rows.column_names:
        raise DataError(name, None, "prompt", f"no `prompt` column (columns: {', '.join(rows.column_names)})")
    prompts = []
    for row, value in enumerate(rows["prompt"], start=1):
        if is_messages(value):
            prompts.append(check_messages(value, source=name, row=row, name="prompt"))
        else:
            prompts.append(check_text(value, source=name, row=row, name="prompt"))
    return prompts
