"""Random eviction: the floor every real method must beat (seeded, reproducible)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import budgets
from ..layer import LayerPrefill
from .base import Allocation, BudgetedMethod


@dataclass
class RandomKV(BudgetedMethod):
    """Uniform budget, candidates chosen uniformly at random.

    Parameters: ``budget`` / ``ratio``, ``window`` as for every base; ``seed`` (default 0).
    The draw of a sequence depends only on the seed, the layer and that sequence's own tokens,
    so a sequence keeps the same positions alone and in a left-padded batch.
    """

    seed: int = 0
    name = "random"
    allocation = Allocation.UNIFORM
    keeps_full_budget = True  # exact apportionment (or the same count) in every head: budget x L x H

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"RandomKV: seed must be an int in [0, 2**32), got {self.seed!r}")

    def allocate(self, layer: LayerPrefill) -> torch.Tensor:
        return budgets.uniform_counts(self.candidates_per_sequence(layer), layer.n_cand, layer.num_kv_heads)

    def score(self, layer: LayerPrefill) -> torch.Tensor:
        b, h, _, _ = layer.keys.shape
        c = layer.num_candidates
        device = layer.keys.device
        # Rank among the real tokens (the position in the real prompt at a first prefill): the same
        # alone and inside a padded batch.
        rel = layer.token_mask[..., :c].long().cumsum(-1) - 1  # (B, 1 or H, C)
        heads = torch.arange(h, device=device)[None, :, None]
        draw = hash_uniform(self.seed, layer.layer_idx, heads, rel)
        return draw.masked_fill(~layer.cand_valid.expand(b, h, c), float("-inf"))


_MASK = (1 << 62) - 1


def hash_uniform(seed: int, layer: int, head: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Deterministic uniform numbers in [0, 1) from ``(seed, layer, head, pos)`` (a splitmix-style hash).

    A pure function of its arguments: no generator state, the same on every device and for any
    batch composition, which makes random eviction padding-invariant and reproducible.
    """
    x = (pos.long() * 0x9E3779B1 + head.long() * 0x85EBCA77 + (layer * 0xC2B2AE3D + seed * 0x27D4EB2F)) & _MASK
    for mult in (0xBF58476D1CE4E5B9 & _MASK, 0x94D049BB133111EB & _MASK):
        x = (x ^ (x >> 31)) & _MASK
        x = (x * (mult & 0x7FFFFFFF)) & _MASK
    x = x ^ (x >> 29)
    return (x & ((1 << 53) - 1)).double().div(float(1 << 53)).float()
