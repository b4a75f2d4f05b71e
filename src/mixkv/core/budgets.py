"""How many candidate tokens each layer and head keeps: pure functions over small tensors.

All counts exclude the observation window (always kept on top). ``n_cand`` ``(B,)`` is the
number of real (non-padding) candidates of each sequence; ``cand_budget`` ``(B,)`` is
``budget - W``, the candidates a head keeps on average. A sequence whose prompt fits its budget
keeps every candidate (no compression). Every function is vectorised over batch and heads.

Head-adaptive allocations (AdaKV, SparseMM, HeadKV) keep *exactly* the total they were asked for: their
fractional shares are turned into integers by largest-remainder apportionment (floor every
share, then one more token to the largest remainders, ties to the lower head index), and a head
capped at its candidates hands its excess to the others. Rounding each head on its own, as the
papers' code does, can keep up to ``H / 2`` tokens more or fewer than the budget per layer.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from . import defaults
from .scores import rank_grid


def _expand(per_seq: torch.Tensor, num_heads: int) -> torch.Tensor:
    return per_seq[:, None].expand(per_seq.shape[0], num_heads).clone()


def apportion(share: torch.Tensor, total: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """Integers close to ``share`` ``(B, K)`` that sum to ``total`` ``(B,)``, each at most ``cap``
    (``(B,)``, or ``(B, K)`` per entry).

    Shares above the cap are cut and the excess is spread over the uncapped entries in proportion
    to their shares (water-filling); then largest-remainder rounding with ties to the lower index.
    When the caps sum to less than ``total``, every entry gets its cap.
    """
    b, k = share.shape
    share = share.double().clamp_min(0)
    capf = (cap.double()[:, None] if cap.dim() == 1 else cap.double()).expand(b, k)
    totalf = total.double()
    x = torch.minimum(share, capf)
    for _ in range(k):  # at most K rounds: each caps at least one more entry
        deficit = (totalf - x.sum(-1)).clamp_min(0)
        free = x < capf
        if not bool(((deficit > 1e-9) & free.any(-1)).any()):
            break
        w = torch.where(free, share, torch.zeros_like(share))
        w = torch.where(w.sum(-1, keepdim=True) > 0, w, free.double())  # all-zero shares: spread evenly
        x = torch.minimum(x + deficit[:, None] * w / w.sum(-1, keepdim=True).clamp_min(1e-300), capf)
    return _largest_remainder(x, total, capf)


def _largest_remainder(x: torch.Tensor, total: torch.Tensor, capf: torch.Tensor,
                       remainder: torch.Tensor | None = None) -> torch.Tensor:
    floor = torch.floor(x + 1e-9)
    # Remainders on a 1e-9 grid: shares that tie exactly (say 0.5 and 6.5) but carry rounding errors of
    # opposite sign still tie, and go to the lower index as exact arithmetic says.
    rem = torch.round((x - floor) * 1e9) if remainder is None else remainder
    need = (total.double() - floor.sum(-1)).round().long().clamp_min(0)
    rem = torch.where(floor < capf, rem.double(), torch.full_like(floor, float("-inf")))
    order = rem.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
    extra = (rank < need[:, None]) & (floor < capf)
    return floor.long() + extra.long()


def uniform_counts(cand_budget: torch.Tensor, n_cand: torch.Tensor, num_heads: int) -> torch.Tensor:
    """SnapKV: every head keeps ``cand_budget`` candidates (all of them when fewer exist). ``(B, H)``."""
    return _expand(torch.minimum(cand_budget, n_cand), num_heads)


def pyramid_counts(
    cand_budget: torch.Tensor, n_cand: torch.Tensor, layer_idx: int, num_layers: int, num_heads: int,
    beta: float = defaults.PYRAMID_BETA, integer_steps: bool = False,
) -> torch.Tensor:
    """PyramidKV: a linear schedule from ``max`` (bottom) to ``min`` (top), computed per prompt.

    ``min = base / beta``, ``max = 2 base - min`` (``base = cand_budget``); when ``max`` exceeds
    the candidates it is clipped and ``min`` raised so the mean over layers stays ``base``.
    ``min``, ``max`` and the step ``(max - min) / (L - 1)`` stay real numbers; only each layer's
    count ``floor(max - layer_idx * step)`` is truncated, so the layers never keep more than
    ``L * base`` in total (less than one token per layer short of it). PyramidKV's reference code
    (and the MixKV authors') rounds ``min`` and the step down to integers first and so overspends:
    30 layers, budget 64 (``base`` 32) keep ``63 - 2 l`` there, 15..5 in the top six layers and 34
    per head on average, against 12..1 and 31.5 here; ``integer_steps=True`` gives that schedule
    (``PyramidKV(schedule="authors")``), to compare with the paper's numbers. A one-layer model keeps
    ``base``. Recomputed for every prompt (the authors' code caches the first prompt's schedule: a bug
    when prompt lengths differ).
    """
    base_f = cand_budget.double()
    lo = torch.floor(base_f / beta) if integer_steps else base_f / beta
    hi = 2 * base_f - lo
    clip = hi >= n_cand.double()
    hi = torch.where(clip, n_cand.double(), hi)
    lo = torch.where(clip, 2 * base_f - hi, lo)
    if num_layers == 1:  # a one-level pyramid keeps the average
        hi = lo = base_f
    step = (hi - lo) / max(num_layers - 1, 1)
    if integer_steps:
        step = torch.floor(step)
    count = torch.floor(hi - layer_idx * step + 1e-9).long()
    count = torch.minimum(count.clamp_min(0), n_cand)
    # A prompt that fits its budget is not compressed at all.
    count = torch.where(n_cand <= cand_budget, n_cand, count)
    return _expand(count, num_heads)


def adakv_counts(
    s_ext: torch.Tensor, cand_valid: torch.Tensor, cand_budget: torch.Tensor, n_cand: torch.Tensor,
    floor: float = defaults.ADAKV_FLOOR, normalize: bool = True, head_cap: torch.Tensor | None = None,
) -> torch.Tensor:
    """AdaKV: share the layer's ``base * H`` candidates among its heads by their attention mass.

    ``s_ext`` ``(B, H, C)``; ``base = cand_budget``. Per head the scores are sorted; with
    ``normalize`` each head's sorted scores are multiplied by the fraction of its mass inside its
    own top ``base``; the top ``base * H`` over all heads (ties: lower head, then higher rank) are
    counted per head, then mixed with the uniform share, ``count * (1 - floor) + floor * base``,
    and apportioned to integers summing to exactly ``base * H``. ``head_cap`` ``(B, H)``: the
    candidates each head holds when they differ by head (re-compression); a capped head passes its
    excess on. Default: ``n_cand`` for every head.
    """
    b, h, c = s_ext.shape
    scores = s_ext.float().masked_fill(~cand_valid.expand_as(s_ext), float("-inf"))
    sorted_s, _ = scores.sort(dim=-1, descending=True)
    k = cand_budget.clamp(min=0, max=c)  # (B,)
    rank = torch.arange(c, device=s_ext.device)
    in_top = rank[None, :] < k[:, None]  # (B, C)
    finite = torch.where(torch.isfinite(sorted_s), sorted_s, torch.zeros_like(sorted_s))
    if normalize:
        total = finite.sum(dim=-1, keepdim=True)
        top_mass = (finite * in_top[:, None, :]).sum(dim=-1, keepdim=True)
        sorted_s = sorted_s * (top_mass / total.clamp_min(1e-12))
    flat = sorted_s.reshape(b, h * c)
    # Heads are compared with each other on one grid per sequence: float noise cannot reorder them.
    flat = rank_grid(flat)
    kmax = int((k * h).max().item()) if b > 0 else 0
    order = flat.sort(dim=-1, descending=True, stable=True)
    top_val, top_idx = order.values[:, :kmax], order.indices[:, :kmax]
    take = (torch.arange(kmax, device=s_ext.device)[None, :] < (k * h)[:, None]) & torch.isfinite(top_val)
    head = top_idx // c
    counts = torch.zeros(b, h, dtype=torch.long, device=s_ext.device)
    counts.scatter_add_(1, head, take.long())
    # Exact integer arithmetic for the mix: floor = p / q, share * q = count (q - p) + p base.
    frac = Fraction(str(float(floor))).limit_denominator(10**6)
    p, q = frac.numerator, frac.denominator
    scaled = counts * (q - p) + p * k[:, None]  # (B, H), share times q
    share = torch.div(scaled, q, rounding_mode="floor").double()
    cap = n_cand[:, None].expand(b, h) if head_cap is None else torch.minimum(head_cap, n_cand[:, None])
    if head_cap is None:
        mixed = _largest_remainder(share, k * h, cap.double(), remainder=(scaled % q).double())
    else:  # heads hold different numbers of candidates: spread a capped head's excess (water-filling)
        mixed = apportion(scaled.double() / q, k * h, cap)
    mixed = torch.minimum(mixed, cap)
    return torch.where((n_cand <= cand_budget)[:, None], n_cand[:, None].expand(b, h), mixed)


def _global_pool_counts(
    scores: torch.Tensor, cand_budget: torch.Tensor, n_cand: torch.Tensor, layer_idx: int, uniform: float,
    what: str,
) -> torch.Tensor:
    """``uniform * base`` for every head plus a model-wide pool shared by ``scores`` ``(L, H)``.

    Head ``(l, h)`` gets ``uniform * base + (1 - uniform) * base * L * H * p[l, h]`` with ``p`` the
    scores normalised to sum 1 over the whole model; the model's ``base * L * H`` is apportioned
    exactly (heads capped at their candidates pass the excess on); layer ``layer_idx``'s row, ``(B, H)``.
    """
    num_layers, h = scores.shape
    p = scores.double().clamp_min(0).to(cand_budget.device)
    if not float(p.sum()) > 0:
        raise ValueError(f"{what} are all zero; the profile says nothing about which heads to favour")
    p = (p / p.sum()).reshape(1, num_layers * h)
    base = cand_budget.double()[:, None]
    share = uniform * base + (1 - uniform) * base * num_layers * h * p
    cap = torch.maximum(n_cand, cand_budget)  # sequences that fit are overridden below
    counts = apportion(share, cand_budget * num_layers * h, cap).view(-1, num_layers, h)[:, layer_idx]
    counts = torch.minimum(counts, n_cand[:, None])
    return torch.where((n_cand <= cand_budget)[:, None], n_cand[:, None].expand_as(counts), counts)


def sparsemm_counts(
    head_scores: torch.Tensor, cand_budget: torch.Tensor, n_cand: torch.Tensor, layer_idx: int,
    ratio: float = defaults.SPARSEMM_RATIO,
) -> torch.Tensor:
    """SparseMM: ``ratio * base`` for every head plus a share of the rest by visual-head score.

    ``head_scores`` ``(L, H)``: non-negative, not all zero, normalised here to sum 1 over the
    whole model. Head ``(l, h)`` gets ``ratio * base + (1 - ratio) * base * L * H * score[l, h]``;
    the whole model's ``base * L * H`` is apportioned exactly (heads capped at their candidates
    pass the excess on), and layer ``layer_idx``'s row is returned, ``(B, H)``.
    """
    return _global_pool_counts(head_scores, cand_budget, n_cand, layer_idx, ratio, "SparseMM: head_scores")


def headkv_counts(
    retrieval_scores: torch.Tensor, cand_budget: torch.Tensor, n_cand: torch.Tensor, layer_idx: int,
    beta: float = defaults.HEADKV_BETA,
) -> torch.Tensor:
    """HeadKV: every head gives ``base / beta`` to a pool shared by the whole model by importance.

    ``retrieval_scores`` ``(L, H)``: non-negative, not all zero, normalised here to sum 1 over the
    whole model (``p``). Head ``(l, h)`` keeps ``base - base / beta`` of its own and gets
    ``p[l, h]`` of the pool ``base / beta * L * H``. The model's ``base * L * H`` is apportioned
    exactly (heads capped at their candidates pass the excess on); layer ``layer_idx``'s row,
    ``(B, H)``. A prompt that fits its budget keeps every candidate.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 1:
        raise ValueError(f"HeadKV: beta must be a number >= 1 (each head pools base / beta), got {beta!r}")
    return _global_pool_counts(retrieval_scores, cand_budget, n_cand, layer_idx, 1.0 - 1.0 / float(beta),
                               "HeadKV: retrieval_scores")
