"""Model shapes: the few numbers of a language model that size its KV cache, nothing else.

A shape comes from a named public model kept in the repository (``named_shapes/*.json``, each
with the address its numbers were read from) or from a Hugging Face ``config.json``. For a VLM
only the language model holds a KV cache, so its ``text_config`` / ``llm_config`` is read.
"""

from __future__ import annotations

import difflib
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


def close_matches(word: str, known: list[str], n: int = 5) -> str:
    """At most ``n`` names like ``word``, for an error message (a full list of ~900 would bury it)."""
    found = difflib.get_close_matches(word.lower(), known, n=n, cutoff=0.6) if isinstance(word, str) else []
    return f"did you mean {', '.join(found)}?" if found else "no close match"


def _with_defaults(lm: dict, path: Path) -> dict:
    """Fill fields a config leaves at its class defaults (llava-hf's ``text_config`` lists almost
    nothing) from transformers' config class for its ``model_type``; imported only then."""
    from transformers import CONFIG_MAPPING, AutoConfig

    model_type = lm["model_type"]
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ValueError(f"{path}: model_type {model_type!r} is not known to transformers "
                         f"({close_matches(model_type, list(CONFIG_MAPPING.keys()))}); give a model_type it "
                         "knows, or num_hidden_layers and num_attention_heads in the config")
    try:
        cfg = AutoConfig.for_model(model_type, **{k: v for k, v in lm.items() if k != "model_type"})
    except (ValueError, KeyError) as e:
        raise ValueError(f"model_type {model_type!r} is not known to transformers ({e})") from e
    return {**{k: getattr(cfg, k, None) for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                  "hidden_size", "head_dim")}, **lm}


def shape_from_config(path: str | Path, name: str | None = None) -> ModelShape:
    """Read a Hugging Face ``config.json`` (or a folder holding one).

    ``num_key_value_heads`` defaults to ``num_attention_heads`` (no GQA) and ``head_dim`` to
    ``hidden_size // num_attention_heads``, as in transformers. Counts must be positive integers and
    ``num_key_value_heads`` at most ``num_attention_heads``. A sliding window is kept only when
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
        lm = _with_defaults(lm, path)
    missing = [k for k in needed if lm.get(k) is None]
    if missing:
        raise ValueError(f"{path}: no {' or '.join(missing)} in the language model's config "
                         f"(looked in {', '.join(LANGUAGE_KEYS)} and the top level)")
    layers = config_count(lm, "num_hidden_layers", path)
    heads = config_count(lm, "num_attention_heads", path)
    kv_heads = heads if lm.get("num_key_value_heads") is None else config_count(lm, "num_key_value_heads", path)
    if kv_heads > heads:
        raise ValueError(f"{path}: num_key_value_heads ({kv_heads}) exceeds num_attention_heads ({heads}); "
                         "each KV head serves one or more attention heads, so at most num_attention_heads")
    head_dim = _head_dim(lm, heads, path)
    window = lm.get("sliding_window")
    if lm.get("use_sliding_window") is False:
        window = None
    return ModelShape(name=name or path.parent.name or str(path), num_layers=layers,
                      num_kv_heads=kv_heads, head_dim=head_dim, num_attention_heads=heads,
                      sliding_window=window, source=str(path))


def config_count(lm: dict, key: str, path: Path) -> int:
    """``lm[key]`` as a positive integer; anything else (0, "8", 8.0, true) is an error naming the field,
    not a division by zero or a type error further on."""
    value = lm.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def _head_dim(lm: dict, heads: int, path: Path) -> int:
    """``head_dim``, or ``hidden_size // num_attention_heads`` as transformers computes it."""
    if lm.get("head_dim") is not None:
        return config_count(lm, "head_dim", path)
    if lm.get("hidden_size") is None:
        raise ValueError(f"{path}: neither head_dim nor hidden_size in the language model's config")
    hidden = config_count(lm, "hidden_size", path)
    if hidden < heads:
        raise ValueError(f"{path}: hidden_size ({hidden}) is smaller than num_attention_heads ({heads}), so "
                         "hidden_size // num_attention_heads is no head dim; give head_dim")
    return hidden // heads


def resolve_shape(model: str) -> ModelShape:
    """A named shape, or a path to a ``config.json`` / a folder holding one."""
    path = Path(model)
    if path.suffix == ".json" or path.is_dir() or path.is_file():
        return shape_from_config(path)
    return load_named(model)
