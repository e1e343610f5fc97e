"""align.data: TRL preference formats → token ids, file loading, the length policy and one-line data errors."""

import dataclasses
import json
import logging

import datasets
import pytest

from align import data as data_mod
from align.data import (
    DataConfig,
    LengthReport,
    PreferenceDataset,
    build_preference_dataset,
    finish_prompt_ids,
    load_rows,
    tokenize_pairs,
    tokenize_preference_rows,
    truncate_left,
)
from align.errors import ConfigError, DataError
from align.toy_world import build_tokenizer

USER = [{"role": "user", "content": "describe the movie ."}]
GREAT = [{"role": "assistant", "content": "it was great ."}]
BAD = [{"role": "assistant", "content": "it was bad ."}]


def decoded(tokenizer, item):
    return {k.removesuffix("_input_ids"): tokenizer.decode(v) for k, v in item.items()}


def tokenize(rows, tokenizer, **kwargs):
    return tokenize_preference_rows(rows, tokenizer, source="mem.jsonl", **kwargs)


# ----------------------------------------------------------------------------------------------- formats


def test_explicit_text_round_trip(toy_tokenizer):
    rows = [{"prompt": "describe the movie .", "chosen": "it was great .", "rejected": "it was bad .",
             "score": 3},  # extra columns are ignored
            {"prompt": "<bos> review the song .", "chosen": "it was fun . <eos>", "rejected": "it was dull ."}]
    ds, report = tokenize(rows, toy_tokenizer)
    bos, eos = toy_tokenizer.bos_token_id, toy_tokenizer.eos_token_id
    assert isinstance(ds, PreferenceDataset) and len(ds) == 2
    assert decoded(toy_tokenizer, ds[0]) == {"prompt": "<bos> describe the movie .",
                                             "chosen": "it was great . <eos>", "rejected": "it was bad . <eos>"}
    assert ds[0]["prompt_input_ids"] == toy_tokenizer("describe the movie .")["input_ids"]
    # A prompt that already starts with BOS text keeps one BOS; a completion ending in EOS gets no second one.
    assert decoded(toy_tokenizer, ds[1]) == {"prompt": "<bos> review the song .", "chosen": "it was fun . <eos>",
                                             "rejected": "it was dull . <eos>"}
    for item in ds:
        assert item["prompt_input_ids"].count(bos) == 1
        assert all(type(i) is int for ids in item.values() for i in ids)
        for key in ("chosen_input_ids", "rejected_input_ids"):
            assert item[key][-1] == eos and item[key].count(eos) == 1 and bos not in item[key]
    assert report == LengthReport(source="mem.jsonl", rows=2, kept=2)


def test_explicit_conversational_round_trip(toy_tokenizer):
    rows = [{"prompt": [{"role": "system", "content": "be fun"}, *USER], "chosen": GREAT, "rejected": BAD}]
    ds, _ = tokenize(rows, toy_tokenizer)
    # The chat template carries no BOS and TRL tokenizes templated prompts without special tokens: none is added.
    assert decoded(toy_tokenizer, ds[0]) == {"prompt": "<system> <unk> fun <user> describe the movie . <assistant>",
                                             "chosen": "it was great . <eos>", "rejected": "it was bad . <eos>"}
    assert toy_tokenizer.bos_token_id not in ds[0]["prompt_input_ids"]
    assert ds[0]["chosen_input_ids"].count(toy_tokenizer.eos_token_id) == 1


def test_conversational_prompt_ending_with_assistant_is_continued(toy_tokenizer):
    rows = [{"prompt": USER + [{"role": "assistant", "content": "it was"}],
             "chosen": [{"role": "assistant", "content": "great ."}],
             "rejected": [{"role": "assistant", "content": "bad ."}]}]
    ds, _ = tokenize(rows, toy_tokenizer)
    assert decoded(toy_tokenizer, ds[0])["prompt"] == "<user> describe the movie . <assistant> it was"


def test_implicit_text_round_trip(toy_tokenizer):
    rows = [{"chosen": "describe the movie . it was great .", "rejected": "describe the movie . it was bad ."}]
    ds, _ = tokenize(rows, toy_tokenizer)
    assert decoded(toy_tokenizer, ds[0]) == {"prompt": "<bos> describe the movie . it was",
                                             "chosen": "great . <eos>", "rejected": "bad . <eos>"}


def test_implicit_conversational_round_trip(toy_tokenizer):
    explicit, _ = tokenize([{"prompt": USER, "chosen": GREAT, "rejected": BAD}], toy_tokenizer)
    implicit, _ = tokenize([{"chosen": USER + GREAT, "rejected": USER + BAD}], toy_tokenizer)
    assert implicit[0] == explicit[0]
    assert decoded(toy_tokenizer, implicit[0])["chosen"] == "it was great . <eos>"
    # TRL's rule: a text prompt next to conversations that contain it is ignored and the prompt extracted.
    with_text_prompt, _ = tokenize([{"prompt": "describe the movie .", "chosen": USER + GREAT,
                                     "rejected": USER + BAD}], toy_tokenizer)
    assert with_text_prompt[0] == explicit[0]


