"""SnapKV: keep the tokens the prompt's last window attends to; every head keeps the budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import budgets
from .base import BudgetedMethod, LayerContext


@dataclass
class SnapKV(BudgetedMethod):
    """Uniform budget per KV head, selection by pooled window attention (``s_ext``)."""

    name = "snapkv"

    def allocate(self, ctx: LayerContext) -> torch.Tensor:
        return budgets.uniform_counts(self.base_per_sequence(ctx), ctx.n_cand, ctx.keys.shape[1])
