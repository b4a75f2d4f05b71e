"""Where attention and kept tokens fall in a generated text prompt: pure maths on regions.

Why: SnapKV keeps the tokens that the prompt's last ``W`` queries attend to. Splitting a prompt into
regions (chat template and instruction, filler, the numeric facts, the answer's digits, the question)
and measuring, per layer, how much attention each region gets per token -- from the window queries
(what SnapKV sees) and from the query that writes the answer (what the model needs) -- shows whether
the window's attention points at the answer at all. :mod:`scripts.why_snapkv` runs the model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..core import scores
from .calibration.sources import char_spans_to_mask

REGIONS = ("template", "filler", "facts", "answer", "question")
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")


def text_region_spans(text: str, message: str, answers: Sequence[str]) -> dict[str, list[tuple[int, int]]]:
    """Character spans of each region of ``text`` (the full model input) whose user message is ``message``.

    ``template``: everything before the message and its first paragraph (chat template, system prompt, the
    task's instruction); ``question``: the message's last paragraph and the template after it; ``facts``:
    sentences of the body with a digit (the asked fact and its distractors), less the answer; ``answer``:
    the first occurrence of each answer value inside a fact; ``filler``: the rest of the body.
    """
    start = text.index(message)
    end = start + len(message)
    body_start = message.find("\n\n")
    body_start = start + (body_start + 2 if body_start >= 0 else 0)
    q = message.rfind("\n\n")
    question_start = start + q if q >= 0 and start + q >= body_start else end
    facts, answer = [], []
    for m in _SENTENCE.finditer(text, body_start, question_start):
        if any(ch.isdigit() for ch in m.group()):
            facts.append((m.start(), m.end()))
    for value in answers:
        for a, b in facts:
            at = text.find(value, a, b)
            if at >= 0:
                answer.append((at, at + len(value)))
                break
    return {"template": [(0, body_start)], "question": [(question_start, len(text))], "facts": facts,
            "answer": answer, "filler": [(body_start, question_start)]}


def region_masks(offsets: Sequence[tuple[int, int]],
                 spans: dict[str, list[tuple[int, int]]]) -> dict[str, torch.Tensor]:
    """``(N,)`` masks, one per region, disjoint: answer before facts before template/question before filler."""
    taken = torch.zeros(len(offsets), dtype=torch.bool)
    masks = {}
    for name in ("answer", "facts", "template", "question", "filler"):
        m = char_spans_to_mask(offsets, spans.get(name, [])) & ~taken
        masks[name] = m
        taken |= m
    return {name: masks[name] for name in REGIONS}


def mass_per_token(attention: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attention per token of each region, ``(H,)`` per region, from ``attention`` ``(H, N)`` (rows sum to 1).

    Per token, so regions of very different sizes compare: a region the queries ignore scores about as
    a filler token does; the attention sink (the first tokens) is in ``template``.
    """
    out = {}
    for name, m in masks.items():
        count = int(m[: attention.shape[-1]].sum())
        out[name] = attention[:, : m.shape[0]][:, m].sum(-1) / count if count else torch.full(
            attention.shape[:1], float("nan"))
    return out


def query_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Mean attention of the last ``W`` positions' queries over ``keys``, per KV head: ``(H, N)``.

    ``queries`` ``(1, Hq, W, D)`` must be the last ``W`` positions of the ``N`` keys (causal).
    """
    return scores.window_attention(queries, keys, scaling)[0]


def kept_per_region(kept_share: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per region: ``kept`` (share of its tokens' (layer, head) slots kept) and ``budget`` (share of all kept
    slots spent on it)."""
    total = float(kept_share.sum()) or 1.0
    return {name: {"kept": float(kept_share[m].mean()) if bool(m.any()) else float("nan"),
                   "budget": float(kept_share[m].sum()) / total} for name, m in masks.items()}
