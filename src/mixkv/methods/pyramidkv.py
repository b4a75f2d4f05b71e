"""PyramidKV: more tokens in the lower layers, fewer in the upper ones (a linear schedule)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import budgets
from .base import BudgetedMethod, LayerContext


@dataclass
class PyramidKV(BudgetedMethod):
    """Per-layer budgets from ``budgets.pyramid_counts`` (β = 20), recomputed for every prompt."""

    beta: float = 20.0
    name = "pyramidkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 1:
            raise ValueError(f"PyramidKV: beta must be > 1 (min = base / beta), got {self.beta!r}")

    def allocate(self, ctx: LayerContext) -> torch.Tensor:
        return budgets.pyramid_counts(
            self.base_per_sequence(ctx), ctx.n_cand, ctx.layer_idx, ctx.num_layers, ctx.keys.shape[1], self.beta
        )
