"""Argument helpers shared by the commands: list parsing, argparse types, early checks, JSON output.

Commands validate every argument and output path here, before they load a model, so a typo costs
a second, not a run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.io import check_writable, read_json, write_json_atomic
from ..lab.machine import machine_description, setup_threads

__all__ = ["check_outputs", "load_results", "machine_description", "nonneg_int", "parse_list", "partial_json_path",
           "positive_int", "setup_threads", "write_json", "write_partial_json"]


def parse_list(text: str, kind=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"expected a comma-separated list, got {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError as e:
        raise ValueError(f"could not read {text!r} as a list of {kind.__name__}") from e


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a clear message instead of an empty run)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """argparse type: a comma-separated list of integers >= 1 ("1000,2000,3000")."""
    values = []
    for part in [t.strip() for t in text.split(",")]:
        if not part:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
        values.append(positive_int(part))
    return values


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0 below 2**32 (seeds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {value}")
    return value


def check_outputs(*paths: str | Path | None) -> None:
    """Fail now, not after the run, when an output file could not be written."""
    for path in paths:
        if path:
            check_writable(path)


def write_json(obj: dict, path: str | Path) -> Path:
    """Results files are written atomically: an interrupted write never leaves a truncated file."""
    return write_json_atomic(obj, path)


def partial_json_path(path: str | Path) -> Path:
    """Where an interrupted run goes when ``path`` is taken: ``<path>.partial.json``, as calibrate's."""
    return Path(f"{path}.partial.json")


def write_partial_json(obj: dict, path: str | Path) -> Path:
    """An interrupted run's results: at ``path`` when no file is there, else at :func:`partial_json_path`,
    so a partial run never replaces an earlier (maybe complete) results file. Returns where it went."""
    target = Path(path)
    return write_json(obj, partial_json_path(path) if target.exists() else target)


def load_results(path: str | Path, kind: str = "results") -> dict:
    """A results JSON written by one of the commands, with a clear error for anything else."""
    payload = read_json(path)
    if not isinstance(payload, dict) or not isinstance(payload.get(kind), list):
        raise ValueError(f"{path}: not a mixkv results file (no {kind!r} list); give the --json of an earlier run")
    return payload