def test_implicit_text_prompt_ending_mid_word_is_warned(toy_tokenizer, caplog):
    rows = [{"chosen": "describe the movie . it was great .", "rejected": "describe the movie . it was good ."}]
    with caplog.at_level(logging.WARNING, logger="align.data"):
        ds, _ = tokenize(rows, toy_tokenizer)
    # trl.data_utils.extract_prompt takes the character-level common prefix: "... it was g".
    assert decoded(toy_tokenizer, ds[0])["prompt"] == "<bos> describe the movie . it was <unk>"
    assert "1 of 1 rows the implicit prompt" in caplog.text and "inside a word" in caplog.text


def test_batched_tokenization_matches_across_chunks(toy_tokenizer, toy_preference_rows, monkeypatch):
    whole, _ = tokenize(toy_preference_rows, toy_tokenizer)
    monkeypatch.setattr(data_mod, "TOKENIZE_CHUNK", 7)  # 64 rows → 10 uneven chunks
    chunked, _ = tokenize(toy_preference_rows, toy_tokenizer)
    assert len(whole) == 64 and list(whole) == list(chunked)
    for row, item in zip(toy_preference_rows, whole):
        assert toy_tokenizer.decode(item["prompt_input_ids"]) == "<bos> " + row["prompt"]
        assert toy_tokenizer.decode(item["chosen_input_ids"]) == row["chosen"].strip() + " <eos>"
        assert toy_tokenizer.decode(item["rejected_input_ids"]) == row["rejected"].strip() + " <eos>"


def test_conversational_rows_need_a_chat_template():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="mem.jsonl: rows are conversational but the tokenizer has no chat template"):
        tokenize([{"prompt": USER, "chosen": GREAT, "rejected": BAD}], tokenizer)


# ----------------------------------------------------------------------------------------------- files


def _write(path, rows, kind):
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif kind == "disk":
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif kind == "disk_dict":
        half = len(rows) // 2
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:half]),
                              "test": datasets.Dataset.from_list(rows[half:])}).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "csv", "disk"])
def test_file_types_load_like_in_memory_rows(kind, tmp_path, toy_tokenizer, toy_preference_rows):
    source = _write(tmp_path / f"prefs.{kind}", toy_preference_rows, kind)
    expected, _ = tokenize(toy_preference_rows, toy_tokenizer)
    ds, report = build_preference_dataset(DataConfig(train=source), toy_tokenizer)
    assert list(ds) == list(expected) and report.rows == report.kept == 64 and report.source == source


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_conversational_files(kind, tmp_path, toy_tokenizer):
    rows = [{"prompt": USER, "chosen": GREAT, "rejected": BAD}, {"chosen": USER + GREAT, "rejected": USER + BAD}]
    explicit = _write(tmp_path / f"explicit.{kind}", rows[:1] * 3, kind)
    implicit = _write(tmp_path / f"implicit.{kind}", rows[1:] * 3, kind)
    a, _ = build_preference_dataset(DataConfig(train=explicit), toy_tokenizer)
    b, _ = build_preference_dataset(DataConfig(train=implicit), toy_tokenizer)
    expected, _ = tokenize(rows[:1], toy_tokenizer)
    assert list(a) == list(b) == [expected[0]] * 3


def test_dataset_dict_folder_splits(tmp_path, toy_tokenizer, toy_preference_rows):
    source = _write(tmp_path / "prefs", toy_preference_rows, "disk_dict")
    config = DataConfig(train=source, eval=source, eval_split="test")
    train, _ = build_preference_dataset(config, toy_tokenizer, "train")
    evaluation, _ = build_preference_dataset(config, toy_tokenizer, "eval")
    expected, _ = tokenize(toy_preference_rows[32:], toy_tokenizer)
    assert len(train) == len(evaluation) == 32 and list(evaluation) == list(expected)
    with pytest.raises(DataError, match=r"split 'validation' not found; available splits: 'train', 'test'"):
        load_rows(source, "validation")


def test_single_file_has_only_the_train_split(tmp_path, toy_preference_rows):
    source = _write(tmp_path / "prefs.jsonl", toy_preference_rows, "jsonl")
    rows, name = load_rows(source)
    assert isinstance(rows, datasets.Dataset) and len(rows) == 64 and name == source
    with pytest.raises(DataError, match=r"prefs.jsonl: split 'test' not found: a single file has only the split"):
        load_rows(source, "test")


@pytest.mark.parametrize("source", ["missing/prefs.jsonl", "prefs.parquet", "./somewhere/data", "/abs/folder"])
def test_missing_local_path(source):
    with pytest.raises(DataError) as e:
        load_rows(source)
    assert str(e.value) == f"{source}: file not found"


