"""Method names for the command line and configs: ``"snapkv+mixkv"`` -> ``MixKV(SnapKV(...))``.

A name is a base (``snapkv``, ``pyramidkv``, ``adakv``, ``sparsemm``, ``headkv``, ``random``) optionally
followed by ``+<wrapper>`` (``mixkv``); ``full`` means no compression. Third-party methods join
with :func:`register_base` / :func:`register_wrapper`.
"""

from __future__ import annotations

from dataclasses import fields

from . import defaults
from .methods import (
    AdaKV,
    Allocation,
    BudgetedMethod,
    HeadKV,
    Method,
    MixKV,
    MixKVModality,
    PyramidKV,
    PyramidKVAuthors,
    RandomKV,
    ScoreWrapper,
    SnapKV,
    SparseMM,
)

BASES: dict[str, type[BudgetedMethod]] = {}
WRAPPERS: dict[str, type[ScoreWrapper]] = {}
DESCRIPTIONS: dict[str, str] = {"full": "no compression (the reference)"}


def register_base(name: str, cls: type[BudgetedMethod], description: str) -> None:
    """Make ``cls`` available as ``name`` (and ``name+<wrapper>`` for every wrapper)."""
    if not (isinstance(cls, type) and issubclass(cls, BudgetedMethod)):
        raise ValueError(f"register_base: {cls!r} is not a BudgetedMethod subclass")
    BASES[name] = cls
    DESCRIPTIONS[name] = description


def register_wrapper(name: str, cls: type[ScoreWrapper], description: str) -> None:
    """Make ``<base>+name`` available for every base; ``description`` may use ``{base}``."""
    if not (isinstance(cls, type) and issubclass(cls, ScoreWrapper)):
        raise ValueError(f"register_wrapper: {cls!r} is not a ScoreWrapper subclass")
    WRAPPERS[name] = cls
    DESCRIPTIONS[f"*+{name}"] = description


register_base("snapkv", SnapKV, "SnapKV: pooled attention of the last window; same budget for every head")
register_base("pyramidkv", PyramidKV, "PyramidKV: SnapKV scores, budgets decreasing linearly with depth")
register_base("pyramidkv-authors", PyramidKVAuthors, "PyramidKV at its reference code's schedule (integer "
              "steps: overspends the budget slightly); for comparison with published numbers")
register_base("adakv", AdaKV, "AdaKV: SnapKV scores, the layer's budget shared among heads by attention concentration")
register_base("sparsemm", SparseMM, "SparseMM: per-head budgets from a visual-head profile (needs profile=...)")
register_base("headkv", HeadKV, "HeadKV: per-head budgets from a retrieval-reasoning profile, one pool for the "
              "whole model (needs profile=...)")
register_base("random", RandomKV, "random eviction with a uniform budget (the floor)")
register_wrapper("mixkv", MixKV, "MixKV on {base}: {base}'s budgets, importance+diversity mixed by head redundancy")
register_wrapper("mixkv-modal", MixKVModality, "MixKV on {base} with diversity inside each modality (image / text); "
                 "an option, not the paper's method")


def available_methods() -> list[str]:
    """Every accepted name: ``full``, each base, and each ``base+wrapper``."""
    names = ["full", *BASES]
    names += [f"{b}+{w}" for w in WRAPPERS for b in BASES if b != "random"]
    return names


def allocation_of(name: str) -> Allocation | None:
    """The declared allocation of a registered method name (a wrapper keeps its base's); None for ``full``."""
    key = name.strip().lower()
    if key == "full":
        return None
    if key not in available_methods():
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(available_methods())}")
    return BASES[key.partition("+")[0]].allocation


def needs_profile(name: str, redundancy: str | None = defaults.REDUNDANCY) -> bool:
    """Whether the method of this name reads a calibration profile: its base declares a ``profile_field``,
    or it is wrapped with ``redundancy="profile"``."""
    key = name.strip().lower()
    if key == "full":
        return False
    base, _, wrapper = key.partition("+")
    if base not in BASES:
        return False
    return BASES[base].profile_field is not None or (bool(wrapper) and redundancy == "profile")


def describe_method(name: str) -> str:
    base, _, wrapper = name.partition("+")
    if wrapper:
        return DESCRIPTIONS[f"*+{wrapper}"].format(base=base)
    return DESCRIPTIONS[name]


def make_method(name: str, budget: int | None = None, ratio: float | None = None,
                window: int = defaults.WINDOW, redundancy=defaults.REDUNDANCY, profile=None, **kwargs) -> Method | None:
    """Build a method from its registry name; ``"full"`` gives None (no compression).

    ``profile`` is a calibration profile (path or Profile): SparseMM's head scores, HeadKV's
    retrieval scores, and MixKV's offline redundancy when ``redundancy="profile"``. ``budget`` or
    ``ratio``, not both (neither: the default budget). Extra keyword arguments go to the base.
    """
    if not isinstance(name, str):
        raise ValueError(f"method name must be a string, got {name!r}")
    key = name.strip().lower()
    if key == "full":
        return None
    if key not in available_methods():
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(available_methods())}")
    base_name, _, wrapper = key.partition("+")
    cls = BASES[base_name]
    if cls.profile_field is not None:  # the base declares which of its parameters takes a profile
        kwargs.setdefault(cls.profile_field, profile)
    try:
        base = cls(budget=budget, ratio=ratio, window=window, **kwargs)
    except TypeError as e:  # an unknown keyword for this method
        raise ValueError(f"{name}: {e}") from e
    if not wrapper:
        return base  # ``redundancy`` only concerns wrappers; a grid may pass it to every method
    wrapper_cls = WRAPPERS[wrapper]
    if "redundancy" not in {f.name for f in fields(wrapper_cls)}:
        return wrapper_cls(base)
    if redundancy == "profile":
        if profile is None:
            raise ValueError("redundancy='profile' needs profile=<path to a calibration profile>")
        redundancy = profile
    elif redundancy is None:
        raise ValueError("redundancy must be 'online', 'profile' (with profile=...) or a profile path, not None")
    return wrapper_cls(base, redundancy=redundancy)


def resolve_method(method, **kwargs) -> Method | None:
    """A method object as given, or one built from a registry name with ``kwargs``."""
    if method is None:
        return None
    if isinstance(method, str):
        return make_method(method, **kwargs)
    if kwargs:
        raise ValueError(f"keyword arguments {sorted(kwargs)} only apply to a method given by name")
    if isinstance(method, Method):
        return method
    raise ValueError(f"method must be a registry name or a Method object, got {type(method).__name__}")
