"""JSON files: atomic writes (a crash or Ctrl-C mid-write never leaves a file that looks complete) and
reads that say clearly what is wrong with a file."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask (reading it means setting it: put straight back)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def target_mode(path: Path) -> int:
    """Permission bits a rewrite of ``path`` should get: the existing file's, else what ``open()`` would
    give a new file (0o666 less the umask). ``mkstemp`` makes its file 0o600, whatever the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def write_json_atomic(obj, path: str | Path, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON to a temporary file in the same folder, then rename it over ``path``.

    The file gets the mode a plain write would give it: an existing file keeps its mode, a new one
    follows the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent)
        os.chmod(tmp, target_mode(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | Path) -> Path:
    """Raise a clear error now if ``path`` cannot be written later (before any expensive work).

    Creates the missing folders and probes them with a temporary file: permission bits alone
    say nothing for root or on read-only file systems.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output path {str(path)!r} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
        if path.exists():
            with path.open("a"):
                pass
    except OSError as e:
        raise ValueError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    return path


def read_json(path: str | Path, what: str = "") -> object:
    """The JSON in ``path``; a missing file or bad JSON raises an error naming the file (and ``what`` it is)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what + ' ' if what else ''}{str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
