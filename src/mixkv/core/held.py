"""What a press re-compresses after the first prefill: a layer's held tokens as one record.

A layer is re-compressed when a later turn brings a new prompt segment longer than the window,
and (with ``press(decode_budget=...)``, see :mod:`mixkv.core.decoding`) while decoding. Either way
the method sees what the layer holds now (kept tokens, decoded tokens, the new segment) as a
:class:`~mixkv.core.layer.LayerPrefill` whose window is the last ``W`` tokens, scored by their own
queries. Heads of a compressed layer hold different tokens, so the record carries a per-head
validity mask; every head ends with the same most recent tokens (the window, decoded tokens and new
segments are in every head), and padding is moved to the left (:func:`right_align`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .cache import CompressedLayer


def held_tokens(layer, mask2d: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """``keys``, ``values`` ``(B, H, L, D)``, validity and the logical length of what ``layer`` holds.

    ``mask2d`` ``(B, T)``: the forward's 2-D attention mask over the whole conversation (None: no
    padding); a plain layer's padding is read from it. Validity is None when every token is real.
    """
    if isinstance(layer, CompressedLayer):
        keys, values, valid = layer.held_view()
        return keys, values, valid, layer.get_seq_length()
    if not isinstance(layer, DynamicLayer):
        raise TypeError(f"cannot re-compress a {type(layer).__name__}")
    keys, values = layer.keys, layer.values
    stored = keys.shape[2]
    total = int(getattr(layer, "cumulative_length", 0) or stored)
    valid = None
    if mask2d is not None and mask2d.shape[-1] == total:
        valid = mask2d[:, total - stored :].to(device=keys.device).bool()
        valid = None if bool(valid.all()) else valid
    return keys, values, valid, total


def right_align(keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None,
                positions: torch.Tensor | None = None):
    """Move each (sequence, head)'s padding slots to the left, keeping its real tokens in order.

    A later turn's padded segment leaves padding between real tokens; a record's window is its last
    ``W`` slots, and must be each sequence's last ``W`` real tokens, as alone. Returns ``keys``,
    ``values`` ``(B, H, L, D)``, ``valid`` ``(B, H, L)`` and ``positions`` permuted alike (unchanged
    when ``valid`` is None).
    """
    if valid is None:
        return keys, values, valid, positions
    b, h, n, d = keys.shape
    valid = valid[:, None].expand(b, h, n) if valid.dim() == 2 else valid
    order = torch.sort(valid.to(torch.uint8), dim=-1, stable=True).indices  # padding first, then real in order
    gather = order[..., None].expand(b, h, n, d)
    keys, values = keys.gather(2, gather), values.gather(2, gather)
    if positions is not None:
        positions = positions.gather(-1, order.to(positions.device))
    return keys, values, valid.gather(-1, order), positions


def held_positions(layer, kept: torch.Tensor | None, kept_lengths: torch.Tensor | None) -> torch.Tensor | None:
    """Logical positions ``(B, H, L)`` of the slots of :func:`held_tokens` (-1 on fill), for records.

    ``kept`` ``(B, H, K)`` / ``kept_lengths`` ``(B, H)``: the logical positions a compressed layer kept
    when it was built (its recorded plan). None when they are unknown.
    """
    if isinstance(layer, CompressedLayer):
        if kept is None:
            return None
        b, h, _ = kept.shape
        width = int(kept_lengths.max()) if kept_lengths.numel() else 0
        slots = torch.arange(width)
        fill = width - kept_lengths[..., None]  # right-aligned, as held_view lays them out
        src = (slots - fill).clamp_min(0)
        prompt = torch.where(slots >= fill, kept.gather(-1, src.clamp_max(max(kept.shape[-1] - 1, 0))),
                             torch.full_like(src, -1))
        tail = (layer.prompt_length + torch.arange(layer.decoded)).expand(b, h, layer.decoded)
        return torch.cat([prompt, tail], dim=-1)
    keys = layer.keys
    b, h, stored, _ = keys.shape
    total = int(getattr(layer, "cumulative_length", 0) or stored)
    return (total - stored + torch.arange(stored)).expand(b, h, stored)
