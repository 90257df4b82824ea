"""Files of an evaluation or a comparison, written so that a crash at any moment leaves either the old or the new
version of each file (never a half-written one), and read so that a damaged file is an error naming it and the fix.

Files rewritten as a whole (`results.json`, `results.md`, the plots, `comparison.*`, `train_done.json`, ...) go through
[`atomic_save`]: written to a temporary file next to the target, flushed to disk, then renamed over it (`os.replace` is
atomic on POSIX and Windows). The one file appended to, `generations.jsonl`, is repaired on resume by the harness
(`policy_split_trl.eval.harness`).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from typing import Any


class DamagedFileError(ValueError):
    """A file we wrote earlier (or were given) cannot be read as what it should be; the message names it and the fix."""


def _fsync_folder(folder: str) -> None:
    # The rename itself is durable only once the folder entry is on disk; not possible on Windows (no folder fds).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(path: str, save: Callable[[str], None]) -> str:
    """
    Write a file through a temporary file next to it, then rename it over `path`: a crash at any moment leaves either
    the previous `path` (or none) or the complete new one.

    Args:
        path (`str`):
            The file to (re)write; its folder is created if needed.
        save (`Callable[[str], None]`):
            Writes the complete content to the path it is given (a temporary name with the same extension, so that
            e.g. matplotlib's `savefig` infers the same format).

    Returns:
        `str`: `path`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name, extension = os.path.splitext(os.path.basename(path))
    # Hidden, unique per writer (two processes never share one), and with the target's extension.
    temporary = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{extension}")
    try:
        save(temporary)
        with open(temporary, "rb+") as f:  # what `save` wrote must be on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_folder(folder)
    return path


def atomic_write_text(path: str, text: str) -> str:
    """Write `text` (UTF-8) to `path` with [`atomic_save`]; returns `path`."""

    def save(temporary: str) -> None:
        with open(temporary, "x", encoding="utf-8") as f:
            f.write(text)

    return atomic_save(path, save)


def atomic_write_json(path: str, data: Any, **dump_kwargs: Any) -> str:
    """Write `data` as indented JSON with [`atomic_save`] (`dump_kwargs` go to `json.dumps`); returns `path`."""
    return atomic_write_text(path, json.dumps(data, indent=2, **dump_kwargs))


def read_json_file(path: str, what: str, fix: str) -> dict[str, Any] | None:
    """
    A JSON object we wrote earlier (a state or results file); `None` when the file does not exist.

    Args:
        path (`str`):
            The file.
        what (`str`):
            What the file is, for the message (e.g. `"the record of a finished training"`).
        fix (`str`):
            What the user should do if it is damaged (e.g. `"delete it to train that method again"`).

    Raises:
        [`DamagedFileError`]: the file is empty, not UTF-8, not valid JSON (cut short by a crash of an older version,
        or edited) or not a JSON object; the message names the file and `fix`.
    """
    if not os.path.exists(path):
        return None
    if os.path.isdir(path):
        raise DamagedFileError(f"{path} ({what}) is a folder, not a file: {fix}.")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as error:
        raise DamagedFileError(f"{path} ({what}) is not UTF-8 text ({error}): {fix}.") from None
    if not text.strip():
        raise DamagedFileError(f"{path} ({what}) is empty: {fix}.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DamagedFileError(f"{path} ({what}) is not valid JSON ({error}; cut short or edited?): {fix}.") from None
    if not isinstance(data, dict):
        raise DamagedFileError(f"{path} ({what}) holds a JSON {type(data).__name__}, not an object: {fix}.")
    return data
