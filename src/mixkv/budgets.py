"""How many candidate tokens each layer and head keeps: pure functions over small tensors.

All counts exclude the observation window (always kept on top). ``n_cand`` ``(B,)`` is the
number of real (non-padding) candidates of each sequence; ``base`` ``(B,)`` is ``budget - W``.
A sequence whose prompt fits its budget keeps every candidate (no compression). Every
function is vectorised over batch and heads: no Python loop on the hot path.
"""

from __future__ import annotations

import torch


def _expand(per_seq: torch.Tensor, num_heads: int) -> torch.Tensor:
    return per_seq[:, None].expand(per_seq.shape[0], num_heads).clone()


def uniform_counts(base: torch.Tensor, n_cand: torch.Tensor, num_heads: int) -> torch.Tensor:
    """SnapKV: every head keeps ``base`` candidates (all of them when fewer exist). ``(B, H)``."""
    return _expand(torch.minimum(base, n_cand), num_heads)


def pyramid_counts(
    base: torch.Tensor, n_cand: torch.Tensor, layer_idx: int, num_layers: int, num_heads: int,
    beta: float = 20.0,
) -> torch.Tensor:
    """PyramidKV: a linear schedule from ``max`` (bottom) to ``min`` (top), computed per prompt.

    ``min = base / beta``, ``max = 2 base - min``; when ``max`` exceeds the candidates it is
    clipped and ``min`` raised so the mean over layers stays ``base``. Counts are truncated to
    integers, as in PyramidKV's reference code; a one-layer model keeps ``base``. Recomputed
    for every prompt (the authors' code caches the first prompt's schedule: a bug when prompt
    lengths differ).
    """
    base_f = base.double()
    lo = base_f / beta
    hi = 2 * base_f - lo
    clip = hi >= n_cand.double()
    hi = torch.where(clip, n_cand.double(), hi)
    lo = torch.where(clip, 2 * base_f - hi, lo)
    if num_layers == 1:  # a one-level pyramid keeps the average
        hi = lo = base_f
    step = (hi - lo) / max(num_layers - 1, 1)
    count = torch.floor(hi - layer_idx * step + 1e-9).long()
    count = torch.minimum(count.clamp_min(0), n_cand)
    # A prompt that fits its budget is not compressed at all.
    count = torch.where(n_cand <= base, n_cand, count)
    return _expand(count, num_heads)


def adakv_counts(
    s_ext: torch.Tensor, cand_valid: torch.Tensor, base: torch.Tensor, n_cand: torch.Tensor,
    floor: float = 0.2, normalize: bool = True,
) -> torch.Tensor:
    """AdaKV: share the layer's ``base * H`` candidates among its heads by their attention mass.

    ``s_ext`` ``(B, H, C)``. Per head the scores are sorted; with ``normalize`` each head's
    sorted scores are multiplied by the fraction of its mass inside its own top ``base``;
    the top ``base * H`` over all heads are counted per head, then mixed with the uniform
    share: ``round(count * (1 - floor) + floor * base)``, clipped to the candidates.
    """
    b, h, c = s_ext.shape
    scores = s_ext.float().masked_fill(~cand_valid.expand_as(s_ext), float("-inf"))
    sorted_s, _ = scores.sort(dim=-1, descending=True)
    k = base.clamp(min=0, max=c)  # (B,)
    rank = torch.arange(c, device=s_ext.device)
    in_top = rank[None, :] < k[:, None]  # (B, C)
    finite = torch.where(torch.isfinite(sorted_s), sorted_s, torch.zeros_like(sorted_s))
    if normalize:
        total = finite.sum(dim=-1, keepdim=True)
        top_mass = (finite * in_top[:, None, :]).sum(dim=-1, keepdim=True)
        sorted_s = sorted_s * (top_mass / total.clamp_min(1e-12))
    flat = sorted_s.reshape(b, h * c)
    kmax = int((k * h).max().item()) if b > 0 else 0
    top_val, top_idx = flat.topk(min(kmax, h * c), dim=-1)
    take = (torch.arange(top_idx.shape[-1], device=s_ext.device)[None, :] < (k * h)[:, None]) & torch.isfinite(top_val)
    head = top_idx // c
    counts = torch.zeros(b, h, dtype=torch.float64, device=s_ext.device)
    counts.scatter_add_(1, head, take.double())
    mixed = torch.floor(counts * (1 - floor) + floor * base.double()[:, None] + 0.5).long()
    mixed = torch.minimum(mixed, n_cand[:, None])
    return torch.where((n_cand <= base)[:, None], n_cand[:, None].expand(b, h), mixed)


def sparsemm_counts(
    head_scores: torch.Tensor, base: torch.Tensor, n_cand: torch.Tensor, layer_idx: int,
    ratio: float = 0.1,
) -> torch.Tensor:
    """SparseMM: ``ratio * base`` for every head plus a share of the rest by visual-head score.

    ``head_scores`` ``(L, H)``: non-negative, normalised here to sum 1 over the whole model.
    Head ``(l, h)`` keeps ``ratio * base + (1 - ratio) * base * L * H * score[l, h]`` (rounded).
    """
    num_layers, h = head_scores.shape
    p = head_scores.double().clamp_min(0)
    p = p / p.sum().clamp_min(1e-12)
    share = (1 - ratio) * base.double()[:, None] * num_layers * h * p[layer_idx][None, :].to(base.device)
    counts = torch.floor(ratio * base.double()[:, None] + share + 0.5).long()
    counts = torch.minimum(counts, n_cand[:, None])
    return torch.where((n_cand <= base)[:, None], n_cand[:, None].expand_as(counts), counts)
