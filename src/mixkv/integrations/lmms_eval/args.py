"""The mixkv part of an lmms-eval ``--model_args`` string, turned into a mixkv method (no lmms-eval needed).

lmms-eval hands every ``key=value`` of ``--model_args`` to the model class as a keyword argument, after its
own conversion (``"64"`` -> ``64``, ``"0.1"`` -> ``0.1``, ``"true"`` -> ``True``, anything else a string).
:func:`split_model_args` takes mixkv's keys out before the rest reaches the wrapped lmms-eval model, whose
``__init__`` usually rejects unknown keywords.

Decisions (the issue is silent on them):

* ``method`` defaults to ``snapkv+mixkv``; a compressing method without ``budget`` or ``ratio`` gets
  :data:`mixkv.core.defaults.BUDGET` (as ``mixkv.press`` does), recorded in :attr:`PressArgs.label`.
* ``method=full`` with ``budget``, ``ratio`` or ``profile`` is an error (it would silently measure the full
  cache while the user believes a budget applied), as is ``budget`` together with ``ratio``.
* ``window`` defaults to :data:`mixkv.core.defaults.WINDOW`; ``redundancy`` to ``online``.
* every value is checked before the (possibly 7B) model loads, so a typo fails in a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core import defaults
from ...core.registry import available_methods, make_method

KEYS = ("method", "budget", "ratio", "window", "profile", "redundancy")
"""The ``--model_args`` keys mixkv owns; every other key goes to the wrapped lmms-eval model."""


def _int_arg(name: str, value: Any) -> int:
    """A positive int from lmms-eval's parsed value (int, a float like 64.0, or a digit string)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (tokens per KV head), got {value!r}")
    return value


def _ratio_arg(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"ratio must be a number in (0, 1], got {value!r}")
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"ratio must be a number in (0, 1] (share of the prompt kept), got {value!r}") from None
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1] (share of the prompt kept), got {value!r}")
    return ratio


@dataclass(frozen=True)
class PressArgs:
    """mixkv's settings for one lmms-eval run; :meth:`make` builds the method (None for ``full``)."""

    method: str = "snapkv+mixkv"
    budget: int | None = None
    ratio: float | None = None
    window: int = defaults.WINDOW
    profile: str | None = None
    redundancy: str = defaults.REDUNDANCY

    @classmethod
    def parse(cls, **kwargs: Any) -> PressArgs:
        """Validate lmms-eval-parsed values; raises ValueError naming the key and what is accepted."""
        unknown = sorted(set(kwargs) - set(KEYS))
        if unknown:
            raise ValueError(f"unknown mixkv argument(s) {unknown}; mixkv accepts {', '.join(KEYS)}")
        method = kwargs.get("method", cls.method)
        if not isinstance(method, str) or method.strip().lower() not in available_methods():
            raise ValueError(f"method={method!r} is not a mixkv method; accepted: {', '.join(available_methods())}")
        method = method.strip().lower()
        budget = kwargs.get("budget")
        ratio = kwargs.get("ratio")
        profile = kwargs.get("profile")
        if method == "full":
            given = [k for k in ("budget", "ratio", "profile") if kwargs.get(k) is not None]
            if given:
                raise ValueError(f"method=full compresses nothing, so {', '.join(given)} would be ignored; drop it "
                                 "(or choose a compressing method such as snapkv+mixkv)")
        if budget is not None and ratio is not None:
            raise ValueError("give budget= (tokens kept per KV head) or ratio= (share of the prompt kept), not both")
        budget = None if budget is None else _int_arg("budget", budget)
        ratio = None if ratio is None else _ratio_arg(ratio)
        if method != "full" and budget is None and ratio is None:
            budget = defaults.BUDGET
        window = _int_arg("window", kwargs.get("window", defaults.WINDOW))
        if budget is not None and budget <= window:
            raise ValueError(f"budget={budget} must be larger than window={window} (the window is always kept)")
        if profile is not None:
            if not isinstance(profile, str) or not Path(profile).expanduser().is_file():
                raise ValueError(f"profile={profile!r} is not a file (a calibration profile from `mixkv calibrate`)")
            profile = str(Path(profile).expanduser())
        redundancy = kwargs.get("redundancy", defaults.REDUNDANCY)
        if redundancy not in ("online", "profile"):
            raise ValueError(f"redundancy must be 'online' or 'profile', got {redundancy!r}")
        args = cls(method=method, budget=budget, ratio=ratio, window=window, profile=profile, redundancy=redundancy)
        args.make()  # the registry's own checks (profile needed by sparsemm/headkv, ...), before any model loads
        return args

    def make(self):
        """The mixkv method object, or None for ``full``."""
        if self.method == "full":
            return None
        return make_method(self.method, budget=self.budget if self.ratio is None else None, ratio=self.ratio,
                           window=self.window, profile=self.profile, redundancy=self.redundancy)

    @property
    def label(self) -> str:
        """``full``, ``snapkv+mixkv@64`` or ``snapkv+mixkv@r0.1``: the name tables use."""
        if self.method == "full":
            return "full"
        return f"{self.method}@{self.budget}" if self.ratio is None else f"{self.method}@r{self.ratio:g}"


def split_model_args(kwargs: dict[str, Any]) -> tuple[PressArgs, dict[str, Any]]:
    """``(PressArgs from mixkv's keys, the remaining keywords for the wrapped lmms-eval model)``."""
    ours = {k: kwargs[k] for k in KEYS if k in kwargs}
    rest = {k: v for k, v in kwargs.items() if k not in KEYS}
    return PressArgs.parse(**ours), rest
