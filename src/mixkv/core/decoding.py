"""Compression while decoding (``press(decode_budget=..., every=...)``): what to re-score, and when.

Each layer keeps its last ``W`` queries in a :class:`QueryRing` (written in place, no copy per
step). Each sequence of a batch keeps its own counts in a :class:`RowClock`: tokens appended since it
was last re-scored (all its tokens if it never was) and tokens it holds per head, in host ints (no
device sync per step). A row is re-scored when its own counts cross ``every`` and ``decode_budget``,
so it is re-compressed at the same steps alone and in a batch; the :class:`DecodeTracker` holds both
for a press and answers "which rows of this layer are due".
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from . import defaults
from .cache import CompressedLayer
from .layer import LayerPrefill
from .methods.base import Method
from .selection import KeepPlan


class QueryRing:
    """The last ``window`` queries ``(B, Hq, ., D)`` one layer saw, oldest first when read.

    Rows count their own queries: a padded push (a later turn's left-padded segment) adds only each
    row's real queries, so a row's ring holds what it would hold alone.
    """

    def __init__(self, window: int):
        self.window = window
        self.buffer: torch.Tensor | None = None
        self.pointer = 0
        self.counts: list[int] = []
        self.scaling = 1.0

    def push(self, query: torch.Tensor, scaling: float, real: list[int] | None = None) -> None:
        """Add ``query`` ``(B, Hq, q, D)``; ``real``: real (right-aligned) queries per row, None if all are."""
        b, hq, q, d = query.shape
        w = self.window
        self.scaling = float(scaling)
        if self.buffer is None or self.buffer.shape[:2] != (b, hq) or self.buffer.shape[-1] != d:
            self.buffer = query.new_zeros(b, hq, w, d)
            self.pointer, self.counts = 0, [0] * b
        if real is not None and any(n != q for n in real):
            self._push_padded(query, real)
            return
        self.counts = [min(w, c + q) for c in self.counts]
        if q >= w:
            self.buffer.copy_(query[:, :, -w:])
            self.pointer = 0
            return
        end = self.pointer + q
        if end <= w:  # the usual decoding step: one slice copy, no index tensor
            self.buffer[:, :, self.pointer : end] = query
        else:
            slots = (self.pointer + torch.arange(q, device=query.device)) % w
            self.buffer[:, :, slots] = query
        self.pointer = end % w

    def _push_padded(self, query: torch.Tensor, real: list[int]) -> None:
        """Row ``r`` keeps the last ``W`` of (its ring, its last ``real[r]`` queries): one gather."""
        b, hq, q, d = query.shape
        w = self.window
        joined = torch.cat([torch.roll(self.buffer, shifts=-self.pointer, dims=2), query], dim=2)  # (B, Hq, W+q, D)
        take = torch.tensor([min(n, w) for n in real], device=query.device)[:, None]
        j = torch.arange(w, device=query.device)[None, :]
        # Slot j: ring slot j + n while the ring still has a share, else the new queries' slot q + j.
        src = torch.where(j < w - take, j + take, q + j)  # (B, W)
        self.buffer = joined.gather(2, src[:, None, :, None].expand(b, hq, w, d))
        self.pointer = 0
        self.counts = [min(w, c + n) for c, n in zip(self.counts, real)]

    def ready(self, row: int) -> bool:
        """Row ``row`` has seen ``W`` queries (its part of :meth:`ordered` is real)."""
        return bool(self.counts) and self.counts[row] >= self.window

    def ordered(self) -> torch.Tensor | None:
        """``(B, Hq, W, D)`` oldest first, or None before any row saw ``W`` queries (see :meth:`ready`)."""
        if self.buffer is None or not self.counts or max(self.counts) < self.window:
            return None
        return torch.roll(self.buffer, shifts=-self.pointer, dims=2)


@dataclass
class RowClock:
    """Per row of one cache layer: ``since`` tokens appended since it was last re-scored (all its
    tokens if it never was), ``held`` tokens it holds per KV head on average (real tokens only)."""

    since: list[int]
    held: list[float]

    @classmethod
    def fresh(cls, real: list) -> RowClock:
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

    def restart(self, rows: list[int]) -> None:
        """``rows`` were re-scored (cut or found to fit): they count again from zero."""
        self.since = [0 if r in rows else s for r, s in enumerate(self.since)]


def real_counts(valid: torch.Tensor | None, batch: int, length: int) -> list[int]:
    """Real tokens per row of a ``(B, L)`` validity mask (all ``length`` when None): one host sync."""
    if valid is None:
        return [length] * batch
    return [int(n) for n in valid.sum(-1).tolist()]


def row_tokens(record: LayerPrefill, per_head: bool = True) -> list:
    """Real tokens of each row of ``record``: per head on average (``per_head``), or over all heads."""
    b, h, n, _ = record.keys.shape
    total = record.token_mask.expand(b, h, n).sum((1, 2))
    return (total.float() / h).tolist() if per_head else total.tolist()


class DecodeTracker:
    """A press's decode-time state: each layer's :class:`QueryRing`, each cache layer's :class:`RowClock`
    (weakly keyed: never keeps a layer alive)."""

    def __init__(self, window: int, decode_budget: int, every: int):
        self.window, self.decode_budget, self.every = window, decode_budget, every
        self.rings: dict[int, QueryRing] = {}
        self.clocks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def new_prompt(self) -> None:
        self.rings.clear()

    def clear(self) -> None:
        self.rings.clear()
        self.clocks = weakref.WeakKeyDictionary()

    def push(self, idx: int, query: torch.Tensor, scaling: float, real: list[int] | None = None) -> None:
        ring = self.rings.get(idx)
        if ring is None:
            ring = self.rings[idx] = QueryRing(self.window)
        ring.push(query.detach(), scaling, real)

    def track(self, layer, mask: torch.Tensor | None, new_count: int) -> None:
        """Before a forward appends to ``layer``: make sure it has a clock (a plain layer nothing was cut
        from, or a compressed one built elsewhere). ``mask``: the forward's 2-D attention mask."""
        if layer in self.clocks:
            return
        if isinstance(layer, CompressedLayer):
            held = (layer.kept_lengths.sum(-1).float() / layer.num_heads).tolist()
            self.clocks[layer] = RowClock([layer.decoded] * layer.batch_size, [x + layer.decoded for x in held])
            return
        if not isinstance(layer, DynamicLayer):
            return
        b, stored = layer.keys.shape[0], layer.keys.shape[2]
        total = int(getattr(layer, "cumulative_length", 0) or stored)
        valid = mask[:, total - stored : total] if mask is not None and mask.shape[-1] == total + new_count else None
        self.clocks[layer] = RowClock.fresh(real_counts(valid, b, stored))

    def appended(self, layer, real: list[int] | int) -> None:
        self.clocks[layer].add(real)

    def due(self, idx: int, layer, skip: set[int] = frozenset()) -> list[int]:
        """Rows of ``layer`` (layer ``idx``) to re-score now: due by their counts, their queries seen."""
        clock, ring = self.clocks.get(layer), self.rings.get(idx)
        if clock is None or ring is None:
            return []
        return [r for r in clock.due(self.every, self.decode_budget) if r not in skip and ring.ready(r)]

    def carry(self, clock: RowClock, new, plan: KeepPlan, record: LayerPrefill, tried: list[int] | None) -> None:
        """``new`` was built from ``record`` with ``plan``: rows cut (and ``tried``) count again from zero."""
        h = plan.lengths.shape[1]
        kept = plan.lengths.sum(-1).tolist()
        cut = [r for r, (k, n) in enumerate(zip(kept, row_tokens(record, per_head=False))) if k < n]
        moved = RowClock(list(clock.since), [k / h for k in kept])
        moved.restart(cut + list(tried or ()))
        self.clocks[new] = moved

    def ring_bytes(self) -> int:
        return sum(r.buffer.numel() * r.buffer.element_size() for r in self.rings.values() if r.buffer is not None)


def check_decode_options(method: Method | None, decode_budget, every) -> tuple[int | None, int | None]:
    """Validate ``press(decode_budget=, every=)``; returns them with ``every``'s default filled in."""
    if decode_budget is None:
        if every is not None:
            raise ValueError("every= only applies with decode_budget=... (tokens per head kept while decoding)")
        return None, None
    if method is None:
        raise ValueError("decode_budget= needs a compression method (not 'full' or a capture)")
    whole = isinstance(decode_budget, int) and not isinstance(decode_budget, bool)
    if not whole or not method.window < decode_budget <= 2**31:
        raise ValueError(
            f"decode_budget must be an int larger than the window ({method.window}): tokens kept per KV head "
            f"while decoding, window included; got {decode_budget!r}"
        )
    every = defaults.DECODE_EVERY if every is None else every
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(
            f"every must be a positive int (re-compress at most once per `every` new tokens), got {every!r}"
        )
    return decode_budget, every


