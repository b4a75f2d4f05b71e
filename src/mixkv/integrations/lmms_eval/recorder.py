"""Per-sample KV bytes and compression time of the ``generate`` calls an lmms-eval model makes.

lmms-eval's wrappers call ``self.model.generate(**inputs)`` on a batch and return only texts; mixkv never sees
which request a batch row belongs to. So the recorder watches the Hugging Face model itself: a forward
pre-hook notes whether a forward starts on an empty cache (a prefill) and the batch's 2-D attention mask; the
forward hook then reads the cache the prefill left behind and records one :class:`RowStats` per batch row,
in call order. The lmms-eval side (:mod:`.wrapper`) maps call order back to request order.

Decisions:

* ``kv_bytes``: bytes of this row's keys and values right after the prefill, padding excluded -- kept tokens
  per (layer, KV head) for a compressed layer, the row's real prompt tokens for an uncompressed one -- times
  ``2 * head_dim * element size``. Padding of a batch is an artefact of batching, not of the method.
* ``compress_seconds``: the batch's compression time (the press's own clock, synchronised on CUDA) split
  evenly over its rows, so the rows' shares add up to what the press measured. Compression runs once per
  batch, so a per-row time does not exist; ``batch_rows`` says how many rows shared it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ...core.cache import CompressedLayer


@dataclass
class RowStats:
    """One batch row's prefill: what its KV cache holds and its share of the compression time."""

    kv_bytes: int
    kv_bytes_full: int
    prompt_tokens: int
    compress_seconds: float
    batch_rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _element_bytes(t: torch.Tensor) -> int:
    return t.element_size()


def row_kv_bytes(cache: Any, valid_tokens: list[int]) -> list[int]:
    """Per row: bytes of keys + values the cache holds for it (padding excluded, see the module docstring)."""
    rows = len(valid_tokens)
    out = [0] * rows
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, CompressedLayer):
            per_row = layer.kept_lengths.sum(-1).tolist()  # (B,) kept (token, head) pairs
            unit = 2 * layer.head_dim * torch.finfo(layer.dtype).bits // 8
            for b in range(rows):
                out[b] += int(per_row[b]) * unit
            continue
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0:
            continue
        _, heads, stored, dim = keys.shape
        unit = 2 * heads * dim * _element_bytes(keys)
        for b in range(rows):
            out[b] += min(valid_tokens[b], stored) * unit
    return out


def full_kv_bytes(cache: Any, valid_tokens: list[int]) -> list[int]:
    """Per row: what an uncompressed cache of the same layers would hold for the row's real prompt tokens."""
    rows = len(valid_tokens)
    out = [0] * rows
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, CompressedLayer):
            heads, dim, elem = layer.num_heads, layer.head_dim, torch.finfo(layer.dtype).bits // 8
        else:
            keys = getattr(layer, "keys", None)
            if keys is None or keys.numel() == 0:
                continue
            _, heads, _, dim = keys.shape
            elem = _element_bytes(keys)
        for b in range(rows):
            out[b] += valid_tokens[b] * 2 * heads * dim * elem
    return out


@dataclass
class PrefillRecorder:
    """Hooks on a model that append one :class:`RowStats` per row of every prefill to :attr:`rows`.

    ``session`` is the active :class:`mixkv.core.press.PressSession` (None for the full cache); its stats are
    reset by the press at every prefill, so after a prefill they hold that batch's compression time.
    """

    model: nn.Module
    session: Any = None
    rows: list[RowStats] = field(default_factory=list)
    _handles: list = field(default_factory=list)
    _pending: dict[str, Any] | None = None

    def __enter__(self) -> PrefillRecorder:
        self._handles.append(self.model.register_forward_pre_hook(self._pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._post, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @staticmethod
    def _cache_of(kwargs: dict[str, Any], output: Any = None) -> Any:
        if output is not None:
            for name in ("cache", "past_key_values"):
                cache = getattr(output, name, None)
                if cache is not None:
                    return cache
            return None
        return kwargs.get("cache", kwargs.get("past_key_values"))

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        cache = self._cache_of(kwargs)
        empty = cache is None or not hasattr(cache, "get_seq_length") or cache.get_seq_length() == 0
        if not empty:
            self._pending = None
            return
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        new = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
        if not isinstance(new, torch.Tensor) or new.dim() < 2:
            self._pending = None
            return
        rows, length = new.shape[0], new.shape[1]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == rows:
            valid = [int(v) for v in mask.sum(-1).tolist()]
        else:
            valid = [length] * rows
        self._pending = {"valid": valid}

    def _post(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        cache = self._cache_of(kwargs, output)
        if cache is None:
            return
        valid = pending["valid"]
        kept = row_kv_bytes(cache, valid)
        full = full_kv_bytes(cache, valid)
        seconds = float(self.session.stats.compress_seconds) if self.session is not None else 0.0
        n = len(valid)
        for b in range(n):
            self.rows.append(RowStats(kv_bytes=kept[b], kv_bytes_full=full[b], prompt_tokens=valid[b],
                                      compress_seconds=seconds / n, batch_rows=n))


def order_rows(rows: list[RowStats], perms: list[list[int]], n: int) -> list[RowStats] | None:
    """Rows (generation order) in request order, or None when that mapping is not certain.

    ``perms``: what ``Collator.get_original`` did during the call, as ``get_original(range(n))`` (see
    :mod:`.wrapper`): position ``i`` of the original order holds generated row ``perm[i]``. No reordering seen
    and one row per request: generation order is request order. Anything else (several reorderings, rows
    that are not one per request) gives None, so that no number is attributed to the wrong sample.
    """
    if len(rows) != n:
        return None
    if not perms:
        return list(rows)
    if len(perms) == 1 and len(perms[0]) == n:
        return [rows[j] for j in perms[0]]
    return None
