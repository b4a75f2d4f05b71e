"""The machine a measurement ran on, thread settings, and process memory readings (Linux)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from pathlib import Path

import torch


def setup_threads(threads: int | None) -> int:
    """Use ``threads`` torch threads (default: all cores); returns the number used."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def machine_description() -> str:
    """One line naming the hardware and torch build, printed next to every measured number."""
    cpu = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), torch {torch.__version__}"
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, no GPU"


def status_mib(key: str) -> float | None:
    """A memory line of ``/proc/self/status`` (``VmRSS``, ``VmHWM`` ...) in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rss_mib() -> float | None:
    """Peak resident memory since the last :func:`reset_peak_rss`, MiB."""
    return status_mib("VmHWM")


def reset_peak_rss(trim: bool = True) -> None:
    """Give freed heap back to the OS (glibc ``malloc_trim``), then reset the peak-RSS counter.

    Without the trim, a run's allocations reuse memory an earlier step (model loading) freed but
    kept resident, and the peak would not move at all.
    """
    if trim:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
