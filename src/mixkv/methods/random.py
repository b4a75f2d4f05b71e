"""Random eviction: the floor every real method must beat (seeded, reproducible)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import budgets
from .base import BudgetedMethod, LayerContext


@dataclass
class RandomKV(BudgetedMethod):
    """Uniform budget, candidates chosen uniformly at random (seed fixed per layer)."""

    seed: int = 0
    name = "random"

    def allocate(self, ctx: LayerContext) -> torch.Tensor:
        return budgets.uniform_counts(self.base_per_sequence(ctx), ctx.n_cand, ctx.keys.shape[1])

    def score(self, ctx: LayerContext) -> torch.Tensor:
        b, h, _, _ = ctx.keys.shape
        gen = torch.Generator().manual_seed(self.seed * 100003 + ctx.layer_idx)
        return torch.rand(b, h, ctx.num_candidates, generator=gen).to(ctx.keys.device)
