"""AdaKV: heads of a layer share the layer's budget by how concentrated their attention is.

Paper: Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference", arXiv:2407.11550, 2024. Spec: ``docs/method.md``, "AdaKV".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import budgets, defaults
from ..layer import LayerPrefill
from .base import Allocation, BudgetedMethod


@dataclass
class AdaKV(BudgetedMethod):
    """Head-adaptive allocation (:func:`~mixkv.core.budgets.adakv_counts`); heads end up with different lengths.

    Parameters: ``budget`` / ``ratio``, ``window``, ``kernel`` as for every base; ``floor``
    (``alpha``, default 0.2): share of each head's budget kept uniform; ``normalize`` (default
    True): weight each head's sorted scores by the share of its mass in its own top ``budget - W``.
    """

    floor: float = defaults.ADAKV_FLOOR
    normalize: bool = True
    name = "adakv"
    allocation = Allocation.PER_HEAD
    keeps_full_budget = True  # exact apportionment (or the same count) in every head: budget x L x H

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) or not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"AdaKV: floor must be in [0, 1] (share kept uniform), got {self.floor!r}")

    def allocate(self, layer: LayerPrefill) -> torch.Tensor:
        return budgets.adakv_counts(
            layer.s_ext, layer.cand_valid, self.candidates_per_sequence(layer), layer.n_cand, self.floor,
            self.normalize, head_cap=layer.head_cand if layer.token_mask.shape[1] > 1 else None,
        )
