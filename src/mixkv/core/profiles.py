"""Calibration profiles: per-(layer, KV head) numbers measured offline for one model.

One JSON format serves MixKV's offline redundancy, SparseMM's visual-head scores and HeadKV's
retrieval-reasoning scores::

    {
      "format": "mixkv-profile", "version": 1,
      "model": "<model id or path>", "num_layers": L, "num_kv_heads": H,
      "key_redundancy":   [[r_00, ..., r_0H-1], ...]   (L x H, in [0, 1]) or null,
      "value_redundancy": [[...], ...] or null,
      "head_scores":      [[...], ...] or null        (L x H, >= 0; SparseMM),
      "retrieval_scores": [[...], ...] or null        (L x H, >= 0; HeadKV),
      "data": {...}, "library_version": "x.y.z"
    }

Every field is optional: a file without a field's key reads it as null, so version-1 files written
before ``retrieval_scores`` existed still load (they just cannot drive HeadKV).

A profile is only valid for the layer/head shape it was measured on: loading it for another
shape raises (the authors' code applies one model's redundancy file to every model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .io import read_json, write_json_atomic

FORMAT = "mixkv-profile"
VERSION = 1
FIELDS = ("key_redundancy", "value_redundancy", "head_scores", "retrieval_scores")
SCORE_FIELDS = ("head_scores", "retrieval_scores")  # non-negative head scores; the others are redundancies in [0, 1]


@dataclass
class Profile:
    """Offline per-(layer, KV head) statistics of one model."""

    model: str
    num_layers: int
    num_kv_heads: int
    key_redundancy: torch.Tensor | None = None
    value_redundancy: torch.Tensor | None = None
    head_scores: torch.Tensor | None = None
    retrieval_scores: torch.Tensor | None = None
    data: dict = field(default_factory=dict)
    library_version: str = ""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"profile {name} must be a positive integer, got {value!r}")
        for name in FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            t = torch.as_tensor(value, dtype=torch.float32)
            if t.shape != (self.num_layers, self.num_kv_heads):
                raise ValueError(
                    f"profile field {name!r} has shape {tuple(t.shape)}, expected "
                    f"(num_layers, num_kv_heads) = ({self.num_layers}, {self.num_kv_heads})"
                )
            if not torch.isfinite(t).all():
                raise ValueError(f"profile field {name!r} holds non-finite values")
            if name in SCORE_FIELDS and (t < 0).any():
                raise ValueError(f"profile field {name!r} must be non-negative")
            if name not in SCORE_FIELDS and ((t < 0) | (t > 1)).any():
                raise ValueError(
                    f"profile field {name!r} must hold redundancies in [0, 1]; got values in "
                    f"[{float(t.min()):.3g}, {float(t.max()):.3g}]"
                )
            setattr(self, name, t)

    def fields(self) -> list[str]:
        return [n for n in FIELDS if getattr(self, n) is not None]

    def check_shape(self, info) -> None:
        """Raise unless this profile was made for a model with ``info``'s layers and KV heads."""
        if (self.num_layers, self.num_kv_heads) != (info.num_layers, info.num_kv_heads):
            raise ValueError(
                f"calibration profile for {self.model!r} has {self.num_layers} layers x {self.num_kv_heads} "
                f"KV heads, but the model {info.name!r} has {info.num_layers} x {info.num_kv_heads}; "
                "profiles are per model: make one for this model with `mixkv calibrate`"
            )

    def to_json(self) -> dict:
        out: dict = {
            "format": FORMAT, "version": VERSION, "model": self.model,
            "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
        }
        for name in FIELDS:
            value = getattr(self, name)
            out[name] = None if value is None else value.tolist()
        out["data"] = self.data
        out["library_version"] = self.library_version
        return out


def save_profile(profile: Profile, path: str | Path) -> Path:
    """Write atomically: a crash mid-write never leaves a file that looks complete."""
    return write_json_atomic(profile.to_json(), path)


def profile_from_json(obj: dict, source: str = "<dict>") -> Profile:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{source}: not a mixkv profile (expected \"format\": \"{FORMAT}\")")
    if obj.get("version") != VERSION:
        raise ValueError(
            f"{source}: profile version {obj.get('version')!r} is not supported (this library reads {VERSION})"
        )
    missing = [k for k in ("model", "num_layers", "num_kv_heads") if k not in obj]
    if missing:
        raise ValueError(f"{source}: profile lacks {', '.join(missing)}")
    for key in ("num_layers", "num_kv_heads"):
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{source}: profile {key} must be an integer, got {value!r}")
    try:
        return _profile(obj)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


def _profile(obj: dict) -> Profile:
    return Profile(
        model=str(obj["model"]), num_layers=obj["num_layers"], num_kv_heads=obj["num_kv_heads"],
        key_redundancy=obj.get("key_redundancy"), value_redundancy=obj.get("value_redundancy"),
        head_scores=obj.get("head_scores"), retrieval_scores=obj.get("retrieval_scores"), data=obj.get("data") or {},
        library_version=str(obj.get("library_version", "")),
    )


def load_profile(path: str | Path) -> Profile:
    return profile_from_json(read_json(path, "calibration profile"), str(path))


def require_scores(value, field: str, method: str, what: str) -> Profile:
    """The profile a method needs ``field`` from (a Profile or its JSON path), or a clear error.

    Shared by every method whose budgets come from offline per-head scores (SparseMM, HeadKV):
    a missing profile, a profile without the field, or all-zero scores are errors, never a
    silent uniform fallback.
    """
    if value is None:
        raise ValueError(
            f"{method} needs {field}: a calibration profile (JSON path or mixkv.Profile) with per-(layer, KV head) "
            f"{what}; make one with `mixkv calibrate`"
        )
    if not isinstance(value, Profile):
        if not isinstance(value, (str, Path)):
            raise ValueError(f"{method}: {field} must be a Profile or a JSON path, got {value!r}")
        value = load_profile(value)
    scores = getattr(value, field)
    if scores is None:
        raise ValueError(
            f"{method}: profile {value.model!r} has no {field} (only {', '.join(value.fields()) or 'no fields'}); "
            f"calibrate with `mixkv calibrate` on prompts with answer regions"
        )
    if not float(scores.sum()) > 0:
        raise ValueError(
            f"{method}: the {field} of profile {value.model!r} are all zero, so they say nothing about which heads "
            "to favour; calibrate on prompts whose answers the model finds"
        )
    return value
