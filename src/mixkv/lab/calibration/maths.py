"""The maths of the head scores, as pure tensor functions (no model): testable against a direct computation.

:func:`region_argmax_hits` is the SparseMM visual-head hit, :func:`retrieval_reasoning_hits` the
HeadKV-R2 retrieval-reasoning mass, :func:`counted_steps` picks the decoded steps that count
(what each score means: :mod:`mixkv.lab.calibration`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def region_argmax_hits(queries: torch.Tensor, keys: torch.Tensor, region: torch.Tensor, answer: torch.Tensor,
                       steps: torch.Tensor | None = None) -> torch.Tensor:
    """SparseMM hits per KV head: where each query head's strongest attention over ``region`` lands.

    ``queries`` ``(B, Hq, T, D)`` (one per decoded step), ``keys`` ``(B, H, N, D)`` (the prompt),
    ``region`` / ``answer`` ``(B, N)`` bool, ``steps`` ``(B, T)`` bool (which steps count; all
    when None). The argmax of the attention weights equals the argmax of ``q . k`` (softmax is
    monotonic), so no softmax is built. Returns ``(B, H)``: hits averaged over the ``G`` query
    heads of each group and summed over the counted steps.
    """
    b, hq, t, d = queries.shape
    h = keys.shape[1]
    g = hq // h
    logits = torch.matmul(queries.float().reshape(b, h, g * t, d), keys.float().transpose(-1, -2))
    logits = logits.masked_fill(~region[:, None, None, :], float("-inf"))
    top = logits.argmax(dim=-1)  # (B, H, G*T)
    hit = answer.gather(1, top.reshape(b, -1)).reshape(b, h, g, t).float()
    if steps is not None:
        hit = hit * steps[:, None, None, :].float()
    return hit.mean(dim=2).sum(dim=-1)


def retrieval_reasoning_hits(queries: torch.Tensor, keys: torch.Tensor, answer: torch.Tensor, scaling: float,
                             steps: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """HeadKV-R2 retrieval-reasoning mass per KV head: attention on the answer among each head's top ``k``.

    ``queries`` ``(B, Hq, T, D)``: the queries of ``T`` decoding steps; step ``t`` sits at position
    ``M - T + t`` and sees keys ``0 .. M - T + t`` (causal). ``keys`` ``(B, H, M, D)``: the prompt
    followed by the generated tokens fed back. ``answer`` ``(B, M)`` bool: the answer tokens of the
    prompt (``k = answer.sum()`` per sequence). ``steps`` ``(B, T)`` bool: which steps count (all
    when None); ``valid`` ``(B, M)``: False on padding (never attended). ``scaling``: the softmax scale.

    Per step and query head: ``a = softmax(scaling * q . k)`` over the visible keys; the ``k``
    largest weights (a stable sort: ties go to the earlier position) that lie in the answer add up,
    divided by ``k``. Returns ``(B, H)``: averaged over the ``G`` query heads of each group and summed
    over the counted steps; each step adds at most 1.
    """
    b, hq, t, d = queries.shape
    h, m = keys.shape[1], keys.shape[2]
    g = hq // h
    logits = torch.matmul(queries.float().reshape(b, h, g * t, d), keys.float().transpose(-1, -2)) * scaling
    pos = torch.arange(m, device=keys.device)
    qpos = m - t + torch.arange(t, device=keys.device)
    visible = (pos[None, :] <= qpos[:, None]).repeat(g, 1)[None, None]  # (1, 1, G*T, M), row = g * T + t
    if valid is not None:
        visible = visible & valid[:, None, None, :].bool()
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    weight, order = probs.sort(dim=-1, descending=True, stable=True)
    k = answer.sum(dim=-1)  # (B,)
    in_top = torch.arange(m, device=keys.device)[None, :] < k[:, None]  # (B, M) over ranks
    on_answer = answer.gather(1, order.reshape(b, -1)).reshape(order.shape)
    mass = (weight * (in_top[:, None, None, :] & on_answer)).sum(dim=-1) / k.clamp_min(1)[:, None, None]
    mass = mass.reshape(b, h, g, t)
    if steps is not None:
        mass = mass * steps[:, None, None, :].float()
    return mass.mean(dim=2).sum(dim=-1)


def counted_steps(pieces: Sequence[str], answer_text: str | None) -> list[bool]:
    """Which decoded tokens count: their text (stripped, any case) occurs in ``answer_text``."""
    if answer_text is None:
        return [True] * len(pieces)
    target = answer_text.lower()
    return [bool(p.strip()) and p.strip().lower() in target for p in pieces]

