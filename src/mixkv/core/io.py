"""Atomic file writes: a crash or Ctrl-C mid-write never leaves a file that looks complete."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json_atomic(obj, path: str | Path, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON to a temporary file in the same folder, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | Path) -> Path:
    """Raise a clear error now if ``path`` cannot be written later (before any expensive work)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output path {str(path)!r} is a directory; give a file name")
    folder = path.parent
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {str(path)!r}: {str(existing)!r} is not a writable directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"cannot write {str(path)!r}: the file is not writable")
    return path
