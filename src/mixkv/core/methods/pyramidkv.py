"""PyramidKV: more tokens in the lower layers, fewer in the upper ones (a linear schedule).

Paper: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", arXiv:2406.02069, 2024. Spec: ``docs/method.md``, "PyramidKV".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import budgets, defaults
from ..layer import LayerPrefill
from .base import Allocation, BudgetedMethod


@dataclass
class PyramidKV(BudgetedMethod):
    """Per-layer budgets from :func:`~mixkv.core.budgets.pyramid_counts`, recomputed for every prompt.

    Parameters: ``budget`` / ``ratio``, ``window``, ``kernel`` as for every base; ``beta``
    (default 20): the top layer keeps ``(budget - window) / beta`` candidates.
    """

    beta: float = defaults.PYRAMID_BETA
    name = "pyramidkv"
    allocation = Allocation.PER_LAYER

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta > 1:
            raise ValueError(f"PyramidKV: beta must be a number > 1 (min = base / beta), got {self.beta!r}")

    def allocate(self, layer: LayerPrefill) -> torch.Tensor:
        return budgets.pyramid_counts(
            self.candidates_per_sequence(layer), layer.n_cand, layer.layer_idx, layer.num_layers,
            layer.num_kv_heads, self.beta,
        )
