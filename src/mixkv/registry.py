"""Method names for the command line and configs: ``"snapkv+mixkv"`` -> ``MixKV(SnapKV(...))``."""

from __future__ import annotations

from .methods import AdaKV, BudgetedMethod, MixKV, PyramidKV, RandomKV, SnapKV, SparseMM

BASES: dict[str, type[BudgetedMethod]] = {
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "adakv": AdaKV,
    "sparsemm": SparseMM,
    "random": RandomKV,
}

DESCRIPTIONS: dict[str, str] = {
    "full": "no compression (the reference)",
    "snapkv": "SnapKV: pooled attention of the last window; same budget for every head",
    "pyramidkv": "PyramidKV: SnapKV scores, budgets decreasing linearly with depth",
    "adakv": "AdaKV: SnapKV scores, the layer's budget shared among heads by attention concentration",
    "sparsemm": "SparseMM: per-head budgets from a visual-head profile (needs profile=...)",
    "random": "random eviction with a uniform budget (the floor)",
}
for _base in ("snapkv", "pyramidkv", "adakv", "sparsemm"):
    DESCRIPTIONS[f"{_base}+mixkv"] = (
        f"MixKV on {_base}: {_base}'s budgets, importance+diversity mixed by head redundancy"
    )


def available_methods() -> list[str]:
    return list(DESCRIPTIONS)


def make_method(name: str, budget: int | None = 64, ratio: float | None = None, window: int = 32,
                redundancy="online", profile=None, **kwargs):
    """Build a method from its registry name; ``"full"`` gives None (no compression).

    ``profile`` is a calibration profile (path or Profile): SparseMM's head scores, and MixKV's
    offline redundancy when ``redundancy="profile"``. Extra keyword arguments go to the base.
    """
    if not isinstance(name, str):
        raise ValueError(f"method name must be a string, got {name!r}")
    key = name.strip().lower()
    if key == "full":
        return None
    base_name, _, wrapper = key.partition("+")
    if key not in DESCRIPTIONS or (wrapper and wrapper != "mixkv"):
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(available_methods())}")
    cls = BASES[base_name]
    if cls is SparseMM:
        kwargs.setdefault("head_scores", profile)
    base = cls(budget=budget, ratio=ratio, window=window, **kwargs)
    if not wrapper:
        return base
    if redundancy == "profile":
        if profile is None:
            raise ValueError("redundancy='profile' needs profile=<path to a calibration profile>")
        redundancy = profile
    return MixKV(base, redundancy=redundancy)


def resolve_method(method, **kwargs):
    """A method object as given, or one built from a registry name with ``kwargs``."""
    if method is None:
        return None
    if isinstance(method, str):
        return make_method(method, **kwargs)
    if kwargs:
        raise ValueError(f"keyword arguments {sorted(kwargs)} only apply to a method given by name")
    if isinstance(method, (BudgetedMethod, MixKV)):
        return method
    raise ValueError(f"method must be a registry name or a method object, got {type(method).__name__}")
