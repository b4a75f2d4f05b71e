"""Turn a method's per-head counts and scores into kept positions: one batched selection per layer.

Selection is deterministic and padding-invariant: exact score ties are broken by position
(earlier first), through a stable sort, so a sequence keeps the same tokens alone and inside a
left-padded batch, and the same tokens on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layer import LayerPrefill
from .scores import rank_grid


@dataclass
class KeepPlan:
    """Kept positions of one layer.

    ``indices`` ``(B, H, L)`` ascending positions into the prompt; entries past ``lengths``
    ``(B, H)`` are filler (set to 0) and must be ignored. The window is included.
    """

    indices: torch.Tensor
    lengths: torch.Tensor

    @property
    def uniform(self) -> bool:
        """True when every (sequence, head) keeps the same number of tokens."""
        return bool((self.lengths == self.lengths.flatten()[0]).all()) if self.lengths.numel() else True

    def valid(self) -> torch.Tensor:
        """``(B, H, L)`` True on real entries of ``indices``."""
        steps = torch.arange(self.indices.shape[-1], device=self.indices.device)
        return steps < self.lengths[..., None]


def select_topk(
    score: torch.Tensor, counts: torch.Tensor, cand_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``counts[b, h]`` candidates of each head by ``score``; padding is never picked.

    Returns ascending positions ``(B, H, K)`` (filler past the count) and the valid mask.
    """
    b, h, c = score.shape
    counts = torch.minimum(counts, cand_valid.sum(-1).expand(b, h))
    kmax = int(counts.max().item()) if counts.numel() else 0
    if kmax == 0:
        empty = torch.zeros(b, h, 0, dtype=torch.long, device=score.device)
        return empty, empty.bool()
    valid = cand_valid.expand(b, h, c)
    # Float noise must not reorder equal scores (see rank_grid); NaN would make the order undefined: lowest.
    s = rank_grid(score.float()).masked_fill(~valid, float("-inf"))
    s = torch.nan_to_num(s, nan=float("-inf"))
    # A stable descending sort breaks exact ties by position; top-k's tie order is unspecified.
    idx = s.sort(dim=-1, descending=True, stable=True).indices[..., :kmax]
    keep = torch.arange(kmax, device=score.device) < counts[..., None]
    # Sort the chosen positions ascending; filler goes to the end.
    big = torch.iinfo(torch.long).max
    idx = torch.where(keep, idx, torch.full_like(idx, big)).sort(dim=-1).values
    return torch.where(keep, idx, torch.zeros_like(idx)), keep


def plan_keep(method, layer: LayerPrefill) -> KeepPlan:
    """Positions one layer keeps under ``method``: top candidates per head plus the window."""
    b, h, n, _ = layer.keys.shape
    w = layer.window
    counts = method.allocate(layer)
    _check_counts(method, counts, (b, h))
    score = method.score(layer)
    if tuple(score.shape) != (b, h, layer.num_candidates):
        raise ValueError(f"{method.name}: score must have shape (B, H, C) = {(b, h, layer.num_candidates)}, "
                         f"got {tuple(score.shape)}")
    idx, keep = select_topk(score, counts, layer.cand_valid)
    counts = keep.sum(-1)
    window_pos = torch.arange(n - w, n, device=layer.keys.device).expand(b, h, w)
    # Short sequences in a padded batch: window positions that are padding are not kept.
    window_ok = layer.token_mask[..., n - w:].expand(b, h, w)
    k = idx.shape[-1]
    total = counts + window_ok.sum(-1)
    lmax = k + w
    # Place the window right after each head's own candidates.
    slots = torch.arange(lmax, device=layer.keys.device)
    indices = torch.zeros(b, h, lmax, dtype=torch.long, device=layer.keys.device)
    indices[..., :k] = idx
    # Window token j of head (b, h) goes to slot counts[b, h] + (j - n_pad_in_window).
    pad_in_window = (~window_ok).sum(-1, keepdim=True)
    dest = counts[..., None] + torch.arange(w, device=layer.keys.device) - pad_in_window
    dest = torch.where(window_ok, dest, torch.full_like(dest, lmax))  # out of range -> dropped below
    scratch = torch.zeros(b, h, lmax + 1, dtype=torch.long, device=layer.keys.device)
    scratch[..., :lmax] = indices
    scratch.scatter_(-1, dest, window_pos)
    indices = scratch[..., :lmax]
    indices = torch.where(slots < total[..., None], indices, torch.zeros_like(indices))
    trim = int(total.max().item()) if total.numel() else 0
    return KeepPlan(indices=indices[..., :trim], lengths=total)


def _check_counts(method, counts: torch.Tensor, shape: tuple[int, int]) -> None:
    """A method's allocation must be ``(B, H)`` non-negative integers: say which method broke it."""
    if tuple(counts.shape) != shape or counts.dtype.is_floating_point or bool((counts < 0).any()):
        raise ValueError(f"{method.name}: allocate must return (B, H) = {shape} non-negative integer counts, "
                         f"got {tuple(counts.shape)} {counts.dtype}")
