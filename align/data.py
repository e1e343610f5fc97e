"""Preference data for the DPO-family trainer: TRL's preference formats → validated token ids.

Formats
-------
TRL's standard preference formats, taken as they are. The format is detected from the first row and every other
row must have the same one; columns other than `prompt`/`chosen`/`rejected` are ignored.

- explicit prompt, text:          `{"prompt": str, "chosen": str, "rejected": str}`
- explicit prompt, conversational: the three fields are message lists `[{"role": ..., "content": ...}, ...]`
- implicit prompt, text:          `{"chosen": str, "rejected": str}`; the prompt is their common prefix
- implicit prompt, conversational: `{"chosen": [...], "rejected": [...]}`; the prompt is their common leading turns

The implicit prompt is extracted with `trl.data_utils.extract_prompt` and chat templates are applied with
`trl.data_utils.apply_chat_template` (`render_chat`), so a dataset means here what it means to TRL. (As in TRL, a text
`prompt` column next to conversational completions is ignored and the prompt extracted; and the text common prefix
is taken character by character, so it can end inside a word — a warning counts such rows.) Roles must be one of
system, user, assistant, tool, and contents must be non-empty strings. Every problem with a row is one `DataError`
naming the file, the 1-based row number and the field (message fields as `chosen[1].role`, 0-based message index).

Files and checks
----------------
`.json`/`.jsonl` (a JSON list of row objects, or one object per line), `.csv` (a header line, then one row per
line), `.parquet`, a `save_to_disk` folder or a Hub dataset, read with `datasets`. A file that cannot be read is one
`DataError` naming the file and the line (`bad.jsonl: line 7: not valid JSON (...)`, a line that is not an object,
a CSV line with the wrong number of fields) or saying what is wrong with it as a whole (empty, not Parquet, an object
wrapping the rows as `{"train": [...]}`). `check_preference_data` reads and validates the rows without a tokenizer, so
a recipe can report bad data before it loads a model; `build_preference_dataset(..., checked=)` then tokenizes them.

Tokens
------
- prompt: as TRL 1.16 tokenizes it. A text prompt gets the tokenizer's own special tokens (`add_special_tokens=True`:
  BOS for Llama-style tokenizers, nothing for Qwen-style ones). A chat-template prompt is tokenized with
  `add_special_tokens=False`, because the template already writes whatever BOS the model expects. A doubled leading
  BOS (text that already began with the BOS string) is collapsed to one. A prompt must have at least one token for the
  first completion token to be predicted from: an empty one gets BOS, or is an error if the tokenizer has none.
- chosen / rejected: `add_special_tokens=False`, then EOS appended unless it is already the last token, so the model
  learns to stop. For chat templates the whitespace a template writes after the end-of-turn marker is dropped first
  (otherwise `<|im_end|>\\n` would become `<|im_end|>\\n<|im_end|>` for tokenizers whose EOS is the end-of-turn).

The same rules make every other row of ids a model is trained on, sampled after or scored on: `tokenize_prompts`
(the prompts an on-policy run samples after) and `tokenize_pairs` (a reward model's `prompt + response` rows, for
training and scoring), so a policy and its reward model see the same ids for the same text. A reward model's row
that is too long keeps its last tokens (`truncate_left`: the end of the response, where the reward is read).

Length policy
-------------
`max_prompt_length` bounds the prompt, `max_length` bounds prompt + one completion (each of chosen and rejected is
checked on its own); `None` means no bound.

- `truncate` (default): a prompt longer than `max_prompt_length` keeps its LAST `max_prompt_length` tokens (the end
  nearest the response, which matters most for it); then each completion keeps its FIRST
  `max_length - len(prompt)` tokens (a cut completion loses its EOS). A prompt that alone still has
  `>= max_length` tokens leaves no room for any completion token: that row is a `DataError`, because training on
  it would teach nothing and silently skipping it would hide the problem.
- `drop`: a row that would need any truncation under the rule above is dropped whole.

Counts (prompts truncated, chosen truncated, rejected truncated, rows dropped) go into a `LengthReport`, which is
logged on the `align.data` logger — at WARNING level whenever something was truncated or dropped. Dropping every
row is a `DataError`.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from align.errors import ConfigError, DataError
from align.schema import ConfigKeyError

logger = logging.getLogger("align.data")

CHAT_ROLES = ("system", "user", "assistant", "tool")
LENGTH_POLICIES = ("truncate", "drop")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
# File extension → `datasets` builder.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Texts per tokenizer call: large enough for the fast tokenizer's batch path to pay off, small enough to bound the
# memory of one call.
TOKENIZE_CHUNK = 1000
# A Hub dataset id is `name` or `namespace/name`; anything else that does not exist locally is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class DataConfig:
    """Where the preference data comes from and how long its sequences may be."""

    train: str = field(
        metadata={"help": "Training preference data (required): a local .json/.jsonl/.parquet/.csv file, a folder "
                          "written by `datasets.save_to_disk`, or a Hub dataset name."},
    )
    train_split: str = field(
        default="train",
        metadata={"help": "Split of `train` to use. A single file has only the split 'train'."},
    )
    eval: str | None = field(
        default=None,
        metadata={"help": "Evaluation preference data, same kinds of source as `train`; null for none."},
    )
    eval_split: str = field(
        default="train",
        metadata={"help": "Split of the `eval` source to use (a different source from `train`, hence 'train' by "
                          "default; e.g. 'test' for a Hub dataset with both splits)."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Most tokens of prompt + one completion (chosen or rejected, each on its own); null for "
                          "no bound."},
    )
    max_prompt_length: int | None = field(
        default=512,
        metadata={"help": "Most prompt tokens (after the chat template); a longer prompt keeps its last tokens. "
                          "Null for no bound."},
    )
    length_policy: str = field(
        default="truncate",
        metadata={"help": "What to do with a row over the bounds: 'truncate' (prompt keeps its end, completions "
                          "their start) or 'drop' (the row is left out). Both are counted and logged."},
    )

    def __post_init__(self):
        def fail(name: str, problem: str):
            raise ConfigKeyError(("data", name), problem)

        if not isinstance(self.train, str) or not self.train.strip():
            fail("train", f"must name the training data (a file, a save_to_disk folder or a Hub dataset), "
                          f"got {self.train!r}")
        if self.eval is not None and (not isinstance(self.eval, str) or not self.eval.strip()):
            fail("eval", f"must name the evaluation data or be null, got {self.eval!r}")
        for name in ("train_split", "eval_split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                fail(name, f"must be a split name such as 'train', got {value!r}")
        for name in ("max_length", "max_prompt_length"):
            value = getattr(self, name)
            # bool is an int subclass; `max_length: true` is a typo, not a length.
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                fail(name, f"must be a positive integer or null, got {value!r}")
        if self.length_policy not in LENGTH_POLICIES:
            fail("length_policy", f"must be one of {', '.join(LENGTH_POLICIES)}, got {self.length_policy!r}")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_rows(source: str, split: str = "train") -> tuple[Any, str]:
    """Loads the rows of `source` (see `DataConfig.train`) → (a `datasets.Dataset`, the name used in errors)."""
    import datasets

    name = source
    path = Path(source).expanduser()
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DataError(name, None, None, f"folder is not a `datasets.save_to_disk` folder ({e})") from None
        return _pick_split(loaded, split, name), name
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(name, None, None, f"unsupported file type {path.suffix!r}; use one of "
                                              f"{', '.join(FILE_BUILDERS)} or a save_to_disk folder")
        if split != "train":
            raise DataError(name, None, None, f"split {split!r} not found: a single file has only the split 'train'")
        return _load_file(path, builder, name), name
    if path.suffix.lower() in FILE_BUILDERS or not _HUB_ID.match(source):
        raise DataError(name, None, None, "file not found")
    try:
        return datasets.load_dataset(source, split=split), name
    except ValueError as e:
        if "Unknown split" not in str(e):
            raise DataError(name, None, None, f"could not be loaded from the Hub: {_one_line(e)}") from None
        # datasets' message lists the available splits
        raise DataError(name, None, None, f"split {split!r} not found ({_one_line(e)})") from None
    except Exception as e:  # noqa: BLE001  (whatever the Hub or the builder raised, as one line)
        raise DataError(name, None, None, f"is neither a local file or folder nor a dataset that could be loaded "
                                          f"from the Hub ({type(e).__name__}: {_one_line(e)})") from None


def _pick_split(loaded, split: str, name: str):
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(name, None, None, f"split {split!r} not found; available splits: "
                                              f"{', '.join(repr(s) for s in loaded)}")
        return loaded[split]
    if split != "train":  # a single saved Dataset has no splits; treat it like a single file
        raise DataError(name, None, None, f"split {split!r} not found: the folder holds a single dataset, whose "
                                          f"only split is 'train'")
    return loaded


def _one_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------------------------------------------
# Local files. `datasets` reads them (fast Arrow readers, cached, constant memory for large JSONL/Parquet), but when
# it fails it says where only inside a chunk ("in row 2" of some block), logs its own ERROR line, and reports an
# empty file as a bare StopIteration. So a file that `datasets` cannot read is read again here, line by line with the
# standard library, only to find and name the first bad line; the slow Python pass is paid on failure only, never on
# a good large file. CSV is the exception, scanned before every read (see `_scan_csv`).

EMPTY = "file is empty (no rows)"


def _load_file(path: Path, builder: str, name: str):
    """One local data file as a `datasets.Dataset`, or a one-line DataError naming the file and the line/row."""
    import datasets

    if path.stat().st_size == 0:  # `datasets` would raise a bare StopIteration
        raise DataError(name, None, None, EMPTY)
    if builder == "csv":
        _scan_csv(path, name)
    try:
        # The "Generating train split" bar of a first read is noise next to our own one-line report, and so is the
        # ERROR line `datasets` logs before raising (its problem is reported below, with the line).
        with _datasets_progress_off(), _datasets_quiet():
            rows = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001  (readers raise many types: ArrowInvalid, ParserError, ValueError…)
        if builder == "json":
            _scan_json(path, name)
        elif builder == "parquet":
            _scan_parquet(path, name)
        # Nothing found by the scan (e.g. an int in one row and a string in another): the innermost reason.
        raise DataError(name, None, None, f"could not be read as {builder}: {_root_cause(e)}") from None
    if len(rows) == 0:
        raise DataError(name, None, None, EMPTY)
    if builder == "json":
        _check_json_shape(path, rows, name)
    return rows


@contextlib.contextmanager
def _datasets_quiet():
    # Only the level of the `datasets` logger: a record below it is dropped where it is made, in any child logger.
    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logger.setLevel(level)


def _root_cause(error: BaseException) -> str:
    # `datasets` wraps reader errors in "An error occurred while generating the dataset"; the cause says what.
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {_one_line(error)}" if not str(error).strip() else _one_line(error)


def _json_kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _not_an_object(value) -> str:
    return f"is {_json_kind(value)}, not a JSON object with the row's fields"


def _wrapped_rows(value) -> list[str]:
    """The keys of an object that holds lists of rows rather than being a row: `{"train": [{...}, ...]}`."""
    if not isinstance(value, dict) or not value:
        return []
    keys = [k for k, v in value.items() if isinstance(v, list) and v and isinstance(v[0], dict) and not is_messages(v)]
    return keys if len(keys) == len(value) else []


def _wrapped_problem(keys: list[str]) -> str:
    return (f"is one JSON object whose {', '.join(repr(k) for k in keys)} holds a list of rows; the file must be a "
            f"JSON list of row objects ([{{...}}, {{...}}]) or one object per line (.jsonl)")


def _json_error(error: json.JSONDecodeError, line: int | None = None) -> str:
    return f"line {line or error.lineno}: not valid JSON ({error.msg}: column {error.colno})"


def _first_char(path: Path) -> bytes:
    """The first byte of `path` that is not whitespace or a UTF-8 byte-order mark (b"" for a blank file)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        while head:
            text = head.removeprefix(codecs.BOM_UTF8).lstrip()
            if text:
                return text[:1]
            head = f.read(1 << 16)
    return b""


