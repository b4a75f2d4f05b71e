"""Model shapes: the few numbers of a language model that size its KV cache, nothing else.

A shape comes from a named public model kept in the repository (``named_shapes/*.json``, each
with the address its numbers were read from) or from a Hugging Face ``config.json``. For a VLM
only the language model holds a KV cache, so its ``text_config`` / ``llm_config`` is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..core.io import read_json

DATA_DIR = "named_shapes"
"""Package data folder of the named shapes (not ``shapes/``: a folder next to ``shapes.py`` with
the same name would shadow or be shadowed by this module, depending on the import machinery)."""

LANGUAGE_KEYS = ("text_config", "llm_config", "language_config")
"""Where multimodal configs keep their language model (LLaVA / Qwen-VL in transformers 5, InternVL,
DeepSeek-VL); the first one present is read."""


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache of one model needs: layers, KV heads, head dim (keys and values alike)."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_attention_heads: int | None = None
    sliding_window: int | None = None
    """Set only when the config enables it; noted by the planner, not modelled."""
    image_tokens: dict = field(default_factory=dict)
    """How images become prompt tokens: ``{"min", "max", "rule"}`` (named shapes only)."""
    source: str = ""

    def __post_init__(self) -> None:
        for attr in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {attr} must be a positive integer, got {value!r}")

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of one token's keys and values in every layer and KV head (a full cache)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict:
        return {"name": self.name, "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "num_attention_heads": self.num_attention_heads,
                "sliding_window": self.sliding_window, "image_tokens": self.image_tokens, "source": self.source}


def _data_files() -> dict[str, object]:
    folder = resources.files("mixkv.serving") / DATA_DIR
    return {f.name[: -len(".json")]: f for f in folder.iterdir() if f.name.endswith(".json")}


def named_shapes() -> list[str]:
    """Names of the shapes kept in the repository, as written in their files."""
    return sorted(json.loads(f.read_text())["name"] for f in _data_files().values())


def load_named(name: str) -> ModelShape:
    """A named public shape; case and ``-``/``_``/``.`` do not matter (``qwen2.5-vl-7b``)."""
    files = {_key(json.loads(f.read_text())["name"]): f for f in _data_files().values()}
    f = files.get(_key(name))
    if f is None:
        raise ValueError(f"unknown model shape {name!r}; named shapes: {', '.join(named_shapes())}, "
                         "or give the path of a Hugging Face config.json")
    d = json.loads(f.read_text())
    return ModelShape(name=d["name"], num_layers=d["num_hidden_layers"], num_kv_heads=d["num_key_value_heads"],
                      head_dim=d["head_dim"], num_attention_heads=d.get("num_attention_heads"),
                      sliding_window=d.get("sliding_window"), image_tokens=d.get("image_tokens") or {},
                      source=d.get("source", ""))


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def language_part(config: dict) -> dict:
    """The language model's section of a (possibly multimodal) config dict."""
    for key in LANGUAGE_KEYS:
        if isinstance(config.get(key), dict):
            return config[key]
    return config


def _with_defaults(lm: dict) -> dict:
    """Fill fields a config leaves at its class defaults (llava-hf's ``text_config`` lists almost
    nothing) from transformers' config class for its ``model_type``; imported only then."""
    from transformers import AutoConfig

    model_type = lm["model_type"]
    try:
        cfg = AutoConfig.for_model(model_type, **{k: v for k, v in lm.items() if k != "model_type"})
    except (ValueError, KeyError) as e:
        raise ValueError(f"model_type {model_type!r} is not known to transformers ({e})") from e
    return {**{k: getattr(cfg, k, None) for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                  "hidden_size", "head_dim")}, **lm}


def shape_from_config(path: str | Path, name: str | None = None) -> ModelShape:
    """Read a Hugging Face ``config.json`` (or a folder holding one).

    ``num_key_value_heads`` defaults to ``num_attention_heads`` (no GQA) and ``head_dim`` to
    ``hidden_size // num_attention_heads``, as in transformers. A sliding window is kept only when
    the config turns it on (Qwen2 keeps ``sliding_window`` with ``use_sliding_window: false``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a model config (a JSON object is expected)")
    lm = language_part(config)
    needed = ("num_hidden_layers", "num_attention_heads")
    if any(lm.get(k) is None for k in needed) and lm.get("model_type"):
        lm = _with_defaults(lm)
    missing = [k for k in needed if lm.get(k) is None]
    if missing:
        raise ValueError(f"{path}: no {' or '.join(missing)} in the language model's config "
                         f"(looked in {', '.join(LANGUAGE_KEYS)} and the top level)")
    heads = lm["num_attention_heads"]
    kv_heads = lm.get("num_key_value_heads") or heads
    head_dim = lm.get("head_dim")
    if head_dim is None:
        if lm.get("hidden_size") is None:
            raise ValueError(f"{path}: neither head_dim nor hidden_size in the language model's config")
        head_dim = lm["hidden_size"] // heads
    window = lm.get("sliding_window")
    if lm.get("use_sliding_window") is False:
        window = None
    return ModelShape(name=name or path.parent.name or str(path), num_layers=lm["num_hidden_layers"],
                      num_kv_heads=kv_heads, head_dim=head_dim, num_attention_heads=heads,
                      sliding_window=window, source=str(path))


def resolve_shape(model: str) -> ModelShape:
    """A named shape, or a path to a ``config.json`` / a folder holding one."""
    path = Path(model)
    if path.suffix == ".json" or path.is_dir() or path.is_file():
        return shape_from_config(path)
    return load_named(model)
