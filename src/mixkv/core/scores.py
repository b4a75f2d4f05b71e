"""Per-token scores for KV-cache compression: pure tensor maths, no model, no hooks.

Shapes used throughout:
  ``B`` batch, ``Hq`` query heads, ``H`` KV heads (``G = Hq // H``), ``W`` window,
  ``N`` prompt length (padded), ``C = N - W`` candidate positions, ``D`` head dim.
``valid`` is a ``(B, N)`` bool mask, False on padding, or ``(B, H, N)`` when the heads of a
sequence hold different tokens (a compressed layer re-compressed during decoding or at a new
turn: each head's held tokens, right-aligned, the rest masked). Every function treats padding as absent:
it never receives probability mass, never enters a min/max or a mean, and scores ``-inf``
where a score is used for selection (so top-k can never pick it).

The formulas are those of ``docs/method.md``, "MixKV", steps 1-6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import defaults

EPS = defaults.EPS


def head_mask(valid: torch.Tensor | None) -> torch.Tensor | None:
    """``valid`` as ``(B, 1, N)`` or ``(B, H, N)``: one shape that broadcasts against ``(B, H, N)``."""
    if valid is None or valid.dim() == 3:
        return valid
    if valid.dim() != 2:
        raise ValueError(f"valid must be (B, N) or (B, H, N) bool, got shape {tuple(valid.shape)}")
    return valid[:, None]


def window_attention(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean attention of the ``W`` window queries over all ``N`` keys, per KV head.

    ``queries`` ``(B, Hq, W, D)`` are the model's own window queries (after its RoPE);
    ``keys`` ``(B, H, N, D)`` the cached keys. Causal inside the window, softmax in float32.
    Returns ``(B, H, N)``: averaged over the window queries and over the ``G`` query heads
    of each KV head's group (GQA). Only ``W x N`` scores are built, never ``N x N``.
    """
    b, hq, w, d = queries.shape
    kb, h, n, kd = keys.shape
    if kb != b or kd != d or hq % h != 0 or w > n:
        raise ValueError(
            f"window_attention: queries {tuple(queries.shape)} and keys {tuple(keys.shape)} do not fit; "
            "expected queries (B, Hq, W, D) and keys (B, H, N, D) with Hq a multiple of H and W <= N"
        )
    g = hq // h
    q = queries.float().reshape(b, h, g * w, d)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scaling  # (B, H, G*W, N)
    logits = logits.view(b, h, g, w, n)
    # Window query i sits at position N - W + i and sees keys 0 .. N - W + i.
    causal = torch.ones(w, n, dtype=torch.bool, device=keys.device).tril(diagonal=n - w)
    mask = causal.view(1, 1, 1, w, n)
    if valid is None:
        return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).mean(dim=(2, 3))
    valid = head_mask(valid)
    hm = valid.shape[1]
    mask = mask & valid.view(b, hm, 1, 1, n)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    # A sequence shorter than the window has window queries on padding: they see nothing
    # (NaN rows) and must not count in the mean over the window.
    q_valid = valid[..., n - w :].reshape(b, hm, 1, w, 1).to(probs.dtype)
    probs = torch.nan_to_num(probs, nan=0.0) * q_valid
    return probs.sum(dim=3).mean(dim=2) / q_valid.sum(dim=3).mean(dim=2).clamp_min(1.0)


