"""HeadKV: per-head budgets from offline retrieval-reasoning head scores, one pool for the whole model.

Paper: Fu, Cai, Asi, Xiong, Dong, Xiao, "Not All Heads Matter: A Head-Level KV Cache Compression
Method with Integrated Retrieval and Reasoning", ICLR 2025 (arXiv:2410.19258). Spec:
``docs/method.md``, "HeadKV".

HeadKV answers only *how many* tokens each head keeps: heads that retrieve the answer of a
needle-style prompt (and reason over it, HeadKV-R2) get more, the others less. Which tokens a
head keeps is SnapKV's ``s_ext`` (the paper's choice), or MixKV's score under
``MixKV(HeadKV(...))`` (``"headkv+mixkv"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import budgets, defaults
from ..layer import LayerPrefill
from ..models import ModelInfo
from ..profiles import Profile, require_scores
from .base import Allocation, BudgetedMethod


@dataclass
class HeadKV(BudgetedMethod):
    """Each head keeps ``base (1 - 1/beta)``; the rest of every head's budget forms one model-wide
    pool, shared in proportion to the heads' retrieval-reasoning scores.

    With ``base = budget - W``, ``L`` layers, ``H`` KV heads and ``p`` the profile's
    ``retrieval_scores`` normalised to sum 1 over the whole model, head ``(l, h)`` gets
    ``base - base / beta + p[l, h] * (base / beta) * L * H`` candidates, plus the window
    (:func:`~mixkv.core.budgets.headkv_counts`). The model keeps exactly ``base * L * H``
    candidates: shares are apportioned by largest remainders and a head capped at its
    candidates passes the excess on (the authors round every head on its own and let a capped
    head's excess go unused). Recomputed for every prompt.

    Parameters: ``budget`` / ``ratio``, ``window``, ``kernel`` as for every base (the library's
    shared defaults, W = 32 and an average-pooling kernel of 5, so that all bases compare at the
    same setting; the authors' code uses W = 8 and max-pooling with kernel 7 for every method);

    * ``retrieval_scores``: a :class:`~mixkv.core.profiles.Profile` (or its JSON path) holding
      ``retrieval_scores`` per (layer, KV head), from ``mixkv calibrate``. Without one HeadKV cannot
      work: that is an error, never a silent uniform fallback;
    * ``beta`` (default 1.5, :data:`~mixkv.core.defaults.HEADKV_BETA`): each head gives
      ``base / beta`` to the pool, ``beta >= 1`` (1 pools everything: a zero-score head keeps only
      its window). The paper tunes ``beta`` over {1.005, 1.01, 1.1, 1.2, 1.5, 2, 5, 10}; 1.5 is the
      default of the authors' scripts.

    The paper scores *query* heads (its code repeats the KV heads per query head); here budgets
    are per KV head, and a KV head's score is the mean over the query heads of its group.
    """

    retrieval_scores: Profile | str | Path | None = None
    beta: float = defaults.HEADKV_BETA
    name = "headkv"
    allocation = Allocation.PER_HEAD
    keeps_full_budget = True  # exact apportionment (or the same count) in every head: budget x L x H
    profile_field = "retrieval_scores"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not math.isfinite(self.beta) \
                or self.beta < 1:
            raise ValueError(f"HeadKV: beta must be a number >= 1 (each head pools base / beta), got {self.beta!r}")
        self.retrieval_scores = require_scores(self.retrieval_scores, "retrieval_scores", "HeadKV",
                                               "retrieval-reasoning scores")

    def validate_for(self, info: ModelInfo) -> None:
        self.retrieval_scores.check_shape(info)

    def allocate(self, layer: LayerPrefill) -> torch.Tensor:
        return budgets.headkv_counts(
            self.retrieval_scores.retrieval_scores, self.candidates_per_sequence(layer), layer.n_cand,
            layer.layer_idx, self.beta,
        )

    def describe(self) -> str:
        size = f"budget={self.budget}" if self.budget is not None else f"ratio={self.ratio}"
        return f"{self.name}({size}, window={self.window}, beta={self.beta})"
