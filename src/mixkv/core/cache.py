"""A cache layer that holds only the kept tokens, for uniform and head-adaptive budgets alike.

Two parts:

* ``flat``: the prompt tokens kept by a head-adaptive method, packed in one ``(T, D)`` buffer
  in chunk regions plus a small remainder (:mod:`mixkv.core.packing`), so decode attention does
  work proportional to the tokens each head holds. It is written once, after prefill, with no
  padding: bytes equal the kept tokens exactly. ``None`` when every head keeps the same number
  of tokens.
* ``tail``: a dense ``(B, H, capacity, D)`` buffer that grows geometrically (amortised O(1)
  per decoded token, no copy of the layer per step). With a uniform budget it also holds the
  kept prompt tokens, so decoding runs the model's own attention kernel on a plain view.

The layer reports the *logical* length (prompt length + decoded tokens), never the stored one:
transformers derives decoded tokens' positions from it, and they must stay ``N, N+1, ...``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers.cache_utils import CacheLayerMixin

from .packing import INLINE_MAX_SEGMENTS, Packing, plan_packing
from .selection import KeepPlan

MIN_GROWTH = 16


class CacheOwner(Protocol):
    """What a compressed layer asks of the press that made it (:class:`mixkv.core.press.PressSession`)."""

    active: bool  # False once its `with` block is left: extending the cache then is an error
    decode_budget: int | None  # set: reordering the batch is refused (the query rings cannot follow)


class CompressedLayer(CacheLayerMixin):
    """One decoder layer's compressed KV cache (see the module docstring)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, plan: KeepPlan, prompt_length: int,
                 owner: CacheOwner | None = None):
        super().__init__()
        b, h, _, d = keys.shape
        self.device = keys.device
        self.dtype = keys.dtype
        self.batch_size, self.num_heads, self.head_dim = b, h, d
        self.prompt_length = int(prompt_length)  # logical length when this layer was built
        self.decoded = 0  # tokens appended since (decoded, or a new turn's tokens)
        self.owner = owner  # the press session; decoding outside it would be silently wrong
        self._expected_valid: torch.Tensor | None = None  # (B, q), see expect()
        self._tail_valid: torch.Tensor | None = None  # (B, capacity) once a padding token was appended
        gather = plan.indices[..., None].expand(b, h, plan.indices.shape[-1], d)
        k_sel = keys.gather(2, gather)
        v_sel = values.gather(2, gather)
        self.packing: Packing | None = None
        self._rem_masks: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._inline_rows: dict[int, torch.Tensor] = {}
        self._flat_k = self._flat_v = self._col_seg = None
        self.flat_len = 0
        self.inline = False
        if plan.uniform:
            self._tail_k, self._tail_v = k_sel.contiguous(), v_sel.contiguous()
            self.tail_len = k_sel.shape[2]
        else:
            valid = plan.valid()
            order, self.packing = plan_packing(plan.lengths.reshape(-1))
            self._flat_k = k_sel[valid][order].contiguous()  # (T, D), see mixkv.core.packing
            self._flat_v = v_sel[valid][order].contiguous()
            self.flat_len = self._flat_k.shape[0]
            # A small layer of few heads keeps its decoded tokens in the packed buffer too: one masked
            # attention call per step instead of three and a merge (see mixkv.core.packing).
            self.inline = not self.packing.regions and self.packing.num_segments <= INLINE_MAX_SEGMENTS
            if self.inline:  # the packed tokens' segments move to col_seg (int16), which grows with decoding
                self._col_seg = self.packing.rem_seg.to(torch.int16)
                self.packing.rem_seg = self.packing.rem_seg[:0]
            self._tail_k = keys.new_empty(b, h, 0, d)
            self._tail_v = values.new_empty(b, h, 0, d)
            self.tail_len = 0
        self.kept_lengths = plan.lengths.clone()  # (B, H) prompt tokens kept per head
        # The longest sequence's mean tokens per head when built (one host sync here, none per step):
        # what the press compares with its decode budget.
        self.kept_mean_max = float(plan.lengths.sum(-1).max()) / h if plan.lengths.numel() else 0.0
        self._sync_views()
        self.is_initialized = True

    # ---- storage -------------------------------------------------------------------------
    @property
    def is_flat(self) -> bool:
        return self._flat_k is not None

    @property
    def flat_k(self) -> torch.Tensor | None:
        """``(T, D)``: the packed tokens (prompt tokens, and decoded ones for an inline layer)."""
        return None if self._flat_k is None else self._flat_k[: self.flat_len]

    @property
    def flat_v(self) -> torch.Tensor | None:
        return None if self._flat_v is None else self._flat_v[: self.flat_len]

    @property
    def col_seg(self) -> torch.Tensor:
        """Inline layers: ``(T,)`` int16, the segment (sequence x head) of each packed token."""
        return self._col_seg[: self.flat_len]

    def inline_rows(self, rows_per_segment: int) -> torch.Tensor:
        """Inline layers: ``(S * rows,)`` int16, the segment of each query row (made once per row count)."""
        rows = self._inline_rows.get(rows_per_segment)
        if rows is None:
            segs = torch.arange(self.batch_size * self.num_heads, device=self.device, dtype=torch.int16)
            rows = self._inline_rows[rows_per_segment] = segs.repeat_interleave(rows_per_segment)
        return rows

    def _append_inline(self, key_states: torch.Tensor, value_states: torch.Tensor,
                       valid: torch.Tensor | None) -> None:
        """Append decoded tokens to the packed buffer, segment-major (geometric growth, no copy per step).

        A padding token (``valid`` False) of segment ``s`` is stored with segment ``-s - 1``: no query
        row matches it, so it is never attended, and it keeps its slot for re-compression.
        """
        b, h, q, d = key_states.shape
        extra = b * h * q
        cap = self._flat_k.shape[0]
        if self.flat_len + extra > cap:
            new_cap = max(self.flat_len + extra, cap + max(MIN_GROWTH * b * h, cap // 4))
            for name in ("_flat_k", "_flat_v", "_col_seg"):
                old = getattr(self, name)
                new = old.new_empty(new_cap, *old.shape[1:])
                new[: self.flat_len] = old[: self.flat_len]
                setattr(self, name, new)
        end = self.flat_len + extra
        self._flat_k[self.flat_len : end] = key_states.reshape(extra, d)
        self._flat_v[self.flat_len : end] = value_states.reshape(extra, d)
        segs = torch.arange(b * h, device=self.device, dtype=torch.int16)
        segs = segs.repeat_interleave(q) if q > 1 else segs
        if valid is not None:
            real = valid.to(self.device).bool()[:, None, :].expand(b, h, q).reshape(-1)
            segs = torch.where(real, segs, -segs - 1)
        self._col_seg[self.flat_len : end] = segs
        self.flat_len = end

    def remainder_mask(self, rows_per_segment: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive ``(1, 1, S * rows, R)`` mask letting each segment's query rows see only its remainder
        tokens, and ``(1, S * rows)`` True on rows of segments without any.

        Kept for the next steps when it costs at most 1% of the packed tokens' bytes (large layers,
        whose remainder is under ``S * 16`` tokens); rebuilt each step otherwise (small layers).
        """
        key = (rows_per_segment, dtype)
        cached = self._rem_masks.get(key)
        if cached is None:
            p = self.packing
            seg_rows = torch.arange(p.num_segments, device=self.device).repeat_interleave(rows_per_segment)
            mask = torch.zeros(seg_rows.shape[0], p.rem_seg.shape[0], dtype=dtype, device=self.device)
            mask.masked_fill_(seg_rows[:, None] != p.rem_seg[None, :], float("-inf"))
            blind = (~p.has_rem).repeat_interleave(rows_per_segment)[None]
            cached = (mask[None, None], blind)
            if mask.numel() * mask.element_size() <= 0.01 * 2 * self.flat_k.numel() * self.flat_k.element_size():
                self._rem_masks[key] = cached
        return cached

    def _sync_views(self) -> None:
        self.keys = self._tail_k[:, :, : self.tail_len]
        self.values = self._tail_v[:, :, : self.tail_len]

    @property
    def tail_valid(self) -> torch.Tensor | None:
        """``(B, tail_len)`` False on padding tokens of a later, padded turn; None when there are none."""
        return None if self._tail_valid is None else self._tail_valid[:, : self.tail_len]

    def _note_tail_valid(self, valid: torch.Tensor | None, q: int) -> None:
        if valid is None and self._tail_valid is None:
            return
        if self._tail_valid is None or self._tail_valid.shape[1] < self._tail_k.shape[2]:
            grown = torch.ones(self.batch_size, self._tail_k.shape[2], dtype=torch.bool, device=self.device)
            if self._tail_valid is not None:
                grown[:, : self._tail_valid.shape[1]] = self._tail_valid
            self._tail_valid = grown
        new = True if valid is None else valid.to(self.device).bool()
        self._tail_valid[:, self.tail_len - q : self.tail_len] = new

    def held_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every token the layer holds, per head in time order and right-aligned: ``keys`` and
        ``values`` ``(B, H, L, D)`` and their validity (``(B, L)`` or ``(B, H, L)``; None if all real).

        Heads that hold fewer tokens are filled on the left (invalid), so the last slots are the most
        recent tokens in every head: what re-compression needs as its window. A copy of the layer,
        made once per re-compression (never per decoding step).
        """
        b, h, d = self.batch_size, self.num_heads, self.head_dim
        if not self.is_flat:
            return self.keys, self.values, self.tail_valid
        s = b * h
        if self.inline:
            seg = self.col_seg.long()
            real = seg >= 0
            seg = torch.where(real, seg, -seg - 1)
            order = seg.sort(stable=True).indices  # per segment, in time order
            seg_sorted = seg[order]
            counts = torch.bincount(seg, minlength=s)
            keys_src, values_src, real_src = self.flat_k[order], self.flat_v[order], real[order]
        else:
            counts = self.kept_lengths.reshape(-1).long()
            order, _ = plan_packing(counts)
            keys_src = torch.empty_like(self.flat_k)
            values_src = torch.empty_like(self.flat_v)
            keys_src[order] = self.flat_k  # segment after segment again
            values_src[order] = self.flat_v
            seg_sorted = torch.repeat_interleave(torch.arange(s, device=self.device), counts)
            real_src = None
        length = int(counts.max()) if s else 0
        start = counts.cumsum(0) - counts
        rank = torch.arange(seg_sorted.shape[0], device=self.device) - start[seg_sorted]
        slot = length - counts[seg_sorted] + rank
        keys = self.flat_k.new_zeros(s, length, d)
        values = self.flat_v.new_zeros(s, length, d)
        valid = torch.zeros(s, length, dtype=torch.bool, device=self.device)
        keys[seg_sorted, slot] = keys_src
        values[seg_sorted, slot] = values_src
        valid[seg_sorted, slot] = True if real_src is None else real_src
        keys, values, valid = keys.view(b, h, length, d), values.view(b, h, length, d), valid.view(b, h, length)
        if self.tail_len:
            tail_valid = self.tail_valid
            tail_valid = torch.ones(b, h, self.tail_len, dtype=torch.bool, device=self.device) if tail_valid is None \
                else tail_valid[:, None].expand(b, h, self.tail_len)
            keys = torch.cat([keys, self.keys], dim=2)
            values = torch.cat([values, self.values], dim=2)
            valid = torch.cat([valid, tail_valid], dim=2)
        return keys, values, valid

    def held_mean_max(self) -> float:
        """Tokens per head the longest sequence holds on average (host arithmetic, no sync)."""
        return self.kept_mean_max + self.decoded

    def _reserve(self, extra: int) -> None:
        cap = self._tail_k.shape[2]
        need = self.tail_len + extra
        if need <= cap:
            return
        new_cap = max(need, cap + max(MIN_GROWTH, cap // 4))
        b, h, _, d = self._tail_k.shape
        for name in ("_tail_k", "_tail_v"):
            old = getattr(self, name)
            new = old.new_empty(b, h, new_cap, d)
            new[:, :, : self.tail_len] = old[:, :, : self.tail_len]
            setattr(self, name, new)

    def expect(self, valid: torch.Tensor | None) -> None:
        """Validity ``(B, q)`` of the tokens the next :meth:`update` appends (None: all real).

        transformers calls ``update(keys, values)`` from inside the attention module, with no room for
        a mask, so the press says it here, right before that forward's update.
        """
        self._expected_valid = valid

    # ---- CacheLayerMixin API -----------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("CompressedLayer is built from a filled layer; it is never lazily initialised")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new tokens (one per head when decoding); returns the dense tail views."""
        if self.owner is not None and not self.owner.active:
            raise RuntimeError(
                "this KV cache was compressed by mixkv.press and can only be extended inside that press "
                "(its keys are a subset of the prompt; plain attention would read the wrong positions)"
            )
        if key_states.shape[0] != self.batch_size or key_states.shape[1] != self.num_heads:
            raise ValueError(
                f"compressed cache holds batch {self.batch_size} x {self.num_heads} KV heads, "
                f"got new states of shape {tuple(key_states.shape)}"
            )
        q = key_states.shape[2]
        valid, self._expected_valid = self._expected_valid, None
        if valid is not None and tuple(valid.shape) != (self.batch_size, q):
            raise ValueError(
                f"validity of new tokens must be (B, q) = {(self.batch_size, q)}, got {tuple(valid.shape)}"
            )
        if self.inline:
            self._append_inline(key_states, value_states, valid)
            self.decoded += q
            return self.keys, self.values
        self._reserve(q)
        self._tail_k[:, :, self.tail_len : self.tail_len + q] = key_states
        self._tail_v[:, :, self.tail_len : self.tail_len + q] = value_states
        self.tail_len += q
        self.decoded += q
        self._note_tail_valid(valid, q)
        self._sync_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.prompt_length + self.decoded

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise RuntimeError("a compressed cache cannot be reset for reuse; start generation with a new cache")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a compressed cache cannot be cropped: assisted / speculative decoding is not supported under mixkv.press"
        )

    def _dense_only(self, what: str) -> None:
        if self.owner is not None and getattr(self.owner, "decode_budget", None) is not None:
            raise NotImplementedError(
                f"{what} is not supported with press(decode_budget=...): the press's recent queries cannot "
                "follow reordered sequences; use greedy or sampling generation, or no decode_budget"
            )
        if self.is_flat:
            raise NotImplementedError(
                f"{what} is not supported on a head-adaptive (variable-length) compressed cache; "
                "use greedy or sampling generation, or a uniform method (snapkv, pyramidkv)"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._dense_only("beam search")
        self._tail_k = self._tail_k.index_select(0, beam_idx.to(self.device))
        self._tail_v = self._tail_v.index_select(0, beam_idx.to(self.device))
        self.kept_lengths = self.kept_lengths.index_select(0, beam_idx.to(self.device))
        if self._tail_valid is not None:
            self._tail_valid = self._tail_valid.index_select(0, beam_idx.to(self.device))
        self._sync_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._dense_only("expanding the batch (num_return_sequences / beams)")
        self._tail_k = self._tail_k.repeat_interleave(repeats, dim=0)
        self._tail_v = self._tail_v.repeat_interleave(repeats, dim=0)
        self.kept_lengths = self.kept_lengths.repeat_interleave(repeats, dim=0)
        if self._tail_valid is not None:
            self._tail_valid = self._tail_valid.repeat_interleave(repeats, dim=0)
        self.batch_size *= repeats
        self._sync_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._dense_only("selecting batch entries")
        self._tail_k = self._tail_k[indices]
        self._tail_v = self._tail_v[indices]
        self.kept_lengths = self.kept_lengths[indices]
        if self._tail_valid is not None:
            self._tail_valid = self._tail_valid[indices]
        self.batch_size = self._tail_k.shape[0]
        self._sync_views()

    def offload(self):  # pragma: no cover - offloading is a GPU-memory feature we do not combine with
        raise NotImplementedError("cache offloading is not supported together with mixkv compression")

    def prefetch(self):  # pragma: no cover
        return None

    # ---- accounting ----------------------------------------------------------------------
    def tokens_held(self) -> int:
        """Key/value vectors stored (all sequences and heads), prompt and decoded."""
        flat = self.flat_len
        return flat + self.batch_size * self.num_heads * self.tail_len

    def kv_bytes(self) -> int:
        """Bytes of the stored keys and values (used part)."""
        return 2 * self.tokens_held() * self.head_dim * torch.finfo(self.dtype).bits // 8

    def allocated_bytes(self) -> int:
        """Bytes actually allocated, including the tail's spare capacity and index metadata."""
        elem = torch.finfo(self.dtype).bits // 8
        total = 2 * self._tail_k.numel() * elem
        if self._flat_k is not None:
            total += 2 * self._flat_k.numel() * elem + self.packing.index_bytes()
            if self._col_seg is not None:
                total += self._col_seg.numel() * self._col_seg.element_size()
            total += sum(t.numel() * t.element_size() for pair in self._rem_masks.values() for t in pair)
            total += sum(t.numel() * t.element_size() for t in self._inline_rows.values())
        return total

    def __repr__(self) -> str:
        kind = "flat" if self.is_flat else "dense"
        mean = self.kept_lengths.float().mean().item()
        return f"CompressedLayer({kind}, kept={mean:.1f}/head, decoded={self.decoded})"

