"""Helpers shared by the commands: model loading, thread setup, JSON output."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def setup_threads(threads: int | None) -> int:
    """Use ``threads`` torch threads (default: all cores); returns the number used."""
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), torch {torch.__version__}"
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, no GPU"


def parse_list(text: str, kind=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"expected a comma-separated list, got {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError as e:
        raise ValueError(f"could not read {text!r} as a list of {kind.__name__}") from e


TOY_VLM = "toy-vlm"


def load(name: str, dtype: str = "float32"):
    """``(model, tokenizer_or_processor)`` for ``toy-vlm``, ``smollm2-135m``, a directory or a hub id."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(dtypes)}")
    if name == TOY_VLM:
        from ..testbeds.toyvlm.model import load_toy_vlm

        return load_toy_vlm(dtype=dtypes[dtype])
    from ..testbeds.smollm2 import load_model

    return load_model(name, dtype=dtypes[dtype])


def write_json(obj: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)
    return path
