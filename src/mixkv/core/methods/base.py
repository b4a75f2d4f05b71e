"""The method interface, written down: what every compression method answers for one layer.

A method answers two questions about one layer's prefill (a :class:`~mixkv.core.layer.LayerPrefill`):

* ``allocate(layer)``: how many *candidates* each (sequence, KV head) keeps, ``(B, H)`` long;
* ``score(layer)``: which ones, ``(B, H, C)`` float, higher is kept.

The observation window (the last ``window`` prompt tokens) is always kept on top; a sequence
whose real prompt fits ``budget_per_sequence`` is not compressed. Methods never touch the model
or the cache: :func:`mixkv.core.selection.plan_layer` turns their answers into kept positions.

Two kinds of method exist, both subclasses of :class:`Method`:

* a **base** (:class:`BudgetedMethod`): owns the budget, window and pooling and decides the
  allocation (SnapKV, PyramidKV, AdaKV, SparseMM, HeadKV, random);
* a **wrapper** (:class:`ScoreWrapper`): wraps a base and changes only the score inside each head
  (MixKV). Everything else is the base's, delegated once here, so a wrapper is a few lines.

A third-party method is one file: subclass one of the two, register it with
:func:`mixkv.core.registry.register_base` (or ``register_wrapper``) if it should have a name, and
declare its ``allocation`` (uniform, per layer, per head) so the planner and the vLLM plugin know it.
The maths of every built-in method is in ``docs/method.md``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch

from .. import defaults
from ..layer import LayerPrefill
from ..models import ModelInfo


class Allocation(str, Enum):
    """How a method spreads its budget over layers and heads: what a paged engine must page by."""

    UNIFORM = "uniform"  # the same number of tokens in every layer and head
    PER_LAYER = "per-layer"  # the same in every head of a layer, varying with depth (PyramidKV)
    PER_HEAD = "per-head"  # varying by head (AdaKV, SparseMM, HeadKV)


class Method(ABC):
    """What :func:`mixkv.press` needs from a method (see the module docstring)."""

    name: str = "method"
    allocation: ClassVar[Allocation] = Allocation.PER_HEAD
    """Declared trait, read by the registry's users (the capacity planner, the vLLM plugin, which serves
    ``UNIFORM`` methods): never decided from a method's name. Undeclared: per-head, the most general."""
    profile_field: ClassVar[str | None] = None
    """The constructor parameter a calibration profile goes to (``make_method(..., profile=)``), if any."""
    keeps_full_budget: ClassVar[bool] = False
    """Declared trait: a compressed prompt keeps exactly ``budget`` tokens per head *on average over the whole
    model*, whatever its scores (uniform methods, and those that apportion a fixed total among heads). A paged
    engine can then size a request from its prompt length alone; without it, the allocation is asked."""
    reads_modality: ClassVar[bool] = False
    """Declared trait: the scores read ``LayerPrefill.image_mask`` (which prompt tokens are image tokens). An
    engine that does not track it (the vLLM plugin) must refuse the method rather than serve another score."""

    @property
    @abstractmethod
    def window(self) -> int:
        """Observation window ``W`` (always kept)."""

    @property
    @abstractmethod
    def kernel(self) -> int:
        """Pooling kernel of ``s_ext``."""

    @abstractmethod
    def budget_per_sequence(self, layer: LayerPrefill) -> torch.Tensor:
        """Tokens kept per KV head, window included, for each sequence: ``(B,)`` long."""

    @abstractmethod
    def allocate(self, layer: LayerPrefill) -> torch.Tensor:
        """Candidates kept per (sequence, KV head), ``(B, H)`` long (window not counted)."""

    def score(self, layer: LayerPrefill) -> torch.Tensor:
        """Selection score inside each head, ``(B, H, C)``: SnapKV's ``s_ext`` unless overridden."""
        return layer.s_ext

    def validate_for(self, info: ModelInfo) -> None:  # noqa: B027 - optional hook, nothing to check by default
        """Check model-specific settings (profiles) against the model; raise a clear error."""

    def with_budget(self, budget: int) -> Method:
        """The same method with a fixed ``budget`` per head; needed for ``press(decode_budget=...)``."""
        raise NotImplementedError(f"{self.name} cannot change its budget; it does not support decode_budget")

    def describe(self) -> str:
        return self.name


