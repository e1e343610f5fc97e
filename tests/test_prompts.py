"""align.prompts.load_prompts: prompt files read like data files, every problem one line naming the line or row."""

import json

import pytest

from align.errors import DataError
from align.prompts import PromptsConfig, load_prompts

GOOD = json.dumps({"prompt": "describe the movie ."})
NOT_AN_OBJECT = "not a JSON object with the row's fields"


def prompts_of(tmp_path, name, contents):
    path = tmp_path / name
    path.write_text(contents)
    return load_prompts(PromptsConfig(file=str(path))), str(path)


def test_jsonl_and_json_prompts(tmp_path):
    # Blank lines and a final line without a newline are fine; other fields are ignored.
    lines = f'{GOOD}\n\n{json.dumps({"prompt": "review the book .", "id": 2})}'
    assert prompts_of(tmp_path, "p.jsonl", lines)[0] == ["describe the movie .", "review the book ."]
    array = json.dumps([{"prompt": "describe the movie ."}, {"prompt": "review the book ."}], indent=2)
    assert prompts_of(tmp_path, "p.json", array)[0] == ["describe the movie .", "review the book ."]


MALFORMED = [
    ("bad.jsonl", f'{GOOD}\n{GOOD}\n{{"prompt": "a" "b"}}\n', ("line 3: not valid JSON (Expecting ',' delimiter: "
                                                            "column 16)")),
    ("list_line.jsonl", f'{GOOD}\n\n["describe the movie ."]\n', (f"line 3: is a list, {NOT_AN_OBJECT} (one object "
                                                                 f"per line)")),
    ("empty.jsonl", "", "file is empty (no rows)"),
    ("blank.jsonl", "\n\n", "file is empty (no rows)"),
    ("empty.json", " [ ] ", "file is empty (no rows)"),
    ("strings.json", '["describe the movie ."]', f"row 1: is a string, {NOT_AN_OBJECT}"),
    ("syntax.json", f"[\n{GOOD},\n{GOOD},\n]", "line 4: not valid JSON (Expecting value: column 1)"),
    ("wrapped.json", json.dumps({"train": [{"prompt": "a"}, {"prompt": "b"}]}, indent=1),
     ("is one JSON object whose 'train' holds a list of rows; the file must be a JSON list of row objects "
     "([{...}, {...}]) or one object per line (.jsonl)")),
    # row = line number in a .jsonl file, so the blank line counts
    ("missing.jsonl", f'{GOOD}\n\n{{"text": "a"}}\n', ("row 3: field 'prompt': missing (each row must be an object "
                                                     "with a string `prompt`)")),
]


@pytest.mark.parametrize("name,contents,expected", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_prompt_files_are_one_line(name, contents, expected, tmp_path):
    with pytest.raises(DataError) as e:
        prompts_of(tmp_path, name, contents)
    assert str(e.value) == f"{tmp_path / name}: {expected}"


def test_prompt_dataset_files_get_the_data_file_errors(tmp_path):
    # `prompts.dataset` reads through align.data.load_rows: the same one-line errors.
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,id\ndescribe the movie .,1\nreview the book .,2,3\n")
    with pytest.raises(DataError) as e:
        load_prompts(PromptsConfig(dataset=str(path)))
    assert str(e.value) == f"{path}: line 3: has 3 fields but the header (line 1) has 2"
