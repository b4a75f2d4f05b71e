"""AdaKV: heads of a layer share the layer's budget by how concentrated their attention is."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import budgets
from .base import BudgetedMethod, LayerContext


@dataclass
class AdaKV(BudgetedMethod):
    """Head-adaptive allocation (``budgets.adakv_counts``); heads end up with different lengths."""

    floor: float = 0.2
    normalize: bool = True
    name = "adakv"
    head_adaptive = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"AdaKV: floor must be in [0, 1] (share kept uniform), got {self.floor!r}")

    def allocate(self, ctx: LayerContext) -> torch.Tensor:
        return budgets.adakv_counts(
            ctx.s_ext, ctx.cand_valid, self.base_per_sequence(ctx), ctx.n_cand, self.floor, self.normalize
        )
