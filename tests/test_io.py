"""align.io: atomic files and directories. A reader sees the old state or the complete new one, never a half."""

import json
import os

import pytest

from align.io import atomic_directory, atomic_write_json, atomic_write_text


def _names(directory):
    return sorted(p.name for p in directory.iterdir())


# --- files -----------------------------------------------------------------------------------------------------


def test_atomic_write_text_writes_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "hello\nworld\n")
    assert target.read_text() == "hello\nworld\n"
    assert _names(tmp_path) == ["out.txt"]


def test_atomic_write_text_creates_parent_directories(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    atomic_write_text(str(target), "x")  # a str path works too
    assert target.read_text() == "x"
    assert _names(target.parent) == ["out.txt"]


def test_atomic_write_text_replaces_an_existing_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old content that is longer than the new one")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert _names(tmp_path) == ["out.txt"]


def test_atomic_write_json_round_trips_with_trailing_newline(tmp_path):
    data = {"b": 1, "a": [1.5, None, "x"], "nested": {"k": True}}
    target = tmp_path / "summary.json"
    atomic_write_json(target, data)
    text = target.read_text()
    assert json.loads(text) == data
    assert text.endswith("}\n")
    assert list(json.loads(text)) == ["b", "a", "nested"]  # key order kept, not sorted
    assert _names(tmp_path) == ["summary.json"]


def test_atomic_write_json_failure_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})  # not JSON-serialisable
    assert json.loads(target.read_text()) == {"ok": 1}
    assert _names(tmp_path) == ["summary.json"]


def test_atomic_write_json_failure_without_old_file_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "summary.json", {"bad": {1, 2}})
    assert _names(tmp_path) == []


# --- directories -------------------------------------------------------------------------------------------------


def test_atomic_directory_renames_on_success(tmp_path):
    target = tmp_path / "run"
    with atomic_directory(target) as work:
        assert work != target
        assert work.parent == tmp_path
        assert work.name.startswith(".run.tmp-")
        assert work.is_dir() and not target.exists()  # nothing visible under the final name while writing
        (work / "model.bin").write_bytes(b"\x00\x01")
        (work / "sub").mkdir()
        (work / "sub" / "f.txt").write_text("f")
    assert (target / "model.bin").read_bytes() == b"\x00\x01"
    assert (target / "sub" / "f.txt").read_text() == "f"
    assert _names(tmp_path) == ["run"]


def test_atomic_directory_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    with atomic_directory(str(target)) as work:
        (work / "x").write_text("1")
    assert (target / "x").read_text() == "1"


def test_atomic_directory_exception_leaves_no_target_and_no_temp(tmp_path):
    target = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as work:
            (work / "half-written.bin").write_bytes(b"\x00" * 100)
            raise RuntimeError("boom")
    assert not target.exists()
    assert _names(tmp_path) == []


def test_atomic_directory_keyboard_interrupt_also_cleans_up(tmp_path):
    target = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as work:
            (work / "x").write_text("1")
            raise KeyboardInterrupt
    assert _names(tmp_path) == []


def test_atomic_directory_replaces_an_existing_directory(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    (target / "shared.txt").write_text("old")
    with atomic_directory(target) as work:
        assert (target / "stale.txt").exists()  # the old directory stays readable until the swap
        (work / "shared.txt").write_text("new")
    assert _names(target) == ["shared.txt"]
    assert (target / "shared.txt").read_text() == "new"
    assert _names(tmp_path) == ["run"]  # no `.run.old-*` left behind


def test_atomic_directory_exception_keeps_the_existing_directory(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_directory(target) as work:
            (work / "keep.txt").write_text("new")
            raise ValueError
    assert _names(target) == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "old"
    assert _names(tmp_path) == ["run"]


def test_atomic_directory_clears_a_stale_temp_from_a_crashed_run(tmp_path):
    target = tmp_path / "run"
    stale = tmp_path / f".run.tmp-{os.getpid()}"
    stale.mkdir()
    (stale / "junk").write_text("from a crashed run")
    with atomic_directory(target) as work:
        assert work == stale
        assert _names(work) == []
        (work / "fresh").write_text("1")
    assert _names(target) == ["fresh"]
    assert _names(tmp_path) == ["run"]


# --- SetupGuard: an error before training starts leaves the output folder as it was --------------------------------


def test_setup_guard_removes_a_folder_the_set_up_created(tmp_path):
    from align.io import SetupGuard

    out = tmp_path / "run"
    with pytest.raises(RuntimeError), SetupGuard(out):
        out.mkdir()
        (out / "runs").mkdir()
        raise RuntimeError("model failed to load")
    assert not out.exists()


def test_setup_guard_removes_only_what_the_set_up_added_to_an_existing_folder(tmp_path):
    from align.io import SetupGuard

    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "align_config.yaml").write_text("old")
    with pytest.raises(ValueError), SetupGuard(out):
        (out / "runs").mkdir()
        (out / "new.txt").write_text("x")
        raise ValueError("resume refused")
    assert sorted(p.name for p in out.iterdir()) == ["align_config.yaml", "checkpoint-2"]
    assert (out / "align_config.yaml").read_text() == "old"


def test_setup_guard_keeps_everything_once_training_started_or_on_success(tmp_path):
    from align.io import SetupGuard

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), SetupGuard(out) as guard:
        out.mkdir()
        guard.started()
        (out / "checkpoint-1").mkdir()  # a checkpoint of the interrupted run: resumable, so kept
        raise KeyboardInterrupt
    assert (out / "checkpoint-1").is_dir()
    with SetupGuard(tmp_path / "ok"):
        (tmp_path / "ok").mkdir()
    assert (tmp_path / "ok").is_dir()


def test_setup_guard_on_a_non_main_process_removes_nothing(tmp_path):
    from align.io import SetupGuard

    out = tmp_path / "run"
    with pytest.raises(RuntimeError), SetupGuard(out, main_process=False):
        out.mkdir()
        raise RuntimeError
    assert out.is_dir()


def test_scratch_directory_is_removed_however_the_block_ends(tmp_path):
    from align.io import scratch_directory

    with scratch_directory(tmp_path / "qs") as work:
        (work / "a").write_text("x")
        assert work.parent == tmp_path and work.name.startswith(".qs.tmp-")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), scratch_directory(tmp_path / "qs") as work:
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