def resolve_budget(n_valid: torch.Tensor, budget: int | None, ratio: float | None, window: int) -> torch.Tensor:
    """Tokens kept per KV head (window included) for each sequence, ``(B,)``.

    With ``ratio``, a sequence keeps ``round(ratio * n)`` tokens but never fewer than the window.
    """
    if budget is not None:
        return torch.full_like(n_valid, budget)
    return torch.clamp(torch.round(n_valid.double() * ratio).long(), min=window)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class BudgetedMethod(Method):
    """A base method: budget, window and pooling, validated up front; subclasses define ``allocate``.

    Parameters (shared by every base):

    * ``budget``: tokens kept per KV head **including** the window (default 64 when no ratio is given);
    * ``ratio``: instead of a budget, the fraction of each prompt kept, in (0, 1]; giving both is an error;
    * ``window``: observation window ``W`` (default 32), always kept;
    * ``kernel``: odd pooling kernel of SnapKV's score (default 5).
    """

    budget: int | None = None
    """None: ``defaults.BUDGET``, unless ``ratio`` is given (a default must not hide a conflict)."""
    ratio: float | None = None
    window: int = defaults.WINDOW
    kernel: int = defaults.KERNEL

    name = "base"

    def __post_init__(self) -> None:
        cls = type(self).__name__
        if not _is_int(self.window) or self.window < 1:
            raise ValueError(f"{cls}: window must be a positive int, got {self.window!r}")
        if not _is_int(self.kernel) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"{cls}: kernel must be an odd positive int, got {self.kernel!r}")
        if self.ratio is not None:
            if self.budget is not None:
                raise ValueError(f"{cls}: give budget= (tokens kept per KV head) or ratio= (share of each prompt "
                                 f"kept), not both; got budget={self.budget!r}, ratio={self.ratio!r}")
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) \
                    or not 0.0 < float(self.ratio) <= 1.0:
                raise ValueError(f"{cls}: ratio must be a fraction of the prompt in (0, 1], got {self.ratio!r}")
            return
        if self.budget is None:
            self.budget = defaults.BUDGET
        if not _is_int(self.budget):
            raise ValueError(
                f"{cls}: budget must be an int (tokens kept per KV head, window included) "
                f"or pass ratio=..., got {self.budget!r}"
            )
        if self.budget <= self.window:
            raise ValueError(
                f"{cls}: budget ({self.budget}) must be larger than the window ({self.window}); "
                f"the budget counts the window, so use budget >= {self.window + 1} or a smaller window"
            )
        if self.budget > 2**31:
            raise ValueError(f"{cls}: budget {self.budget} is not a token count (at most 2**31 tokens per head)")

    def budget_per_sequence(self, layer: LayerPrefill) -> torch.Tensor:
        length = layer.n_valid if layer.real_length is None else layer.real_length.to(layer.n_valid.device)
        return resolve_budget(length, self.budget, self.ratio, self.window)

    def with_budget(self, budget: int) -> BudgetedMethod:
        """The same method with a fixed ``budget`` per head (the budget while decoding)."""
        return dataclasses.replace(self, budget=budget, ratio=None)

    def candidates_per_sequence(self, layer: LayerPrefill) -> torch.Tensor:
        """Candidates kept per head on average (``budget - W``), ``(B,)``."""
        return (self.budget_per_sequence(layer) - self.window).clamp_min(0)

    def describe(self) -> str:
        size = f"budget={self.budget}" if self.budget is not None else f"ratio={self.ratio}"
        return f"{self.name}({size}, window={self.window})"


@dataclass
class ScoreWrapper(Method):
    """A method that wraps a base and changes only the score inside each head.

    Budget, window, kernel, allocation and model checks are the base's. Subclasses override
    ``score`` (and ``suffix``, used in the name: ``"snapkv+<suffix>"``).
    """

    base: BudgetedMethod

    suffix = "wrapper"

    def __post_init__(self) -> None:
        cls = type(self).__name__
        if isinstance(self.base, ScoreWrapper):
            raise ValueError(f"{cls} wraps a base method (SnapKV, PyramidKV, AdaKV, SparseMM, HeadKV), "
                             "not another wrapper")
        if not isinstance(self.base, BudgetedMethod):
            raise ValueError(
                f"{cls}: base must be a method such as SnapKV(budget=64) or AdaKV(budget=64), got {self.base!r}"
            )

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.base.name}+{self.suffix}"

    @property
    def allocation(self) -> Allocation:  # type: ignore[override]
        return self.base.allocation  # a wrapper changes scores inside heads, never the allocation

    @property
    def keeps_full_budget(self) -> bool:  # type: ignore[override]
        return self.base.keeps_full_budget

    @property
    def window(self) -> int:
        return self.base.window

    @property
    def kernel(self) -> int:
        return self.base.kernel

    @property
    def budget(self) -> int | None:
        return self.base.budget

    @property
    def ratio(self) -> float | None:
        return self.base.ratio

    def budget_per_sequence(self, layer: LayerPrefill) -> torch.Tensor:
        return self.base.budget_per_sequence(layer)

    def allocate(self, layer: LayerPrefill) -> torch.Tensor:
        return self.base.allocate(layer)

    def with_budget(self, budget: int) -> ScoreWrapper:
        return dataclasses.replace(self, base=self.base.with_budget(budget))

    def validate_for(self, info: ModelInfo) -> None:
        self.base.validate_for(info)

    def describe(self) -> str:
        return f"{type(self).__name__}({self.base.describe()})"
