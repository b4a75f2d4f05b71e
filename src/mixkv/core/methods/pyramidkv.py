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

    The linear schedule is computed in real numbers and each layer's count floored, so the layers
    never keep more than the budget in total; PyramidKV's reference code rounds the minimum and the
    step to integers first and keeps a little more (30 layers, budget 64: a mean of 34 candidates
    per head against 31.5 here; ``docs/method.md``).

    Parameters: ``budget`` / ``ratio``, ``window``, ``kernel`` as for every base; ``beta``
    (default 20): the top layer keeps ``(budget - window) / beta`` candidates, floored (more when a
    short prompt clips the schedule); ``schedule``: ``"exact"`` (default, within the budget) or
    ``"authors"`` (the reference code's integer steps, to compare with the paper's numbers).
    """

    beta: float = defaults.PYRAMID_BETA
    schedule: str = "exact"
    name = "pyramidkv"
    allocation = Allocation.PER_LAYER

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta > 1:
            raise ValueError(f"PyramidKV: beta must be a number > 1 (min = base / beta), got {self.beta!r}")
        if self.schedule not in ("exact", "authors"):
            raise ValueError(f"PyramidKV: schedule must be 'exact' (within the budget) or 'authors' (the reference "
                             f"code's integer steps), got {self.schedule!r}")

    def allocate(self, layer: LayerPrefill) -> torch.Tensor:
        return budgets.pyramid_counts(
            self.candidates_per_sequence(layer), layer.n_cand, layer.layer_idx, layer.num_layers,
            layer.num_kv_heads, self.beta, integer_steps=self.schedule == "authors",
        )


@dataclass
class PyramidKVAuthors(PyramidKV):
    """PyramidKV at the reference code's schedule (``schedule="authors"``): by name ``pyramidkv-authors``,
    so a grid can put it beside ours and beside the paper's numbers."""

    schedule: str = "authors"
    name = "pyramidkv-authors"
