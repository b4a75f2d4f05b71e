"""Pure helpers of the vLLM checks (``scripts/vllm_vlm_check.py``): comparing replies and kept positions,
agreement per task, OpenAI chat requests with images. No vLLM import, so the default environment tests them.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Sequence

import torch

from mixkv.core import defaults


def until_eos(tokens: Sequence[int], eos: Iterable[int]) -> list[int]:
    """The tokens up to and including the first end-of-sequence token (both engines stop there)."""
    stop = set(eos)
    for i, t in enumerate(tokens):
        if t in stop:
            return list(tokens[: i + 1])
    return list(tokens)


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (the shorter length when one is a prefix of the other); None: equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def kept_agreement(ours: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor]) -> float:
    """Share of ``theirs``' kept positions that ``ours`` kept too, over prompts, layers and KV heads.

    Each element is one prompt's kept positions ``(L, H, B)``; negative entries are filler (per-head methods keep
    different numbers per head, padded with -1). NaN when there is nothing to compare.
    """
    same = total = 0
    for a, b in zip(ours, theirs):
        if a.shape[:2] != b.shape[:2]:
            raise ValueError(f"kept positions of different layouts: {tuple(a.shape)} vs {tuple(b.shape)}")
        for layer in range(b.shape[0]):
            for head in range(b.shape[1]):
                x, y = _kept(a[layer, head]), _kept(b[layer, head])
                same += len(x & y)
                total += len(y)
    return same / total if total else float("nan")


def _kept(positions: torch.Tensor) -> set[int]:
    """A head's kept positions without filler (negative entries)."""
    return {p for p in positions.tolist() if p >= 0}


def agreement_by_task(rows: Sequence[dict]) -> dict[str, dict]:
    """Per task and over all rows: count, exact reply matches and each engine's mean score.

    ``rows``: ``{"task", "reply_a", "reply_b", "score_a", "score_b"}`` (a and b: the two engines).
    """
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["task"], []).append(r)
    if rows:
        groups["all"] = list(rows)
    out = {}
    for task, sel in groups.items():
        n = len(sel)
        same = sum(r["reply_a"] == r["reply_b"] for r in sel)
        out[task] = {"n": n, "exact_match": same, "exact_match_pct": 100.0 * same / n,
                     "score_a": sum(r["score_a"] for r in sel) / n, "score_b": sum(r["score_b"] for r in sel) / n}
    return out


def png_data_url(image) -> str:
    """A PIL image as an OpenAI ``image_url`` data URL (PNG: lossless, so the server decodes the same pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chat_content(text: str, images: Sequence = ()) -> list[dict] | str:
    """A user message's content: the images first (PIL images or URLs), then the text; the text alone without images."""
    if not images:
        return text
    parts = [{"type": "image_url", "image_url": {"url": im if isinstance(im, str) else png_data_url(im)}}
             for im in images]
    return parts + [{"type": "text", "text": text}]


def chat_request(model: str, text: str, images: Sequence = (), max_tokens: int = 16, **extra) -> dict:
    """A greedy ``/v1/chat/completions`` body with one user message (``extra``: more fields, e.g. vLLM's)."""
    return {"model": model, "messages": [{"role": "user", "content": chat_content(text, images)}],
            "max_tokens": max_tokens, "temperature": 0.0, **extra}


def kept_differences(scores: Sequence[torch.Tensor], ours: torch.Tensor, theirs: torch.Tensor) -> list[dict]:
    """Where two engines kept different positions of one prompt, and how close the swapped tokens' scores are.

    ``scores[l]``: the method's candidate scores ``(H, C)`` of layer ``l`` as one engine computed them (candidate
    ``c`` is prompt position ``c``); ``ours`` / ``theirs``: kept positions ``(L, H, B)``. One entry per differing
    (layer, head): the positions only one side kept, their scores, and ``relative_gap``, the largest
    ``|s_ours - s_theirs| / max(|s_ours|, |s_theirs|)`` over the swapped pairs (paired in score order). A gap far
    below selection's rank grid (``2 ** -RANK_BITS`` relative) means a near-tie that float noise between the
    engines decided, not a different choice.
    """
    out = []
    for layer in range(theirs.shape[0]):
        for head in range(theirs.shape[1]):
            a, b = _kept(ours[layer, head]), _kept(theirs[layer, head])
            if a == b:
                continue
            row = scores[layer][head]

            def s(p: int, row=row) -> float:  # a position past the candidates (the window) has no score
                return float(row[p]) if p < row.shape[0] else float("nan")

            only_a = sorted(a - b, key=lambda p: -s(p))
            only_b = sorted(b - a, key=lambda p: -s(p))
            gaps = [abs(s(x) - s(y)) / max(abs(s(x)), abs(s(y)), 1e-30) for x, y in zip(only_a, only_b)]
            paired = gaps and len(only_a) == len(only_b) and all(g == g for g in gaps)  # g == g: not NaN
            swapped = only_a + only_b
            out.append({"layer": layer, "head": head, "only_ours": only_a, "only_theirs": only_b,
                        "scores_ours": [s(p) for p in only_a], "scores_theirs": [s(p) for p in only_b],
                        "relative_gap": max(gaps) if paired else float("inf"),
                        "grid_steps_ours": [grid_step(s(p)) for p in only_a],
                        "grid_steps_theirs": [grid_step(s(p)) for p in only_b],
                        "boundary_distance": min((boundary_distance(s(p)) for p in swapped), default=float("nan"))})
    return out


def grid_step(x: float, bits: int = defaults.RANK_BITS) -> int | None:
    """The integer mantissa selection ranks ``x`` by (``x`` rounded to ``bits`` significant bits is
    ``grid_step * 2 ** (exponent - bits)``); None for zero or a non-finite ``x``."""
    if x == 0 or not math.isfinite(x):
        return None
    mantissa, _ = math.frexp(x)
    return round(mantissa * 2**bits)


def boundary_distance(x: float, bits: int = defaults.RANK_BITS) -> float:
    """How far ``x`` is from the nearest rounding boundary of the rank grid, relative to ``x``: a relative
    change of this size moves ``x`` to the next grid step (and can tie or untie it with a neighbour)."""
    if x == 0 or not math.isfinite(x):
        return float("nan")
    mantissa, _ = math.frexp(abs(x))
    u = mantissa * 2**bits
    return abs(u - math.floor(u) - 0.5) / u


def is_near_tie(difference: dict, noise: float = 1e-5) -> bool:
    """True when one :func:`kept_differences` entry is a tie float noise can decide: the swapped tokens pair up
    on the same or adjacent steps of the rank grid, and one of them lies within ``noise`` (relative) of a
    rounding boundary, so a change of that size between engines ties or unties them (ties go to the earlier
    position)."""
    ours, theirs = difference["grid_steps_ours"], difference["grid_steps_theirs"]
    if not ours or len(ours) != len(theirs) or None in ours or None in theirs:
        return False
    adjacent = all(abs(a - b) <= 1 for a, b in zip(ours, theirs))
    return adjacent and difference["boundary_distance"] <= noise
