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
from ..profiles import Profile, load_profile
from .base import BudgetedMethod


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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_scores is None:
            raise ValueError(
                "SparseMM needs head_scores: a calibration profile (JSON path or mixkv.Profile) "
                "with per-(layer, KV head) visual-head scores; make one with `mixkv calibrate`"
            )
        if not isinstance(self.head_scores, Profile):
            if not isinstance(self.head_scores, (str, Path)):
                raise ValueError(f"SparseMM: head_scores must be a Profile or a JSON path, got {self.head_scores!r}")
            self.head_scores = load_profile(self.head_scores)
        if self.head_scores.head_scores is None:
            raise ValueError(
                f"SparseMM: profile {self.head_scores.model!r} has no head_scores (only "
                f"{', '.join(self.head_scores.fields()) or 'no fields'}); calibrate with visual-head scoring"
            )
        if not float(self.head_scores.head_scores.sum()) > 0:
            raise ValueError(
                f"SparseMM: the head_scores of profile {self.head_scores.model!r} are all zero, so they say "
                "nothing about which heads to favour; calibrate on prompts with answer regions"
            )
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
