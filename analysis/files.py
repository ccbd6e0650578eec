"""Files the analysis writes go in whole: a temporary file beside the target, then one rename.

A reader (a second report, a notebook reading the history cache, a person opening a PNG) sees the
old file or the new one, never half of one; a report that fails part way leaves whole files only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


class NotWritable(OSError):
    """A folder the analysis was told to write into cannot be created or written; the message says why."""


def write_whole(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` for a temporary path beside `path`, then rename it onto `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on one filesystem
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_writable(folder: Path, flag: str) -> None:
    """Raise NotWritable unless `folder` exists as a writable folder or can be created.

    Nothing is created: the nearest existing ancestor must be a folder we may write into. Called
    before any work, so a mistyped path costs no computation.
    """
    folder = Path(folder)
    there = folder
    while not there.exists() and there != there.parent:
        there = there.parent
    if not there.is_dir():
        raise NotWritable(f"{flag} {folder}: {there} is a file, not a folder; pass {flag} a folder path")
    if not os.access(there, os.W_OK | os.X_OK):
        raise NotWritable(f"{flag} {folder}: {there} is not writable; pass {flag} a folder you can write")
