"""The maths behind the analysis figures: pure functions, tensors in, tensors out.

Per-token key similarity, a 2-D projection of keys, which positions a plan keeps and how many
heads keep each one, and the repeated-vs-unique sentence split of a text prompt. The figures
are drawn by :mod:`mixkv.lab.analysis_figures`; :mod:`mixkv.lab.analyze` runs a model and ties
the two together.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ..core import scores
from ..core.selection import KeepPlan


def token_similarity(states: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's average cosine similarity to the head's other tokens, in O(N).

    ``states`` ``(B, H, N, D)``; returns ``(B, H, N)``: ``(N <k̂_i, c> - 1) / (N - 1)`` with ``c`` the
    mean unit vector over valid tokens (so its mean over tokens is :func:`mixkv.core.scores.redundancy`).
    Padding gets NaN.
    """
    c = scores.key_centroid(states, valid)
    k_hat = F.normalize(states.float(), dim=-1, eps=scores.EPS)
    n = states.shape[-2] if valid is None else valid.sum(-1).float()[:, None, None]
    n = torch.as_tensor(n, dtype=torch.float32, device=states.device)
    sim = (n * (k_hat * c[:, :, None, :]).sum(-1) - 1.0) / (n - 1.0).clamp_min(1.0)
    if valid is not None:
        sim = sim.masked_fill(~valid[:, None, :], float("nan"))
    return sim


def project_2d(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA to 2-D by SVD of the centred ``(N, D)`` points: ``(coords (N, 2), explained variance ratio (2,))``.

    Signs are fixed (largest loading positive) so the picture is deterministic.
    """
    x = points.float() - points.float().mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[:2]
    flip = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
    comps = comps * torch.where(flip == 0, torch.ones_like(flip), flip)
    var = s**2
    return x @ comps.T, var[:2] / var.sum().clamp_min(1e-12)


def kept_mask(plan: KeepPlan, n: int, head: int, batch_index: int = 0) -> torch.Tensor:
    """``(n,)`` bool: prompt positions one head keeps."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[plan.indices[batch_index, head, : int(plan.lengths[batch_index, head])]] = True
    return mask


def kept_share(plans: dict[int, KeepPlan], num_layers: int, n: int, layer: int | None = None,
               head: int | None = None) -> torch.Tensor:
    """``(n,)``: share of KV heads keeping each position (over all layers, one layer, or one head).

    A layer without a plan was not compressed and keeps everything.
    """
    layers = range(num_layers) if layer is None else [layer]
    any_plan = next(iter(plans.values()), None)
    num_heads = 1 if any_plan is None else any_plan.indices.shape[1]
    total = torch.zeros(n)
    count = 0
    for li in layers:
        plan = plans.get(li)
        for h in range(num_heads) if head is None else [head]:  # plotting only: a small loop over heads
            total += kept_mask(plan, n, h).float() if plan is not None else torch.ones(n)
            count += 1
    return total / max(count, 1)


_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")


def repeated_sentence_spans(text: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Character spans of sentences that occur more than once in ``text`` (filler) and of the others."""
    found = [(m.start(), m.end(), m.group().strip()) for m in _SENTENCE.finditer(text) if m.group().strip()]
    counts: dict[str, int] = {}
    for *_, s in found:
        counts[s] = counts.get(s, 0) + 1
    repeated = [(a, b) for a, b, s in found if counts[s] > 1]
    unique = [(a, b) for a, b, s in found if counts[s] == 1]
    return repeated, unique


