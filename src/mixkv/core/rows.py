"""Per-sequence decisions for a batch: each row is re-compressed exactly when it would be alone.

A layer of a batch is one tensor, but whether a sequence is compressed must not depend on the
other rows: a later turn's segment is compressed only in rows whose own segment is longer than
the window, and (``press(decode_budget=...)``) a row is re-scored while decoding only when its own
tokens crossed its own thresholds. Rows not chosen keep every token they hold (:func:`rows_plan`).

:class:`RowClock` is the host-side bookkeeping for that: per row, tokens appended since the row was
last re-scored and tokens held per head. It is updated with Python ints (no device sync per step).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .layer import LayerPrefill
from .selection import KeepPlan


@dataclass
class RowClock:
    """Per row of one cache layer: ``since`` tokens appended since it was last re-scored (all its
    tokens if it never was), ``held`` tokens it holds per KV head on average (real tokens only)."""

    since: list[int]
    held: list[float]

    @classmethod
    def fresh(cls, real: list[int]) -> RowClock:
        """A layer nothing was cut from: each row holds its ``real`` tokens, all of them new."""
        return cls(list(real), [float(n) for n in real])

    def add(self, real: list[int] | int) -> None:
        """Count appended real tokens (an int: the same for every row, as when decoding)."""
        per_row = [real] * len(self.since) if isinstance(real, int) else real
        self.since = [s + n for s, n in zip(self.since, per_row)]
        self.held = [h + n for h, n in zip(self.held, per_row)]

    def due(self, every: int, budget: int) -> list[int]:
        """Rows that got ``every`` tokens since they were last re-scored and hold more than ``budget``."""
        return [r for r, (s, h) in enumerate(zip(self.since, self.held)) if s >= every and h > budget]

    def rebuilt(self, held: list[float], cut: list[int], tried: list[int] | None = None) -> RowClock:
        """The clock of the layer rebuilt from this one: rows in ``cut`` (and ``tried``: re-scored while
        decoding, cut or not) start counting again; ``held`` is what each row holds now."""
        reset = set(cut) | set(tried or ())
        return RowClock([0 if r in reset else s for r, s in enumerate(self.since)], list(held))


def real_counts(valid: torch.Tensor | None, batch: int, length: int) -> list[int]:
    """Real tokens per row of a ``(B, L)`` validity mask (all ``length`` when None): one host sync."""
    if valid is None:
        return [length] * batch
    return [int(n) for n in valid.sum(-1).tolist()]


def select_rows(record: LayerPrefill, rows: list[int]) -> LayerPrefill:
    """The record of ``rows`` only (every batched field sliced; scores are computed per row anyway)."""
    index = torch.tensor(rows, device=record.keys.device, dtype=torch.long)

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, index.to(t.device))

    return dataclasses.replace(
        record, queries=take(record.queries), keys=take(record.keys), values=take(record.values),
        valid=take(record.valid), image_mask=take(record.image_mask), real_length=take(record.real_length),
    )


def keep_all_plan(record: LayerPrefill) -> KeepPlan:
    """Every real token of every row and head, in order: what a row that is not compressed keeps."""
    b, h, n, _ = record.keys.shape
    keep = record.token_mask.expand(b, h, n)
    lengths = keep.sum(-1)
    positions = torch.arange(n, device=keep.device).expand(b, h, n)
    order = torch.where(keep, positions, torch.full_like(positions, n)).sort(-1).values
    width = int(lengths.max()) if lengths.numel() else 0
    order = order[..., :width]
    return KeepPlan(torch.where(order < n, order, torch.zeros_like(order)), lengths)


def merge_rows(base: KeepPlan, rows: list[int], part: KeepPlan) -> KeepPlan:
    """``base`` with the plans of ``rows`` replaced by ``part`` (one row of ``part`` per entry of ``rows``)."""
    width = max(base.indices.shape[-1], part.indices.shape[-1])
    indices = _widen(base.indices, width).clone()
    lengths = base.lengths.clone()
    index = torch.tensor(rows, device=indices.device, dtype=torch.long)
    indices[index] = _widen(part.indices, width)
    lengths[index] = part.lengths
    # As wide as the longest kept row, no more: a uniform plan's layer stores every column as a token.
    return KeepPlan(indices[..., : int(lengths.max()) if lengths.numel() else 0], lengths)


def _widen(indices: torch.Tensor, width: int) -> torch.Tensor:
    pad = width - indices.shape[-1]
    return indices if pad == 0 else torch.nn.functional.pad(indices, (0, pad))
