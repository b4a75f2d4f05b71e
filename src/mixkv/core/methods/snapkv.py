"""SnapKV: keep the tokens the prompt's last window attends to; every head keeps the budget.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024.
Spec: ``docs/method.md``, "SnapKV".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import budgets
from ..layer import LayerPrefill
from .base import Allocation, BudgetedMethod


@dataclass
class SnapKV(BudgetedMethod):
    """Uniform budget per KV head; selection by pooled window attention ``s_ext``.

    Parameters: ``budget`` (tokens per KV head, window included; default 64) or ``ratio``;
    ``window`` (32); ``kernel`` (5).
    """

    name = "snapkv"
    allocation = Allocation.UNIFORM
    keeps_full_budget = True  # exact apportionment (or the same count) in every head: budget x L x H

    def allocate(self, layer: LayerPrefill) -> torch.Tensor:
        return budgets.uniform_counts(self.candidates_per_sequence(layer), layer.n_cand, layer.num_kv_heads)
