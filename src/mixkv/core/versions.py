"""Fail early and clearly on a transformers release we do not support.

mixkv plugs into transformers' cache-layer API and attention-function registry, which
changed in 5.0 (and renamed ``past_key_values`` to ``cache`` in 5.24). Versions outside
the tested range work until they do not; we say so instead of breaking silently inside generate.
"""

from __future__ import annotations

import warnings

TESTED_MIN = (5, 0)
TESTED_MAX = (5, 25)  # the one place; constraints.txt (what CI installs) follows it


def _parse(version: str) -> tuple[int, int]:
    parts = version.split(".")
    nums = []
    for p in parts[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        nums.append(int(digits) if digits else 0)
    return tuple(nums + [0] * (2 - len(nums)))  # type: ignore[return-value]


def check_versions(version: str | None = None) -> tuple[int, int]:
    if version is None:
        import transformers

        version = transformers.__version__
    v = _parse(version)
    if v < TESTED_MIN or v[0] != TESTED_MIN[0]:
        raise ImportError(
            f"mixkv needs transformers 5.x (tested {TESTED_MIN[0]}.{TESTED_MIN[1]} to "
            f"{TESTED_MAX[0]}.{TESTED_MAX[1]}); found {version}. Install with: pip install 'transformers>=5,<6'"
        )
    if v > TESTED_MAX:
        warnings.warn(
            f"mixkv was tested with transformers up to {TESTED_MAX[0]}.{TESTED_MAX[1]}; found {version}. "
            "If generation fails inside the cache or attention code, pin "
            f"transformers<={TESTED_MAX[0]}.{TESTED_MAX[1]}.",
            stacklevel=2,
        )
    return v