def pool_scores(scores: torch.Tensor, kernel: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """SnapKV's 1-D average pooling (stride 1, same length) over the last axis.

    Padding is counted as zero (``count_include_pad``), as in SnapKV: a lone high score is
    spread over its neighbours so that whole phrases survive, not isolated tokens.

    ``valid`` (broadcastable to ``scores``): pool over the real entries only, as if the invalid ones
    were not there. Padding inside a sequence (a later turn's left-padded segment, a head's held
    tokens around a padded segment) must not separate neighbours that are adjacent alone; the real
    entries are packed to the front, pooled, and scattered back (invalid entries come out 0).
    """
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores if valid is None else scores * valid
    if kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be odd to keep positions aligned, got {kernel}")
    if valid is None:
        return _avg_pool(scores, kernel)
    valid = valid.expand_as(scores)
    c = scores.shape[-1]
    rank = valid.long().cumsum(-1) - 1  # each real entry's place among the real ones
    dest = torch.where(valid, rank, torch.full_like(rank, c))  # invalid -> a dump slot past the end
    packed = scores.new_zeros(*scores.shape[:-1], c + 1).scatter_(-1, dest, scores * valid)
    pooled = _avg_pool(packed[..., :c], kernel)
    return pooled.gather(-1, rank.clamp_min(0)) * valid


def _avg_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    return F.avg_pool1d(flat, kernel_size=kernel, stride=1, padding=kernel // 2).reshape(shape)


def extrinsic_importance(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    window: int,
    kernel: int = defaults.KERNEL,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """SnapKV's score ``s_ext`` on the candidates: window attention, pooled. ``(B, H, C)``.

    Padding candidates come out as exactly 0 (so they do not shift means); callers mask them.
    """
    attn = window_attention(queries, keys, scaling, valid)
    n = keys.shape[-2]
    cand = None if valid is None else head_mask(valid)[..., : n - window]
    return pool_scores(attn[..., : n - window], kernel, cand)


def rank_grid(x: torch.Tensor, bits: int = defaults.RANK_BITS) -> torch.Tensor:
    """``x`` rounded to ``bits`` significant bits (each value on its own relative grid).

    Ranking on this grid makes selection robust to float noise: two scores the method computes as
    equal (a pooled peak shared by neighbours; a sequence alone vs in a padded batch, whose hidden
    states differ by ~1e-6 relative) become exact ties, which every sort here breaks by position.
    Relative, not absolute: small scores keep their order among themselves. Zero and non-finite
    values pass through unchanged.
    """
    if x.numel() == 0:
        return x
    mantissa, exponent = torch.frexp(x)
    rounded = torch.ldexp(torch.round(mantissa * 2.0**bits) * 2.0**-bits, exponent)
    return torch.where(torch.isfinite(x), rounded, x)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, dim: int = -1, keepdim: bool = True) -> torch.Tensor:
    """Mean over ``dim`` counting only entries where ``mask`` is True (all entries if None)."""
    if mask is None:
        return x.mean(dim=dim, keepdim=keepdim)
    m = mask.to(x.dtype).expand_as(x)
    return (x * m).sum(dim=dim, keepdim=keepdim) / m.sum(dim=dim, keepdim=keepdim).clamp_min(1.0)


def minmax_normalize(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = EPS) -> torch.Tensor:
    """Min-max to [0, 1] over the last axis, ignoring masked entries; a constant row gives 0, not NaN."""
    if x.shape[-1] == 0:
        return x
    if mask is None:
        lo = x.amin(dim=-1, keepdim=True)
        hi = x.amax(dim=-1, keepdim=True)
    else:
        m = mask.expand_as(x)
        lo = x.masked_fill(~m, float("inf")).amin(dim=-1, keepdim=True)
        hi = x.masked_fill(~m, float("-inf")).amax(dim=-1, keepdim=True)
        lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
        hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    out = (x - lo) / (hi - lo + eps)
    return out if mask is None else out * mask


def rescale_to(x: torch.Tensor, target_mean: torch.Tensor, mask: torch.Tensor | None = None,
               eps: float = EPS) -> torch.Tensor:
    """Rescale ``x`` so its (masked) mean equals ``target_mean``: puts different scores on one scale."""
    return x * target_mean / (masked_mean(x, mask) + eps)


def intrinsic_importance(
    values: torch.Tensor, window: int, target_mean: torch.Tensor, cand_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """VNorm score ``s_int``: candidate value norms, min-max normalised, rescaled to ``target_mean``.

    ``values`` ``(B, H, N, D)``; ``target_mean`` ``(B, H, 1)``; returns ``(B, H, C)``.
    """
    n = values.shape[-2]
    norms = values[..., : n - window, :].float().norm(dim=-1)
    return rescale_to(minmax_normalize(norms, cand_valid), target_mean, cand_valid)


def unit(states: torch.Tensor) -> torch.Tensor:
    """Unit-normalised vectors in float32 (``k / |k|``)."""
    return F.normalize(states.float(), dim=-1, eps=EPS)


def centroid_of(k_hat: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of unit vectors ``(B, H, N, D)`` over the real prompt tokens: ``(B, H, D)``."""
    if valid is None:
        return k_hat.mean(dim=-2)
    m = head_mask(valid)[..., None].to(k_hat.dtype)
    return (k_hat * m).sum(dim=-2) / m.sum(dim=-2).clamp_min(1.0)


def key_centroid(keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the unit-normalised keys over all prompt tokens: ``(B, H, D)``."""
    return centroid_of(unit(keys), valid)


def diversity_from(k_hat: torch.Tensor, centroid: torch.Tensor, window: int, target_mean: torch.Tensor,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`diversity` from precomputed unit keys and centroid (shared with redundancy)."""
    n = k_hat.shape[-2]
    raw = -torch.matmul(k_hat[..., : n - window, :], centroid[..., None]).squeeze(-1)
    cand_valid = None if valid is None else head_mask(valid)[..., : n - window]
    return rescale_to(minmax_normalize(raw, cand_valid), target_mean, cand_valid)


def diversity(
    keys: torch.Tensor, window: int, target_mean: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Diversity ``s_div``: ``-<k_i/|k_i|, c>`` on the candidates, min-max, rescaled. ``(B, H, C)``.

    A key far from the head's centroid carries information that the others do not repeat.
    """
    k_hat = unit(keys)
    return diversity_from(k_hat, centroid_of(k_hat, valid), window, target_mean, valid)


def redundancy_from(centroid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``(N|c|^2 - 1) / (N - 1)`` clamped to [0, 1]; ``count`` real tokens per row, ``(B, H)``."""
    sq = (centroid * centroid).sum(dim=-1)
    return ((count * sq - 1.0) / (count - 1.0).clamp_min(1.0)).clamp(0.0, 1.0)


def token_count(states: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Real tokens per (sequence, head), ``(B, H)`` float."""
    if valid is None:
        return torch.full(states.shape[:2], states.shape[-2], dtype=torch.float32, device=states.device)
    return head_mask(valid).sum(dim=-1).float().expand(states.shape[:2])


def redundancy(states: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Average pairwise cosine similarity of a head's vectors, in O(N): ``(N|c|^2 - 1) / (N - 1)``.

    ``states`` ``(B, H, N, D)`` (keys, or values for value redundancy). Returns ``(B, H)``
    clamped to [0, 1]; a head with a single token has redundancy 0.
    """
    return redundancy_from(key_centroid(states, valid), token_count(states, valid))


def mix(s_imp: torch.Tensor, s_div: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """MixKV's final score ``r * s_div + (1 - r) * s_imp``; ``r`` broadcast as ``(B, H, 1)``."""
    if r.dim() == s_imp.dim() - 1:
        r = r[..., None]
    return r * s_div + (1.0 - r) * s_imp


def diversity_within_groups(k_hat: torch.Tensor, groups: torch.Tensor, window: int, target_mean: torch.Tensor,
                            valid: torch.Tensor | None = None) -> torch.Tensor:
    """Diversity measured inside each token group (e.g. image vs text), ``(B, H, C)``.

    ``groups`` ``(B, N)`` bool splits the prompt in two (True / False). Each candidate's diversity is
    ``-<k_i/|k_i|, c_g>`` against the centroid ``c_g`` of its own group, min-max normalised within
    the group, then all candidates are rescaled together as in :func:`diversity_from`. Why: against
    one centroid of a prompt that is mostly image, every text token looks "diverse" simply for being
    text, and at small budgets text crowds out the image cells a question asks about; within groups,
    each modality competes for diversity only with itself. One group (a text-only prompt) gives
    exactly :func:`diversity_from`.
    """
    n = k_hat.shape[-2]
    c = n - window
    real = torch.ones(k_hat.shape[0], 1, n, dtype=torch.bool, device=k_hat.device) if valid is None \
        else head_mask(valid)
    cand_valid = real[..., :c]
    g = groups[:, None, :].to(torch.bool)
    out = torch.zeros(k_hat.shape[:2] + (c,), dtype=torch.float32, device=k_hat.device)
    for member in (g, ~g):
        mask = real & member  # (B, H or 1, N)
        raw = -torch.matmul(k_hat[..., :c, :].float(), centroid_of(k_hat, mask)[..., None].float()).squeeze(-1)
        in_group = (cand_valid & member[..., :c]).expand_as(out)
        out = torch.where(in_group, minmax_normalize(raw, in_group), out)
    return rescale_to(out, target_mean, cand_valid)

