"""SparseMM: per-head budgets from offline visual-head scores (a calibration profile).

Paper: Wang et al., "SparseMM: Head Sparsity Emerges from Visual Concept Responses in MLLMs",
arXiv:2506.05344, 2025. Spec: ``docs/method.md``, "SparseMM".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import budgets, defaults
from ..layer import LayerPrefill
from ..models import ModelInfo
from ..profiles import Profile, require_scores
from .base import Allocation, BudgetedMethod


@dataclass
class SparseMM(BudgetedMethod):
    """``ratio_uniform`` of the budget for every head, the rest shared by visual-head score.

    Parameters: ``budget`` / ``ratio``, ``window``, ``kernel`` as for every base;
    ``head_scores``: a :class:`~mixkv.core.profiles.Profile` (or its JSON path) holding
    ``head_scores`` per (layer, KV head), from ``mixkv calibrate``. Without one SparseMM cannot
    work: that is an error, never a silent uniform fallback. ``ratio_uniform`` (default 0.1).
    """

    head_scores: Profile | str | Path | None = None
    ratio_uniform: float = defaults.SPARSEMM_RATIO
    name = "sparsemm"
    allocation = Allocation.PER_HEAD
    keeps_full_budget = True  # exact apportionment (or the same count) in every head: budget x L x H
    profile_field = "head_scores"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.head_scores = require_scores(self.head_scores, "head_scores", "SparseMM", "visual-head scores")
        if isinstance(self.ratio_uniform, bool) or not isinstance(self.ratio_uniform, (int, float)) \
                or not 0.0 <= self.ratio_uniform <= 1.0:
            raise ValueError(f"SparseMM: ratio_uniform must be in [0, 1], got {self.ratio_uniform!r}")

    def validate_for(self, info: ModelInfo) -> None:
        self.head_scores.check_shape(info)

    def allocate(self, layer: LayerPrefill) -> torch.Tensor:
        return budgets.sparsemm_counts(
            self.head_scores.head_scores, self.candidates_per_sequence(layer), layer.n_cand, layer.layer_idx,
            self.ratio_uniform,
        )
