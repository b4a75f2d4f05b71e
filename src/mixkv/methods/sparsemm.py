"""SparseMM: per-head budgets from offline visual-head scores (a calibration profile)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import budgets
from ..profiles import Profile, load_profile
from .base import BudgetedMethod, LayerContext


@dataclass
class SparseMM(BudgetedMethod):
    """``ratio_uniform`` of the budget for every head, the rest shared by visual-head score.

    ``head_scores`` is a :class:`~mixkv.profiles.Profile` (or its JSON path) holding
    ``head_scores`` per (layer, KV head). Without one SparseMM cannot work: that is an error,
    never a silent uniform fallback.
    """

    head_scores: Profile | str | Path | None = None
    ratio_uniform: float = 0.1
    name = "sparsemm"
    head_adaptive = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_scores is None:
            raise ValueError(
                "SparseMM needs head_scores: a calibration profile (JSON path or mixkv.profiles.Profile) "
                "with per-(layer, KV head) visual-head scores; make one with `mixkv calibrate`"
            )
        if not isinstance(self.head_scores, Profile):
            self.head_scores = load_profile(self.head_scores)
        if self.head_scores.head_scores is None:
            raise ValueError(
                f"SparseMM: profile {self.head_scores.model!r} has no head_scores (only "
                f"{', '.join(self.head_scores.fields()) or 'no fields'}); calibrate with visual-head scoring"
            )
        if not 0.0 <= self.ratio_uniform <= 1.0:
            raise ValueError(f"SparseMM: ratio_uniform must be in [0, 1], got {self.ratio_uniform!r}")

    def validate_for(self, info) -> None:
        self.head_scores.check_shape(info)

    def allocate(self, ctx: LayerContext) -> torch.Tensor:
        return budgets.sparsemm_counts(
            self.head_scores.head_scores, self.base_per_sequence(ctx), ctx.n_cand, ctx.layer_idx,
            self.ratio_uniform,
        )
