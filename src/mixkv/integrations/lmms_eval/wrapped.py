"""The mixkv twins of lmms-eval model classes, built on first attribute access (needs lmms-eval).

``MixKV_qwen2_5_vl__chat`` is ``make_wrapper(<lmms-eval's chat class of qwen2_5_vl>)``; the names come from
:func:`.manifests.class_name`. Built lazily so that only the family actually run is imported.
"""

from __future__ import annotations

from typing import Any

from .manifests import parse_class_name

_built: dict[str, type] = {}


def _base_class(base_id: str, kind: str) -> type:
    if base_id == "toy_vlm":
        from .toyvlm_model import ToyVLM

        return ToyVLM
    from lmms_eval.models import MODEL_REGISTRY_V2

    manifest = MODEL_REGISTRY_V2.get_manifest(base_id)
    path = manifest.chat_class_path if kind == "chat" else manifest.simple_class_path
    if path is None:
        raise ImportError(f"lmms-eval has no {kind} implementation of {base_id!r}")
    import importlib

    module, _, cls = path.rpartition(".")
    return getattr(importlib.import_module(module), cls)


def __getattr__(name: str) -> Any:
    parsed = parse_class_name(name)
    if parsed is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _built:
        from .wrapper import make_wrapper

        _built[name] = make_wrapper(_base_class(*parsed), name)
    return _built[name]
