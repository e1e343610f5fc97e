"""Atomic outputs: a reader never sees a half-written file or directory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_figure(fig, path: str | Path) -> None:
    """Saves a matplotlib figure as PNG, atomically."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def held_entries(directory: str | Path) -> str | None:
    """The entries of an existing, non-empty `directory` for an error message ("a, b, c, d, ..."), else None."""
    directory = Path(directory)
    held = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    return ", ".join(held[:4]) + (", ..." if len(held) > 4 else "") if held else None


class SetupGuard:
    """Leaves `directory` as it was if a run fails before `started()`: a folder the set-up created is removed, and
    entries it added to an existing folder are removed (files that were there are never rewritten during set-up).
    After `started()` (training began, checkpoints may follow) nothing is removed.

        with SetupGuard(output_dir) as guard:
            ...load, check, build (any error leaves output_dir as it was)...
            guard.started()
            ...train...
    """

    def __init__(self, directory: str | Path, *, main_process: bool = True):
        self.directory = Path(directory)
        self.main_process = main_process  # only one process of a distributed job cleans up
        self.existed = self.directory.is_dir()
        self.before = set(os.listdir(self.directory)) if self.existed else set()
        self._started = False

    def started(self) -> None:
        self._started = True

    def __enter__(self) -> "SetupGuard":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None or self._started or not self.main_process or not self.directory.is_dir():
            return False
        if not self.existed:
            shutil.rmtree(self.directory, ignore_errors=True)
            return False
        for name in set(os.listdir(self.directory)) - self.before:
            entry = self.directory / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        return False


@contextlib.contextmanager
def scratch_directory(path: str | Path):
    """Yields an empty temporary sibling of `path` (same file system, so its entries can be renamed into `path`),
    removed with whatever is left in it when the block ends, however it ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path):
    """Yields a temporary sibling of `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    with scratch_directory(path) as tmp:
        yield tmp
        replace_entry(tmp, path)


def replace_entry(new: Path, path: Path) -> None:
    """Puts the file or folder `new` at `path` (same file system) by renaming, replacing what is there. A folder
    cannot be replaced by one rename: the old one is moved aside first and removed after."""
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)