def test_offline_hub_name_is_one_clear_error():
    with pytest.raises(DataError) as e:
        load_rows("nobody/no-such-preference-data")
    message = str(e.value)
    assert message.startswith("nobody/no-such-preference-data: is neither a local file or folder nor a dataset "
                              "that could be loaded from the Hub") and "\n" not in message


def test_unreadable_files(tmp_path):
    (tmp_path / "prefs.txt").write_text("hello")
    with pytest.raises(DataError, match=r"prefs.txt: unsupported file type '.txt'"):
        load_rows(str(tmp_path / "prefs.txt"))
    (tmp_path / "broken.jsonl").write_text('{"chosen": "a", "rejected": \n')
    with pytest.raises(DataError, match=r"broken.jsonl: line 1: not valid JSON \(Expecting value: column 29\)$"):
        load_rows(str(tmp_path / "broken.jsonl"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder: folder is not a `datasets.save_to_disk` folder"):
        load_rows(str(tmp_path / "folder"))


GOOD_LINE = json.dumps({"prompt": "describe the movie .", "chosen": "it was great .", "rejected": "it was bad ."})
CSV_HEADER = "prompt,chosen,rejected\n"
NOT_AN_OBJECT = "not a JSON object with the row's fields"
WRAPPED = ("is one JSON object whose 'train' holds a list of rows; the file must be a JSON list of row objects "
           "([{...}, {...}]) or one object per line (.jsonl)")


def _parquet_bytes(tmp_path, truncate: bool) -> bytes:
    path = tmp_path / "good.parquet"
    datasets.Dataset.from_list([json.loads(GOOD_LINE)] * 4).to_parquet(str(path))
    data = path.read_bytes()
    return data[:len(data) // 2] if truncate else b"PAR1 this is not a parquet file"


# (file name, contents, the message after "<path>: "). Each is a mistake a user makes by hand or with a broken export.
MALFORMED_FILES = [
    ("bad.jsonl", "\n".join([GOOD_LINE] * 6 + ['{"prompt": "p" "chosen": "a", "rejected": "b"}', GOOD_LINE]),
     "line 7: not valid JSON (Expecting ',' delimiter: column 16)"),
    # a blank line is skipped but still counted, so the number is the editor's line number
    ("gap.jsonl", GOOD_LINE + "\n\n" + '{"prompt": "p", "chosen": "a",\n', ("line 3: not valid JSON "
     "(Expecting property name enclosed in double quotes: column 31)")),
    ("list_line.jsonl", f'{GOOD_LINE}\n{GOOD_LINE}\n["a", "b"]\n', (f"line 3: is a list, {NOT_AN_OBJECT} (one "
     f"object per line)")),
    ("string_line.jsonl", f'{GOOD_LINE}\n"it was great ."\n', (f"line 2: is a string, {NOT_AN_OBJECT} (one object "
     f"per line)")),
    ("empty.jsonl", "", "file is empty (no rows)"),
    ("blank.jsonl", "\n  \n\n", "file is empty (no rows)"),
    ("empty.json", "[]", "file is empty (no rows)"),
    ("number.json", "3", f"line 1: is a number, {NOT_AN_OBJECT} (one object per line)"),
    ("strings.json", '["it was great .", "it was bad ."]', f"row 1: is a string, {NOT_AN_OBJECT}"),
    ("mixed.json", f"[{GOOD_LINE}, 3]", f"row 2: is a number, {NOT_AN_OBJECT}"),
    ("array_syntax.json", f"[\n{GOOD_LINE},\n{GOOD_LINE}\n{GOOD_LINE}\n]", ("line 4: not valid JSON (Expecting ',' "
     "delimiter: column 1)")),
    ("wrapped.json", f'{{"train": [{GOOD_LINE}, {GOOD_LINE}]}}', WRAPPED),
    ("wrapped_pretty.json", f'{{\n  "train": [\n    {GOOD_LINE},\n    {GOOD_LINE}\n  ]\n}}\n', WRAPPED),
    ("wrapped_broken.json", f'{{\n  "train": [\n    {GOOD_LINE}\n    {GOOD_LINE}\n  ]\n}}\n',
     "line 4: not valid JSON (Expecting ',' delimiter: column 5)"),
    ("long_row.csv", CSV_HEADER + "p,a,b\np,a,b,c\n", "line 3: has 4 fields but the header (line 1) has 3"),
    # pandas alone would read this row with a null 'rejected'
    ("short_row.csv", CSV_HEADER + "p,a,b\n\np,a,b\np,a\n", "line 5: has 2 fields but the header (line 1) has 3"),
    ("one_field.csv", CSV_HEADER + "p\n", "line 2: has 1 field but the header (line 1) has 3"),
    ("empty.csv", "", "file is empty (no rows)"),
    ("header_only.csv", CSV_HEADER, "file is empty (no rows): only the header line"),
    ("empty.parquet", "", "file is empty (no rows)"),
    ("text.parquet", "not parquet", None),
    ("truncated.parquet", "truncated", None),
]


@pytest.mark.parametrize("name,contents,expected", MALFORMED_FILES, ids=[case[0] for case in MALFORMED_FILES])
def test_malformed_file_is_one_line_naming_the_line(name, contents, expected, tmp_path, capfd):
    path = tmp_path / name
    if name.endswith(".parquet") and contents:
        path.write_bytes(_parquet_bytes(tmp_path, truncate=contents == "truncated"))
    else:
        path.write_text(contents)
    capfd.readouterr()  # writing the parquet file shows a progress bar
    # `datasets` logs an ERROR line of its own before it raises (through a handler that holds the stderr of its
    # import time, which capfd cannot see): a handler of ours sees what would be printed.
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("datasets").addHandler(handler)
    try:
        with pytest.raises(DataError) as e:
            load_rows(str(path))
    finally:
        logging.getLogger("datasets").removeHandler(handler)
    message = str(e.value)
    if expected is None:  # pyarrow's own words for a corrupt file; ours are the start
        assert message.startswith(f"{path}: could not be read as parquet (") and message.endswith(")"), message
    else:
        assert message == f"{path}: {expected}"
    assert "\n" not in message
    assert [r.getMessage() for r in logged if r.levelno >= logging.WARNING] == []
    out, err = capfd.readouterr()  # no progress bar either
    assert out == "" and err == "", (out, err)


def test_good_files_are_read_by_datasets_without_a_second_pass(tmp_path, monkeypatch, toy_preference_rows):
    # The line-by-line scan is for failures only: a large good JSONL must not be parsed twice.
    monkeypatch.setattr(data_mod, "read_json_records", lambda *a: pytest.fail("scanned a good file"))
    for kind in ("json", "jsonl"):
        rows, _ = load_rows(_write(tmp_path / f"prefs.{kind}", toy_preference_rows, kind))
        assert len(rows) == 64
    lines = tmp_path / "gaps.jsonl"  # blank lines, a BOM and no final newline are fine
    lines.write_text("\ufeff" + GOOD_LINE + "\n\n" + GOOD_LINE)
    assert len(load_rows(str(lines))[0]) == 2


def _check(tmp_path, train_rows, eval_rows=None):
    config = DataConfig(train=_write(tmp_path / "train.jsonl", train_rows, "jsonl"),
                        eval=_write(tmp_path / "eval.jsonl", eval_rows, "jsonl") if eval_rows else None)
    return config, data_mod.check_preference_data(config)


def test_check_preference_data_needs_no_tokenizer_and_is_not_reread(tmp_path, toy_tokenizer, toy_preference_rows):
    config, checked = _check(tmp_path, toy_preference_rows, toy_preference_rows[:8])
    assert len(checked.train.rows) == 64 and len(checked.eval.rows) == 8
    assert checked.train.source == config.train and checked.eval.source == config.eval
    expected_train, _ = build_preference_dataset(config, toy_tokenizer, "train")
    expected_eval, _ = build_preference_dataset(config, toy_tokenizer, "eval")
    for path in (config.train, config.eval):  # building from `checked` must not touch the files again
        (tmp_path / path).unlink()
    train, report = build_preference_dataset(config, toy_tokenizer, "train", checked=checked)
    evaluation, _ = build_preference_dataset(config, toy_tokenizer, "eval", checked=checked)
    assert list(train) == list(expected_train) and list(evaluation) == list(expected_eval)
    assert report.source == config.train and report.rows == 64


@pytest.mark.parametrize("which", ["train", "eval"])
def test_check_preference_data_reports_bad_rows_of_either_split(which, tmp_path, toy_preference_rows):
    bad = [*toy_preference_rows[:4], {**toy_preference_rows[4], "chosen": [{"role": "robot", "content": "hi"}]}]
    rows = {"train": bad, "eval": toy_preference_rows[:4]} if which == "train" else \
        {"train": toy_preference_rows, "eval": bad}
    with pytest.raises(DataError) as e:
        _check(tmp_path, rows["train"], rows["eval"])
    assert str(e.value).startswith(f"{tmp_path / f'{which}.jsonl'}: row 5: field 'chosen': ")


def test_check_preference_data_reports_an_unreadable_file(tmp_path):
    config = DataConfig(train=str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl").write_text(GOOD_LINE + "\n{oops\n")
    with pytest.raises(DataError) as e:
        data_mod.check_preference_data(config)
    assert str(e.value) == (f"{config.train}: line 2: not valid JSON (Expecting property name enclosed in double "
                            f"quotes: column 2)")


def test_checked_rows_must_come_from_the_same_config(tmp_path, toy_tokenizer, toy_preference_rows):
    config, checked = _check(tmp_path, toy_preference_rows)
    other = DataConfig(train=str(tmp_path / "other.jsonl"), eval=config.train)
    with pytest.raises(ValueError, match="checked train rows are from"):
        build_preference_dataset(other, toy_tokenizer, "train", checked=checked)
    with pytest.raises(ConfigError, match="data.eval: is not set"):
        build_preference_dataset(config, toy_tokenizer, "eval", checked=checked)


def test_quickstart_recipe_with_bad_data_fails_in_the_check(tmp_path):
    # The README's `align train --config configs/quickstart.yaml data.train=bad.jsonl`: the data section alone (no
    # model, no tokenizer) is enough for the one-line error that `align train` reports before loading the model.
    from align.config import load_train_config

    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD_LINE + "\n" + GOOD_LINE[:-1] + "\n")
    config = load_train_config("configs/quickstart.yaml", [f"data.train={bad}",
                                                           f"training.output_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError) as e:
        data_mod.check_preference_data(config.data)
    assert str(e.value) == f"{bad}: line 2: not valid JSON (Expecting ',' delimiter: column {len(GOOD_LINE)})"


# ----------------------------------------------------------------------------------------------- length policy

WORDS = ["the", "movie", "was", "great", "and", "it", "was", "fun", "and", "the", "song", "was", "fun"]  # 13 known words


def _row(prompt_words, chosen_words, rejected_words):
    return {"prompt": " ".join(WORDS[:prompt_words]), "chosen": " ".join(WORDS[:chosen_words]),
            "rejected": " ".join(WORDS[:rejected_words])}


def test_truncate_keeps_prompt_end_and_completion_start(toy_tokenizer, caplog):
    rows = [_row(9, 2, 2),    # prompt 1+9 = 10 tokens → last 4; completions 3 tokens fit in 8 − 4 = 4
            _row(2, 6, 3),    # prompt 3 tokens fits; chosen 7 → first 5; rejected 4 fits
            _row(1, 1, 9)]    # prompt 2; chosen 2 fits; rejected 10 → first 6
    with caplog.at_level(logging.INFO, logger="align.data"):
        ds, report = tokenize(rows, toy_tokenizer, max_length=8, max_prompt_length=4)
    ids = [toy_tokenizer(r["prompt"])["input_ids"] for r in rows]
    assert ds[0]["prompt_input_ids"] == ids[0][-4:]
    assert decoded(toy_tokenizer, ds[0]) == {"prompt": "it was fun and", "chosen": "the movie <eos>",
                                             "rejected": "the movie <eos>"}
    assert decoded(toy_tokenizer, ds[1]) == {"prompt": "<bos> the movie", "chosen": "the movie was great and",
                                             "rejected": "the movie was <eos>"}
    assert decoded(toy_tokenizer, ds[2]) == {"prompt": "<bos> the", "chosen": "the <eos>",
                                             "rejected": "the movie was great and it"}
    assert report == LengthReport(source="mem.jsonl", rows=3, kept=3, prompts_truncated=1, chosen_truncated=1,
                                  rejected_truncated=1, dropped=0)
    assert report.summary() == ("mem.jsonl: kept 3 of 3 rows; truncated 1 prompts, 1 chosen, 1 rejected; "
                                "dropped 0 rows")
    [record] = [r for r in caplog.records if r.name == "align.data"]
    assert record.levelno == logging.WARNING and record.getMessage() == report.summary()


def test_no_bounds_and_no_changes_log_at_info(toy_tokenizer, caplog):
    rows = [_row(13, 13, 13)]
    with caplog.at_level(logging.INFO, logger="align.data"):
        ds, report = tokenize(rows, toy_tokenizer, max_length=None, max_prompt_length=None)
    assert len(ds[0]["prompt_input_ids"]) == 14 and len(ds[0]["chosen_input_ids"]) == 14
    assert not report.changed
    [record] = [r for r in caplog.records if r.name == "align.data"]
    assert record.levelno == logging.INFO


def test_prompt_filling_max_length_is_an_error(toy_tokenizer):
    rows = [_row(2, 2, 2), _row(9, 2, 2)]
    with pytest.raises(DataError) as e:
        tokenize(rows, toy_tokenizer, max_length=6, max_prompt_length=None)
    assert str(e.value).startswith("mem.jsonl: row 2: field 'prompt': prompt has 10 tokens but max_length is 6")
    assert "raise max_length" in str(e.value) and "length_policy: drop" in str(e.value)
    # After prompt truncation the same row fits; at exactly max_length there is still no room.
    ds, _ = tokenize(rows, toy_tokenizer, max_length=6, max_prompt_length=5)
    assert len(ds[1]["prompt_input_ids"]) == 5 and len(ds[1]["chosen_input_ids"]) == 1
    with pytest.raises(DataError, match="prompt has 6 tokens but max_length is 6"):
        tokenize(rows, toy_tokenizer, max_length=6, max_prompt_length=6)


def test_drop_policy_counts(toy_tokenizer, caplog):
    rows = [_row(2, 2, 2),   # 3 + 3 tokens: fits
            _row(5, 2, 2),   # prompt 6 > 5: dropped
            _row(2, 5, 2),   # 3 + 6 > 8: dropped
            _row(2, 2, 5),   # 3 + 6 > 8: dropped
            _row(4, 3, 3),   # 5 ≤ 5 and 5 + 4 > 8: dropped
            _row(4, 2, 2)]   # 5 + 3 = 8: fits exactly
    with caplog.at_level(logging.WARNING, logger="align.data"):
        ds, report = tokenize(rows, toy_tokenizer, max_length=8, max_prompt_length=5, length_policy="drop")
    assert report == LengthReport(source="mem.jsonl", rows=6, kept=2, dropped=4)
    assert "kept 2 of 6 rows" in report.summary() and "dropped 4 rows" in report.summary()
    assert report.summary() in caplog.text
    assert [len(item["prompt_input_ids"]) for item in ds] == [3, 5]
    assert decoded(toy_tokenizer, ds[1])["chosen"] == "the movie <eos>"
    with pytest.raises(DataError, match=r"mem.jsonl: all 6 rows were dropped by length_policy 'drop'"):
        tokenize(rows, toy_tokenizer, max_length=3, max_prompt_length=5, length_policy="drop")


# ----------------------------------------------------------------------------------------------- bad rows

GOOD_TEXT = {"prompt": "describe the movie .", "chosen": "it was great .", "rejected": "it was bad ."}
GOOD_CHAT = {"prompt": USER, "chosen": GREAT, "rejected": BAD}
GOOD_IMPLICIT = {"chosen": "describe the movie . it was great .", "rejected": "describe the movie . it was bad ."}

BAD_ROWS = {
    "missing field": (GOOD_TEXT, {"prompt": "describe", "rejected": "bad"}, "chosen", "is missing"),
    "null": (GOOD_TEXT, {**GOOD_TEXT, "rejected": None}, "rejected", "is missing or null"),
    "empty string": (GOOD_TEXT, {**GOOD_TEXT, "prompt": ""}, "prompt", "is empty"),
    "whitespace string": (GOOD_TEXT, {**GOOD_TEXT, "chosen": " \n "}, "chosen", "is whitespace only"),
    "number completion": (GOOD_TEXT, {**GOOD_TEXT, "chosen": 3}, "chosen", "must be a string, got int"),
    "list completion": (GOOD_TEXT, {**GOOD_TEXT, "rejected": ["bad"]}, "rejected", "must be a string, got list"),
    "message not a dict": (GOOD_CHAT, {**GOOD_CHAT, "chosen": ["it was great ."]}, "chosen[0]",
                           "must be a message dict with 'role' and 'content', got str"),
    "message without role": (GOOD_CHAT, {**GOOD_CHAT, "chosen": [{"content": "great"}]}, "chosen[0].role",
                             "is missing"),
    "message without content": (GOOD_CHAT, {**GOOD_CHAT, "prompt": [{"role": "user"}]}, "prompt[0].content",
                                "is missing"),
    "unknown role": (GOOD_CHAT, {**GOOD_CHAT, "rejected": [{"role": "bot", "content": "bad"}]}, "rejected[0].role",
                     "unknown chat role 'bot'; allowed: system, user, assistant, tool"),
    "non-string content": (GOOD_CHAT, {**GOOD_CHAT, "prompt": [*USER, {"role": "user", "content": 5}]},
                           "prompt[1].content", "must be a string, got int"),
    "empty content": (GOOD_CHAT, {**GOOD_CHAT, "chosen": [{"role": "assistant", "content": ""}]},
                      "chosen[0].content", "is empty"),
    "empty message list": (GOOD_CHAT, {**GOOD_CHAT, "chosen": []}, "chosen", "is an empty list of messages"),
    "prompt ends with system": (GOOD_CHAT, {**GOOD_CHAT, "prompt": [{"role": "system", "content": "be fun"}]},
                                "prompt[0].role", "last message is a system message"),
    "implicit prompt empty": (GOOD_IMPLICIT, {"chosen": "great .", "rejected": "bad ."}, "prompt",
                              "implicit prompt is empty"),
    "implicit prompt whitespace": (GOOD_IMPLICIT, {"chosen": " great", "rejected": " bad"}, "prompt",
                                   "implicit prompt (common prefix of chosen and rejected) is empty"),
    "implicit chat prompt empty": ({"chosen": USER + GREAT, "rejected": USER + BAD}, {"chosen": GREAT, "rejected": BAD},
                                   "prompt", "implicit prompt is empty"),
    "implicit identical": (GOOD_IMPLICIT, {"chosen": "it was .", "rejected": "it was ."}, "chosen",
                           "chosen and rejected are identical"),
    "implicit prefix": (GOOD_IMPLICIT, {"chosen": "it was great", "rejected": "it was great ."}, "chosen",
                        "is a prefix of the other completion"),
    "text then chat": (GOOD_TEXT, GOOD_CHAT, "chosen", "is a list of chat messages but row 1 is explicit-prompt text"),
    "chat then text": (GOOD_CHAT, {**GOOD_CHAT, "prompt": "describe the movie ."}, "prompt",
                       "is a string but row 1 is explicit-prompt conversational"),
    "implicit then explicit": (GOOD_IMPLICIT, {**GOOD_IMPLICIT, "prompt": "describe"}, "prompt",
                               "is given but row 1 is implicit-prompt text"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_is_one_error_naming_file_row_and_field(case, toy_tokenizer):
    good, bad, field, problem = BAD_ROWS[case]
    with pytest.raises(DataError) as e:
        tokenize([good, good, bad, good], toy_tokenizer)
    assert (e.value.source, e.value.row, e.value.field) == ("mem.jsonl", 3, field)
    assert str(e.value).startswith(f"mem.jsonl: row 3: field '{field}': ")
    assert problem in str(e.value)


def test_bad_first_row(toy_tokenizer):
    with pytest.raises(DataError, match=r"mem.jsonl: row 1: field 'chosen': must be a string or a list of chat "):
        tokenize([{**GOOD_TEXT, "chosen": 1.5}], toy_tokenizer)
    with pytest.raises(DataError, match=r"mem.jsonl: row 1: field 'prompt': is missing or null"):
        tokenize([{**GOOD_TEXT, "prompt": None}], toy_tokenizer)
    with pytest.raises(DataError, match=r"mem.jsonl: has no rows"):
        tokenize([], toy_tokenizer)


def test_bad_rows_in_files_name_the_file(tmp_path, toy_tokenizer):
    # A row without a field that other rows have: the JSON reader fills it with null.
    source = _write(tmp_path / "gaps.jsonl", [GOOD_TEXT, GOOD_TEXT, {"prompt": "a", "chosen": "b"}], "jsonl")
    with pytest.raises(DataError, match=r"gaps.jsonl: row 3: field 'rejected': is missing or null"):
        build_preference_dataset(DataConfig(train=source), toy_tokenizer)
    chat = {**GOOD_CHAT, "chosen": [{"role": "assistant", "content": "ok"}, {"role": "assistant"}]}
    source = _write(tmp_path / "chat.parquet", [GOOD_CHAT, chat], "parquet")
    with pytest.raises(DataError, match=r"chat.parquet: row 2: field 'chosen\[1\].content': is missing"):
        build_preference_dataset(DataConfig(train=source), toy_tokenizer)
    source = _write(tmp_path / "blank.csv", [GOOD_TEXT, {**GOOD_TEXT, "chosen": "   "}], "csv")
    with pytest.raises(DataError, match=r"blank.csv: row 2: field 'chosen': is whitespace only"):
        build_preference_dataset(DataConfig(train=source), toy_tokenizer)


# ----------------------------------------------------------------------------------------------- config


def test_config_fields_are_documented():
    for f in dataclasses.fields(DataConfig):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize("kwargs, name", [
    ({"train": None}, "train"), ({"train": " "}, "train"), ({"train": "a.jsonl", "eval": ""}, "eval"),
    ({"train": "a.jsonl", "train_split": ""}, "train_split"), ({"train": "a.jsonl", "eval_split": None}, "eval_split"),
    ({"train": "a.jsonl", "max_length": 0}, "max_length"), ({"train": "a.jsonl", "max_length": True}, "max_length"),
    ({"train": "a.jsonl", "max_prompt_length": 2.5}, "max_prompt_length"),
    ({"train": "a.jsonl", "length_policy": "cut"}, "length_policy"),
])
def test_config_checks_name_the_field(kwargs, name):
    with pytest.raises(ConfigError, match=rf"^data\.{name}: "):
        DataConfig(**kwargs)


def test_eval_without_eval_source(toy_tokenizer):
    with pytest.raises(ConfigError, match=r"data\.eval: is not set"):
        build_preference_dataset(DataConfig(train="a.jsonl"), toy_tokenizer, "eval")
    with pytest.raises(ConfigError, match=r"data\.length_policy"):
        tokenize([GOOD_TEXT], toy_tokenizer, length_policy="cut")


def test_prompts_are_tokenized_for_sampling_exactly_as_for_training(toy_tokenizer):
    # align.data.tokenize_prompts is the one home of prompt tokenization: rollouts sample after the very ids the
    # preference pipeline trains on (text, BOS-prefixed text, and chat-templated message lists alike).
    from align.data import tokenize_prompts

    rows = [{"prompt": "describe the movie .", "chosen": "it was great .", "rejected": "it was bad ."},
            {"prompt": "<bos> review the song .", "chosen": "it was fun .", "rejected": "it was dull ."}]
    chat_rows = [{"prompt": [{"role": "system", "content": "be fun"}, *USER], "chosen": GREAT, "rejected": BAD}]
    trained = [item["prompt_input_ids"] for item in tokenize(rows, toy_tokenizer)[0]]
    trained_chat = [item["prompt_input_ids"] for item in tokenize(chat_rows, toy_tokenizer)[0]]
    sampled = tokenize_prompts(toy_tokenizer, [r["prompt"] for r in rows] + [chat_rows[0]["prompt"]])
    assert sampled == trained + trained_chat
    assert sampled[1].count(toy_tokenizer.bos_token_id) == 1  # the doubled BOS is collapsed, as in training
    assert toy_tokenizer.bos_token_id not in sampled[2]  # the template's own special tokens only
    assert tokenize_prompts(toy_tokenizer, [trained[0], ""]) == [trained[0], [toy_tokenizer.bos_token_id]]
    with pytest.raises(DataError, match=r"<prompts>: row 2: field 'prompt': expected text, a message list or token "
                                        r"ids, got dict"):
        tokenize_prompts(toy_tokenizer, ["fine", {"role": "user"}])


# ----------------------------------------------------------------------------------------------- reward-model rows


def test_reward_model_rows_are_the_policy_ids_of_the_same_text(toy_tokenizer):
    # `tokenize_pairs` (a reward model's prompt + response rows, training and scoring) and the preference pipeline
    # share their rules: the same text and chat rows give the same ids, BOS collapse and EOS included.
    text_rows = [{"prompt": "describe the movie .", "chosen": "it was great .", "rejected": "it was bad ."},
                 {"prompt": "<bos> review the song .", "chosen": "it was fun <eos>", "rejected": "it was dull ."}]
    chat_rows = [{"prompt": [{"role": "system", "content": "be fun"}, *USER], "chosen": GREAT, "rejected": BAD},
                 {"prompt": USER, "chosen": BAD, "rejected": GREAT}]
    for rows in (text_rows, chat_rows):
        dataset, _ = tokenize(rows, toy_tokenizer, max_length=None, max_prompt_length=None)
        for completion in ("chosen", "rejected"):
            ids = tokenize_pairs(toy_tokenizer, [r["prompt"] for r in rows], [r[completion] for r in rows])
            assert ids == [item["prompt_input_ids"] + item[f"{completion}_input_ids"] for item in dataset]
    assert tokenize_pairs(toy_tokenizer, [text_rows[1]["prompt"]], ["x"])[0].count(toy_tokenizer.bos_token_id) == 1
    # A chat response may also be a plain string: it becomes one assistant message.
    assert (tokenize_pairs(toy_tokenizer, [USER], [GREAT[0]["content"]])
            == tokenize_pairs(toy_tokenizer, [USER], [GREAT]))


def test_reward_model_rows_end_with_one_eos_and_keep_their_end(toy_tokenizer, caplog):
    bos, eos = toy_tokenizer.bos_token_id, toy_tokenizer.eos_token_id
    row = tokenize_pairs(toy_tokenizer, ["describe the movie ."], [" it was great ."])[0]
    assert row[0] == bos and row[-1] == eos and row.count(eos) == 1
    assert tokenize_pairs(toy_tokenizer, ["describe the movie ."], [" it was great . <eos>"])[0] == row
    assert tokenize_pairs(toy_tokenizer, [""], [""]) == [[bos, eos]]  # an empty response is just EOS
    with caplog.at_level(logging.WARNING, logger="align.data"):
        assert tokenize_pairs(toy_tokenizer, ["describe the movie ."], [" it was great ."], 4)[0] == row[-4:]
    assert any("1 of 1 rows were longer than max_length=4" in r.getMessage() for r in caplog.records)
    assert truncate_left([[1, 2, 3], [4]], 2) == ([[2, 3], [4]], 1)
    assert truncate_left([[1, 2, 3]], None) == ([[1, 2, 3]], 0)


def test_reward_model_row_without_bos_keeps_an_empty_prompt(toy_tokenizer):
    # A policy needs a prompt token to predict its first completion token from (an empty prompt without BOS is an
    # error there); a reward model reads the end of the row, so its empty prompt stays empty.
    class NoBos:
        bos_token_id = None
        eos_token_id = toy_tokenizer.eos_token_id

        def __call__(self, texts, add_special_tokens):
            return toy_tokenizer(texts, add_special_tokens=False)

    assert tokenize_pairs(NoBos(), [""], ["great"]) == [toy_tokenizer("great", add_special_tokens=False)["input_ids"]
                                                        + [toy_tokenizer.eos_token_id]]
    with pytest.raises(DataError, match="no BOS token"):
        finish_prompt_ids([], NoBos(), source="s", row=1)


@pytest.mark.parametrize("prompts, responses, match", [
    (["a"], ["b", "c"], r"1 prompts but 2 responses"),
    ([3], ["b"], r"row 1: field 'prompt': must be a string or a list of chat messages"),
    (["a"], [None], r"row 1: field 'response': must be a string when the prompt is a string"),
    ([USER], [3], r"row 1: field 'response': must be a string or a list of chat messages"),
    ([[{"role": "robot", "content": "hi"}]], ["b"], r"row 1: field 'prompt\[0\].role': unknown chat role"),
])
def test_reward_model_row_errors(toy_tokenizer, prompts, responses, match):
    with pytest.raises(DataError, match=match):
        tokenize_pairs(toy_tokenizer, prompts, responses)
    with pytest.raises(ConfigError, match=r"max_length: must be a positive integer or None, got 0"):
        tokenize_pairs(toy_tokenizer, ["a"], ["b"], 0)