def read_json_records(path: Path, name: str):
    """Yields (row number, object) for each row of a JSON file: a JSON list of objects (row = 1-based position) or
    one object per line, blank lines allowed (row = line number). As `datasets` does, the layout comes from the first
    character (`[` or not), whatever the extension. Every problem is a one-line DataError naming the line or row:
    bad JSON, a row that is not an object, an object that wraps the rows (`{"train": [...]}`), no rows at all."""
    first = _first_char(path)
    if not first:
        raise DataError(name, None, None, EMPTY)
    if first == b"[":
        data = path.read_bytes()
        try:
            rows = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise DataError(name, None, None, f"line {line}: is not UTF-8 text ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise DataError(name, None, None, _json_error(e)) from None
        if not rows:
            raise DataError(name, None, None, EMPTY)
        for row, value in enumerate(rows, start=1):
            if not isinstance(value, dict):
                raise DataError(name, row, None, _not_an_object(value))
            yield row, value
        return
    seen = False
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(name, None, None, f"line {line_number}: is not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))  # without its newline, an error's column is on this line
            except json.JSONDecodeError as e:
                # A first line that opens a structure and stops (`{`, `{"train": [`) starts a pretty-printed object;
                # one that stops elsewhere is a broken row, reported as such.
                if not seen and line.lstrip().startswith("{") and line.rstrip().endswith(("{", "[", ",")):
                    _multiline_object(path, name)
                raise DataError(name, None, None, _json_error(e, line_number)) from None
            if not isinstance(value, dict):
                raise DataError(name, None, None, f"line {line_number}: {_not_an_object(value)} (one object per "
                                                  f"line)")
            if not seen and _wrapped_rows(value):
                raise DataError(name, None, None, _wrapped_problem(_wrapped_rows(value)))
            seen = True
            yield line_number, value
    if not seen:
        raise DataError(name, None, None, EMPTY)


def _multiline_object(path: Path, name: str):
    """The first line of a JSON-lines file is not JSON on its own: the file may be one object over several lines
    (pretty-printed), which is a clearer thing to report than line 1 (and a syntax error in it has the right line)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        return
    except json.JSONDecodeError as e:
        raise DataError(name, None, None, _json_error(e)) from None
    keys = _wrapped_rows(value)
    if keys:
        raise DataError(name, None, None, _wrapped_problem(keys))
    raise DataError(name, None, None, f"is {_json_kind(value)} spread over several lines; the file must be a JSON "
                                      f"list of row objects or one object per line (.jsonl)")


def _scan_json(path: Path, name: str):
    for _ in read_json_records(path, name):
        pass


def _check_json_shape(path: Path, rows, name: str):
    # Layouts that `datasets` reads without complaint but that do not hold rows; both checks look at one row or the
    # first bytes, so a good file pays nothing. A JSON list of strings or numbers becomes a `text` column:
    if rows.column_names == ["text"] and _first_char(path) == b"[" and not isinstance(rows[0]["text"], dict):
        with open(path, "rb") as f:
            head = f.read(200).lstrip(codecs.BOM_UTF8 + b" \t\r\n")[1:].lstrip()
        if not head.startswith(b"{"):
            _scan_json(path, name)
    # One object holding the rows in a field, `{"train": [...]}`, becomes one row with a `train` column:
    if len(rows) == 1:
        keys = _wrapped_rows(rows[0])
        if keys:
            raise DataError(name, None, None, _wrapped_problem(keys))


def _scan_csv(path: Path, name: str):
    """Checks the CSV layout before `datasets` (pandas) reads it: pandas fills a row with too few fields with nulls
    (seen later as "field 'rejected' is missing" with a row number one off the line) and reports a row with too many
    only by a block-relative line. Preference CSVs are small next to JSONL/Parquet dumps, so one streaming pass with
    the csv module (constant memory) is cheap here, and it names the line a user opens in an editor."""
    import csv

    def lines(f):
        for number, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(name, None, None, f"line {number}: is not UTF-8 text ({e.reason})") from None

    with open(path, "rb") as f:
        reader = csv.reader(lines(f))
        header, data_rows = None, 0
        try:
            for record in reader:
                if not record or not any(cell.strip() for cell in record):  # pandas skips blank lines too
                    continue
                if header is None:
                    header = record
                    header_line = reader.line_num
                    continue
                if len(record) != len(header):
                    count = f"{len(record)} field{'s' if len(record) != 1 else ''}"
                    raise DataError(name, None, None, f"line {reader.line_num}: has {count} but the header (line "
                                                      f"{header_line}) has {len(header)}")
                data_rows += 1
        except csv.Error as e:
            raise DataError(name, None, None, f"line {reader.line_num}: not valid CSV ({e})") from None
    if header is None:
        raise DataError(name, None, None, EMPTY)
    if not data_rows:
        raise DataError(name, None, None, f"{EMPTY}: only the header line")


def _scan_parquet(path: Path, name: str):
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as e:  # noqa: BLE001  (not Parquet, truncated, corrupt footer: pyarrow's types vary)
        raise DataError(name, None, None, f"could not be read as parquet ({_root_cause(e)})") from None
    if rows == 0:
        raise DataError(name, None, None, EMPTY)


# ---------------------------------------------------------------------------------------------------------------
# Row validation. Small functions, reused for other row shapes (e.g. reward-model prompt/response rows).


@contextlib.contextmanager
def _datasets_progress_off():
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def require(example: dict, name: str, *, source: str, row: int):
    """The value of field `name`, or a DataError if it is missing or null."""
    if name not in example:
        raise DataError(source, row, name, "is missing")
    value = example[name]
    if value is None:
        # `datasets` fills a key that this row lacks (and other rows have) with null, so null also means missing.
        raise DataError(source, row, name, "is missing or null")
    return value


def check_text(value, *, source: str, row: int, name: str) -> str:
    """`value` as a non-empty string, or a DataError."""
    if value is None:
        raise DataError(source, row, name, "is null")
    if not isinstance(value, str):
        raise DataError(source, row, name, f"must be a string, got {_kind(value)}")
    if not value.strip():
        raise DataError(source, row, name, "is empty" if not value else "is whitespace only")
    return value


def check_messages(value, *, source: str, row: int, name: str) -> list[dict]:
    """`value` as a non-empty list of `{"role", "content"}` chat messages, or a DataError naming the message."""
    if not isinstance(value, list):
        raise DataError(source, row, name, f"must be a list of chat messages, got {_kind(value)}")
    if not value:
        raise DataError(source, row, name, "is an empty list of messages")
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise DataError(source, row, where, f"must be a message dict with 'role' and 'content', "
                                                f"got {_kind(message)}")
        for key in ("role", "content"):
            if message.get(key) is None:
                raise DataError(source, row, f"{where}.{key}", "is missing")
        if message["role"] not in CHAT_ROLES:
            raise DataError(source, row, f"{where}.role", f"unknown chat role {message['role']!r}; allowed: "
                                                          f"{', '.join(CHAT_ROLES)}")
        check_text(message["content"], source=source, row=row, name=f"{where}.content")
    return value


def is_messages(value) -> bool:
    """Whether `value` looks like a conversation (TRL's `is_conversational` test, without its IndexError on [])."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _kind(value) -> str:
    if is_messages(value):
        return "a list of chat messages"
    return type(value).__name__


@dataclass(frozen=True)
class PreferenceFormat:
    conversational: bool
    explicit_prompt: bool

    def __str__(self):
        return (f"{'explicit' if self.explicit_prompt else 'implicit'}-prompt "
                f"{'conversational' if self.conversational else 'text'}")


def detect_format(example: dict, *, source: str) -> PreferenceFormat:
    """The preference format of the first row (row 1)."""
    chosen = require(example, "chosen", source=source, row=1)
    require(example, "rejected", source=source, row=1)
    if isinstance(chosen, list):
        conversational = True
    elif isinstance(chosen, str):
        conversational = False
    else:
        raise DataError(source, 1, "chosen", f"must be a string or a list of chat messages, got {_kind(chosen)}")
    if "prompt" not in example:
        return PreferenceFormat(conversational, explicit_prompt=False)
    prompt = require(example, "prompt", source=source, row=1)
    if conversational and isinstance(prompt, str):
        # TRL's `maybe_extract_prompt` rule: some datasets carry a text prompt next to conversations that already
        # contain it; the prompt is then extracted from the conversations and the text column ignored.
        return PreferenceFormat(True, explicit_prompt=False)
    if not conversational and not isinstance(prompt, str):
        raise DataError(source, 1, "prompt", f"must be a string like 'chosen', got {_kind(prompt)}")
    return PreferenceFormat(conversational, explicit_prompt=True)


def _check_field(value, fmt: PreferenceFormat, *, source: str, row: int, name: str):
    # A value of the other family (text vs messages) is a format change, which says more than "wrong type".
    if fmt.conversational and isinstance(value, str):
        raise DataError(source, row, name, f"is a string but row 1 is {fmt}; every row must have row 1's format")
    if not fmt.conversational and is_messages(value):
        raise DataError(source, row, name, f"is a list of chat messages but row 1 is {fmt}; every row must have "
                                           f"row 1's format")
    if fmt.conversational:
        return check_messages(value, source=source, row=row, name=name)
    return check_text(value, source=source, row=row, name=name)


def validate_preference_row(example: dict, fmt: PreferenceFormat, *, source: str, row: int) -> dict:
    """Checks one row against `fmt` → `{"prompt", "chosen", "rejected"}` (prompt extracted if implicit)."""
    from trl.data_utils import extract_prompt

    out = {name: _check_field(require(example, name, source=source, row=row), fmt, source=source, row=row,
                              name=name)
           for name in ("chosen", "rejected")}
    if fmt.explicit_prompt:
        out["prompt"] = _check_field(require(example, "prompt", source=source, row=row), fmt, source=source, row=row,
                                     name="prompt")
    else:
        prompt = example.get("prompt")
        if prompt is not None and isinstance(prompt, list) == fmt.conversational:
            raise DataError(source, row, "prompt", f"is given but row 1 is {fmt} (it has no prompt); every row must "
                                                   f"have row 1's format")
        chosen, rejected = out["chosen"], out["rejected"]
        # `extract_prompt` assumes chosen and rejected differ after a common prefix: for identical pairs or when one
        # is a prefix of the other it cuts one character/message too early, and on a first-character difference
        # it may cut at -1. Such rows have no well-defined implicit prompt.
        if chosen == rejected:
            raise DataError(source, row, "chosen", "chosen and rejected are identical, so no prompt can be "
                                                   "extracted (and the pair teaches nothing)")
        shorter, longer = sorted((chosen, rejected), key=len)
        if longer[:len(shorter)] == shorter:
            raise DataError(source, row, "chosen" if shorter is chosen else "rejected",
                            "is a prefix of the other completion, so the implicit prompt (their common prefix) "
                            "leaves it empty")
        if chosen[0] != rejected[0]:
            raise DataError(source, row, "prompt", "the implicit prompt is empty: chosen and rejected have no "
                                                   "common prefix; add a 'prompt' field")
        out = extract_prompt({"chosen": chosen, "rejected": rejected})
        if not out["prompt"] or (isinstance(out["prompt"], str) and not out["prompt"].strip()):
            raise DataError(source, row, "prompt", "the implicit prompt (common prefix of chosen and rejected) is "
                                                   "empty; add a 'prompt' field")
    if fmt.conversational and out["prompt"][-1]["role"] == "system":
        # Nothing to complete after a system turn; TRL's template code rejects it with a bare ValueError.
        raise DataError(source, row, f"prompt[{len(out['prompt']) - 1}].role",
                        "the prompt's last message is a system message; it must end with a user, tool or "
                        "assistant message")
    return out


@dataclass
class CheckedRows:
    """Validated preference rows (`validate_preference_row`'s `{"prompt", "chosen", "rejected"}` dicts, prompt
    extracted if implicit), their format and the name errors use. Only a tokenizer is missing to train on them."""

    source: str
    rows: list[dict]
    format: PreferenceFormat


def check_preference_rows(rows, *, source: str) -> CheckedRows:
    """`validate_preference_rows`, plus the warnings that need no tokenizer (implicit text prompts cut mid-word)."""
    checked, fmt = validate_preference_rows(rows, source=source)
    if not fmt.conversational and not fmt.explicit_prompt:
        _warn_mid_word_prompts(checked, source)
    return CheckedRows(source=source, rows=checked, format=fmt)


def validate_preference_rows(rows, *, source: str) -> tuple[list[dict], PreferenceFormat]:
    """Checks every row (a `datasets.Dataset` or a list of dicts) → (validated rows, the dataset's format)."""
    if hasattr(rows, "select_columns"):  # datasets.Dataset: read only the columns we use, as plain Python
        rows = rows.select_columns([c for c in PREFERENCE_FIELDS if c in rows.column_names]).to_list()
    if len(rows) == 0:
        raise DataError(source, None, None, "has no rows")
    first = rows[0]
    if not isinstance(first, dict):
        raise DataError(source, 1, None, f"must be a dict with 'chosen' and 'rejected', got {_kind(first)}")
    fmt = detect_format(first, source=source)
    checked = []
    for i, example in enumerate(rows, start=1):
        if not isinstance(example, dict):
            raise DataError(source, i, None, f"must be a dict with 'chosen' and 'rejected', got {_kind(example)}")
        checked.append(validate_preference_row(example, fmt, source=source, row=i))
    return checked, fmt


# ---------------------------------------------------------------------------------------------------------------
# Tokenization and the length policy


@dataclass
class LengthReport:
    """What the length policy did to one dataset."""

    source: str
    rows: int
    kept: int
    prompts_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    dropped: int = 0

    def summary(self) -> str:
        return (f"{self.source}: kept {self.kept} of {self.rows} rows; truncated {self.prompts_truncated} prompts, "
                f"{self.chosen_truncated} chosen, {self.rejected_truncated} rejected; dropped {self.dropped} rows")

    @property
    def changed(self) -> bool:
        return bool(self.prompts_truncated or self.chosen_truncated or self.rejected_truncated or self.dropped)


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized preference pairs: items `{"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}` (lists)."""

    def __init__(self, prompt_input_ids: list[list[int]], chosen_input_ids: list[list[int]],
                 rejected_input_ids: list[list[int]]):
        assert len(prompt_input_ids) == len(chosen_input_ids) == len(rejected_input_ids)
        self.prompt_input_ids = prompt_input_ids
        self.chosen_input_ids = chosen_input_ids
        self.rejected_input_ids = rejected_input_ids

    def __len__(self) -> int:
        return len(self.prompt_input_ids)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"prompt_input_ids": self.prompt_input_ids[index], "chosen_input_ids": self.chosen_input_ids[index],
                "rejected_input_ids": self.rejected_input_ids[index]}


def _tokenize_batched(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        ids.extend(tokenizer(texts[start:start + TOKENIZE_CHUNK], add_special_tokens=add_special_tokens)["input_ids"])
    return ids


def finish_prompt_ids(ids: list[int], tokenizer, *, source: str = "<prompts>", row: int | None = None,
                      required: bool = True) -> list[int]:
    """A tokenized prompt as training sees it (module docstring, "Tokens"): a doubled leading BOS collapsed to one,
    an empty prompt replaced by BOS. With no BOS to stand in, an empty prompt is a `DataError` naming `source`/`row`
    when `required` (a policy predicts its first completion token from the prompt's last one) and stays empty
    otherwise (a reward model reads its reward at the end of the row)."""
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
        ids = ids[1:]
    if not ids and bos is not None:
        ids = [bos]
    if not ids and required:
        raise DataError(source, row, "prompt", "tokenizes to no tokens and the tokenizer has no BOS token "
                                               "to stand in for it")
    return list(ids)


def finish_completion_ids(ids: list[int], tokenizer) -> list[int]:
    """A tokenized completion as training sees it: EOS appended unless it is already the last token (a policy
    learns to stop; a reward model reads its reward there). Unchanged when the tokenizer has no EOS."""
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        return list(ids) + [eos]
    return list(ids)


def render_chat(example: dict, tokenizer, *, source: str, row: int) -> dict[str, str]:
    """One conversational row → the same keys as text, rendered with the tokenizer's chat template by TRL's
    `apply_chat_template` (`prompt` plus `chosen`/`rejected` or `completion`, each a message list). Each completion
    loses the whitespace the template writes after its end-of-turn marker (module docstring, "Tokens"). A template
    that fails is a `DataError` naming `source` and `row`."""
    from trl.data_utils import apply_chat_template

    try:
        texts = apply_chat_template(example, tokenizer)
    except Exception as e:  # noqa: BLE001  (jinja errors raised by the model's own template, e.g. role alternation)
        raise DataError(source, row, None, f"the chat template failed: {_one_line(e)}") from None
    return {key: text if key == "prompt" else text.rstrip() for key, text in texts.items()}


def tokenize_prompts(tokenizer, prompts: list, *, source: str = "<prompts>") -> list[list[int]]:
    """The token ids a prompt is trained on and sampled after: the one home of prompt tokenization.

    Each prompt is one of:
    - text: tokenized with the tokenizer's special tokens (`add_special_tokens=True`), as preference rows are;
    - a message list `[{"role": ..., "content": ...}, ...]`: rendered with the chat template and the generation
      prompt (`add_generation_prompt=True`), then tokenized without special tokens (the template writes them);
    - token ids (a list of ints): taken as they are, so ids from the data pipeline are never decoded and re-tokenized.

    Text and templated prompts then go through `finish_prompt_ids` (doubled BOS collapsed, empty → BOS).
    Returns one list of ids per prompt.
    """
    out: list[list[int] | None] = [None] * len(prompts)
    text_rows, chat_rows = [], []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            text_rows.append(i)
        elif is_messages(prompt):
            chat_rows.append(i)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            out[i] = list(prompt)
        else:
            raise DataError(source, i + 1, "prompt", f"expected text, a message list or token ids, got "
                                                     f"{type(prompt).__name__}")
    chat = []
    if chat_rows:
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(source, chat_rows[0] + 1, "prompt", "is a message list but the tokenizer has no chat "
                                                                "template")
        chat = [tokenizer.apply_chat_template(prompts[i], tokenize=False, add_generation_prompt=True)
                for i in chat_rows]
    for rows, texts, special in ((text_rows, [prompts[i] for i in text_rows], True), (chat_rows, chat, False)):
        for i, ids in zip(rows, _tokenize_batched(tokenizer, texts, add_special_tokens=special)):
            out[i] = finish_prompt_ids(ids, tokenizer, source=source, row=i + 1)
    return out


def tokenize_pairs(tokenizer, prompts: list, responses: list, max_length: int | None = None, *,
                   source: str = "<pairs>") -> list[list[int]]:
    """The ids of `prompt + response` for each of B pairs → B lists of ids (unpadded): a reward model's rows, made
    by the rules a DPO pair is tokenized with (module docstring, "Tokens"), so that a policy and its reward model
    see the same ids.

    - a text prompt takes a text response; both are tokenized as a text preference row's prompt and completion;
    - a conversational prompt (a message list) takes a text response (one assistant message) or a message list;
      the pair is rendered by `render_chat` and tokenized as a chat preference row;
    - the prompt is finished by `finish_prompt_ids` (an empty one becomes BOS, or stays empty when the tokenizer has
      no BOS), the response by `finish_completion_ids` (EOS appended: the reward is read there); an empty response
      is just EOS (a policy may stop at once).
    With `max_length`, a longer row keeps its LAST `max_length` tokens (`truncate_left`), counted in a warning on
    the `align.data` logger. Errors are `DataError`s naming `source`, the 1-based row and the field.
    """
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
    rendered = []
    if chat_rows:
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(source, chat_rows[0] + 1, "prompt", "is a list of chat messages but the tokenizer has no "
                                                                "chat template")
        for i in chat_rows:
            response = responses[i]
            completion = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
            rendered.append(render_chat({"prompt": prompts[i], "completion": completion}, tokenizer, source=source,
                                        row=i + 1))
    # As in `_tokenize_checked`: a text prompt gets the tokenizer's special tokens, a templated one and every
    # response none.
    for rows, prompt_texts, response_texts, special in (
            (text_rows, [prompts[i] for i in text_rows], [responses[i] for i in text_rows], True),
            (chat_rows, [t["prompt"] for t in rendered], [t["completion"] for t in rendered], False)):
        for i, p, r in zip(rows, _tokenize_batched(tokenizer, prompt_texts, add_special_tokens=special),
                           _tokenize_batched(tokenizer, response_texts, add_special_tokens=False), strict=True):
            prompt_ids[i], response_ids[i] = p, r

    out = []
    for i in range(n):
        ids = (finish_prompt_ids(prompt_ids[i], tokenizer, source=source, row=i + 1, required=False)
               + finish_completion_ids(response_ids[i], tokenizer))
        if not ids:
            raise DataError(source, i + 1, "response", "prompt and response tokenize to no tokens (and the tokenizer "
                                                       "has neither BOS nor EOS)")
        out.append(ids)
    out, truncated = truncate_left(out, max_length)
    if truncated:
        logger.warning("%s: %d of %d rows were longer than max_length=%d and kept their last %d tokens (the prompt "
                       "lost its beginning)", source, truncated, n, max_length, max_length)
    return out


def truncate_left(rows: list[list[int]], max_length: int | None) -> tuple[list[list[int]], int]:
    """Rows of ids longer than `max_length` keep their last `max_length` ids (a reward model's rule: the end of the
    response, where the reward is read, matters most; the prompt loses its beginning) → (rows, how many were cut).
    None: no limit."""
    if max_length is None:
        return [list(row) for row in rows], 0
    return [list(row[-max_length:]) for row in rows], sum(len(row) > max_length for row in rows)


def _render(rows: list[dict], fmt: PreferenceFormat, tokenizer, source: str) -> list[dict]:
    """Conversations → text with the tokenizer's chat template (`render_chat`); text rows pass through."""
    if not fmt.conversational:
        return rows
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(source, None, None, "rows are conversational but the tokenizer has no chat template")
    return [render_chat(example, tokenizer, source=source, row=i) for i, example in enumerate(rows, start=1)]


def _warn_mid_word_prompts(rows: list[dict], source: str):
    mid_word = sum(1 for r in rows if not r["prompt"][-1].isspace()
                   and not (r["chosen"][0].isspace() and r["rejected"][0].isspace()))
    if mid_word:
        logger.warning("%s: in %d of %d rows the implicit prompt (the common prefix of chosen and rejected, as TRL "
                       "extracts it) ends inside a word; give these rows an explicit 'prompt'", source, mid_word,
                       len(rows))


def tokenize_preference_rows(rows, tokenizer, *, source: str = "<rows>", max_length: int | None = 1024,
                             max_prompt_length: int | None = 512, length_policy: str = "truncate",
                             ) -> tuple[PreferenceDataset, LengthReport]:
    """Validates, renders and tokenizes preference rows (a `datasets.Dataset` or a list of dicts) and applies the
    length policy of the module docstring. `source` names the rows in errors and in the report."""
    _check_length_policy(length_policy)
    return _tokenize_checked(check_preference_rows(rows, source=source), tokenizer, max_length=max_length,
                             max_prompt_length=max_prompt_length, length_policy=length_policy)


def _check_length_policy(length_policy: str):
    if length_policy not in LENGTH_POLICIES:
        raise ConfigError(f"data.length_policy: must be one of {', '.join(LENGTH_POLICIES)}, got {length_policy!r}")


def _tokenize_checked(checked: CheckedRows, tokenizer, *, max_length: int | None, max_prompt_length: int | None,
                      length_policy: str) -> tuple[PreferenceDataset, LengthReport]:
    source, fmt = checked.source, checked.format
    texts = _render(checked.rows, fmt, tokenizer, source)

    # TRL 1.16 tokenizes a text prompt with the tokenizer's special tokens and a templated one without (the template
    # holds them); completions never get any.
    prompts = _tokenize_batched(tokenizer, [t["prompt"] for t in texts], add_special_tokens=not fmt.conversational)
    chosens = _tokenize_batched(tokenizer, [t["chosen"] for t in texts], add_special_tokens=False)
    rejecteds = _tokenize_batched(tokenizer, [t["rejected"] for t in texts], add_special_tokens=False)

    report = LengthReport(source=source, rows=len(texts), kept=0)
    kept_p, kept_c, kept_r = [], [], []
    for row, (p, c, r) in enumerate(zip(prompts, chosens, rejecteds, strict=True), start=1):
        p = finish_prompt_ids(p, tokenizer, source=source, row=row)
        c, r = finish_completion_ids(c, tokenizer), finish_completion_ids(r, tokenizer)
        for name, ids in (("chosen", c), ("rejected", r)):
            if not ids:
                raise DataError(source, row, name, "tokenizes to no tokens")

        prompt_over = max_prompt_length is not None and len(p) > max_prompt_length
        if length_policy == "drop":
            room = None if max_length is None else max_length - len(p)
            if prompt_over or (room is not None and (len(c) > room or len(r) > room)):
                report.dropped += 1
                continue
        else:
            if prompt_over:
                p = p[-max_prompt_length:]
                report.prompts_truncated += 1
            if max_length is not None:
                room = max_length - len(p)
                if room <= 0:
                    raise DataError(source, row, "prompt", f"prompt has {len(p)} tokens but max_length is "
                                                           f"{max_length}, leaving no room for the completion; "
                                                           f"raise max_length, set max_prompt_length below "
                                                           f"max_length, or use length_policy: drop")
                if len(c) > room:
                    c = c[:room]
                    report.chosen_truncated += 1
                if len(r) > room:
                    r = r[:room]
                    report.rejected_truncated += 1
        kept_p.append(p)
        kept_c.append(c)
        kept_r.append(r)

    report.kept = len(kept_p)
    logger.log(logging.WARNING if report.changed else logging.INFO, "%s", report.summary())
    if not kept_p:
        raise DataError(source, None, None, f"all {report.rows} rows were dropped by length_policy 'drop' "
                                            f"(max_length={max_length}, max_prompt_length={max_prompt_length}); "
                                            f"raise the limits or use length_policy: truncate")
    return PreferenceDataset(kept_p, kept_c, kept_r), report


def load_config_rows(config: DataConfig, which: str = "train") -> tuple[Any, str]:
    """The raw rows of the `which` ("train" or "eval") data of `config` and the name errors should use."""
    if which == "train":
        source, split = config.train, config.train_split
    elif which == "eval":
        if config.eval is None:
            raise ConfigError("data.eval: is not set, so there is no evaluation data to build")
        source, split = config.eval, config.eval_split
    else:
        raise ValueError(f"which must be 'train' or 'eval', got {which!r}")
    return load_rows(source, split)


@dataclass
class CheckedData:
    """The preference rows of a `DataConfig`, read and validated (`check_preference_data`): `eval` is None when
    the config has no eval data."""

    train: CheckedRows
    eval: CheckedRows | None = None


def check_preference_data(config: DataConfig) -> CheckedData:
    """Reads and validates the train (and eval, if set) preference data of `config`, without a tokenizer: every
    problem a file or row can have short of tokenization (unreadable file, missing field, wrong type, unknown chat
    role, mixed formats) is raised here as one `DataError`. A recipe calls it before loading the tokenizer and model,
    so that a bad file is reported in seconds, then hands the result to `build_preference_dataset(..., checked=)`,
    which then reads and checks nothing again."""
    def read(which: str) -> CheckedRows:
        rows, name = load_config_rows(config, which)
        return check_preference_rows(rows, source=name)

    return CheckedData(train=read("train"), eval=read("eval") if config.eval is not None else None)


def build_preference_dataset(config: DataConfig, tokenizer, which: str = "train", *,
                             checked: CheckedData | None = None) -> tuple[PreferenceDataset, LengthReport]:
    """Loads and tokenizes the `which` ("train" or "eval") data of `config`. With `checked` (from
    `check_preference_data(config)`) the rows it holds are tokenized and the files are not read again."""
    if checked is None:
        rows, name = load_config_rows(config, which)
        ready = check_preference_rows(rows, source=name)
    elif which == "train":
        ready = checked.train
    elif which == "eval":
        if checked.eval is None:
            raise ConfigError("data.eval: is not set, so there is no evaluation data to build")
        ready = checked.eval
    else:
        raise ValueError(f"which must be 'train' or 'eval', got {which!r}")
    if checked is not None and ready.source != (config.train if which == "train" else config.eval):
        # A programming error (rows checked for another config), not a user's: tokenizing them would train on the
        # wrong data without a word.
        raise ValueError(f"checked {which} rows are from {ready.source!r}, not from this config's data.{which}")
    _check_length_policy(config.length_policy)
    return _tokenize_checked(ready, tokenizer, max_length=config.max_length,
                             max_prompt_length=config.max_prompt_length, length_policy=config.length_policy)
