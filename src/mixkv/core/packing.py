"""How a head-adaptive layer lays out its kept prompt tokens: chunk regions plus a small remainder.

Heads that keep different numbers of tokens cannot share a dense ``(B, H, L, D)`` tensor without
padding, and padding is exactly the memory we set out to free. So the kept tokens of all
``S = B * H`` (sequence, KV head) segments are packed in one ``(T, D)`` buffer, in regions:

* **chunk regions**, one per chunk size ``c`` (largest first): each segment's next
  ``floor(len / c)`` full chunks of ``c`` tokens, segment after segment. A region is a zero-copy
  ``(chunks, c, D)`` view, and every chunk belongs to one segment, so decode attention over it is
  one fused kernel call with the chunks as the batch: work proportional to the tokens held.
* **the remainder**: each segment's last ``< c_min`` tokens, attended in one call with a
  block-diagonal mask (small: at most ``S * (c_min - 1)`` tokens).

Per-chunk results are merged per segment by their log-sum-exp. Nothing is padded: the buffer
holds exactly the kept tokens; the index tensors are a few bytes per chunk. Small layers skip the
chunk regions (one masked call is cheaper than several calls there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK_SIZES = (128, 16)
"""Chunk sizes of the regions, largest first: big chunks for long heads, small ones for the rest."""

INLINE_MAX_SEGMENTS = 8
"""A small layer with at most this many (sequence x head) segments also packs its decoded tokens, so
one masked call covers prompt and decoded tokens (the mask's work grows with ``S``, hence the bound)."""

SMALL_LAYER = 1 << 14
"""Below ``S * T`` of this, everything goes to the remainder: one masked kernel call costs less
than one call per region there (measured with ``mixkv bench --micro``)."""


@dataclass
class Region:
    """One chunk region of the packed buffer: ``flat[start : start + chunks * size]``.

    ``cu`` ``(S + 1,)``: where each segment's chunks start inside the region (like
    flash-attention's ``cu_seqlens``); ``max_len`` the longest segment there (for varlen kernels).
    """

    start: int
    size: int
    chunk_seg: torch.Tensor  # (chunks,) long: the segment of each chunk
    cu: torch.Tensor
    max_len: int

    @property
    def chunks(self) -> int:
        return self.chunk_seg.shape[0]

    @property
    def end(self) -> int:
        return self.start + self.chunks * self.size


@dataclass
class Packing:
    """Where each segment's tokens sit in the packed buffer (see the module docstring)."""

    regions: list[Region]
    rem_start: int
    rem_seg: torch.Tensor  # (R,) int32: the segment of each remainder token
    has_rem: torch.Tensor  # (S,) bool: the segment has remainder tokens
    rem_cu: torch.Tensor  # (S + 1,) long: where each segment's remainder starts in the remainder
    rem_max: int
    row_seg: torch.Tensor  # (chunks of all regions + 2 S,) long: segment of each partial result row
    num_segments: int

    def index_bytes(self) -> int:
        tensors = [self.rem_seg, self.has_rem, self.row_seg, self.rem_cu]
        tensors += [t for r in self.regions for t in (r.chunk_seg, r.cu)]
        return sum(t.numel() * t.element_size() for t in tensors)


def plan_packing(lengths: torch.Tensor, chunk_sizes: tuple[int, ...] | None = None,
                 small_layer: int | None = None) -> tuple[torch.Tensor, Packing]:
    """The packed layout for segments of ``lengths`` ``(S,)`` tokens, given segment after segment.

    Returns ``order`` ``(T,)`` (packed position -> index into the segment-after-segment tokens;
    needed once, to pack) and the :class:`Packing`. Built once per layer after prefill (a few
    host syncs there, none when decoding).
    """
    chunk_sizes = CHUNK_SIZES if chunk_sizes is None else chunk_sizes
    small_layer = SMALL_LAYER if small_layer is None else small_layer
    lengths = lengths.reshape(-1).long()
    s = lengths.shape[0]
    device = lengths.device
    total = int(lengths.sum())
    seg_start = torch.zeros(s, dtype=torch.long, device=device)
    seg_start[1:] = lengths.cumsum(0)[:-1]
    sizes = () if s * total < small_layer else tuple(sorted(chunk_sizes, reverse=True))
    pieces: list[torch.Tensor] = []
    regions: list[Region] = []
    used = torch.zeros_like(lengths)  # tokens of each segment already placed
    start = 0
    for size in sizes:
        n = torch.div(lengths - used, size, rounding_mode="floor")
        count = int(n.sum())
        if count == 0:
            continue
        chunk_seg = torch.repeat_interleave(torch.arange(s, device=device), n, output_size=count)
        # Token j of chunk i: segment start + tokens used before this region + its rank in the segment.
        first = torch.zeros(s, dtype=torch.long, device=device)
        first[1:] = n.cumsum(0)[:-1]
        rank = torch.arange(count, device=device) - first[chunk_seg]
        base = seg_start[chunk_seg] + used[chunk_seg] + rank * size
        pieces.append((base[:, None] + torch.arange(size, device=device)).reshape(-1))
        regions.append(Region(start, size, chunk_seg, _cu(n * size), int(n.max()) * size))
        start += count * size
        used = used + n * size
    rem_len = lengths - used
    r = int(rem_len.sum())
    rem_seg = torch.repeat_interleave(torch.arange(s, device=device), rem_len, output_size=r)
    rem_first = torch.zeros(s, dtype=torch.long, device=device)
    rem_first[1:] = rem_len.cumsum(0)[:-1]
    rank = torch.arange(r, device=device) - rem_first[rem_seg]
    pieces.append(seg_start[rem_seg] + used[rem_seg] + rank)
    rem_seg = rem_seg.to(torch.int32)
    order = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)
    # Partial results come as: one row per chunk of each region, one per segment for the remainder,
    # one per segment for the decoded tail.
    segs = torch.arange(s, device=device)
    row_seg = torch.cat([*(reg.chunk_seg for reg in regions), segs, segs])
    return order, Packing(regions, start, rem_seg, rem_len > 0, _cu(rem_len), int(rem_len.max()) if s else 0,
                   row_seg, s)


def _cu(counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(counts.shape[0] + 1, dtype=torch.long, device=counts.device)
    out[1:] = counts.cumsum(0)
    return out
