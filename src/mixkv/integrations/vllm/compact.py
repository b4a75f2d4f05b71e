"""Compress one request's cache in place: score each layer, gather the kept tokens into its first slots.

Pure torch on the engine's cache tensors (no vLLM import), so a test can run it on random caches.
Per layer: read the prompt's keys and values from the request's blocks, ask
:func:`.selection.kept_positions` which positions each head keeps, read the tokens computed after the
prompt (a resumed request recomputes its outputs in the same step), then write kept tokens to held
slots ``0 .. budget - 1`` and the later ones right after. Every read of a layer finishes before its
first write, so overwriting the first blocks is safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mixkv.core.methods.base import Method

from .kvlayout import PLAIN, KVLayout, read_slots, split_kv, write_slots
from .paging import Geometry, PackedPrompt, PagedRule, check_total, flat_storage, key_tiles, pack, write_tokens
from .selection import kept_plan, kept_positions
from .slots import CompressionRule, slot_ids


@dataclass
class Compaction:
    """One request's compression: where it is and what it computed."""

    block_ids: list[int]
    prompt_length: int
    computed: int  # tokens in the cache after this step (>= prompt_length)
    queries: torch.Tensor  # (L, Hq, W, D) window queries, layer order as ``kv_caches``
    scaling: float = 1.0  # the attention's softmax scale (per-head path; the uniform one takes it as an argument)


def compact_request(method: Method, rule: CompressionRule, job: Compaction, kv_caches: Sequence[torch.Tensor],
                    block_size: int, scaling: float, layout: KVLayout = PLAIN,
                    keep_plans: bool = False) -> list[torch.Tensor]:
    """Compress ``job`` in every layer; returns the kept positions per layer when ``keep_plans``."""
    p, end = job.prompt_length, job.computed
    kt, vt = layout.keys_transposed, layout.values_transposed
    prompt_slots = torch.from_numpy(slot_ids(job.block_ids, block_size, p))
    tail_slots = torch.from_numpy(slot_ids(job.block_ids, block_size, end - p, start=p))
    held_slots = torch.from_numpy(slot_ids(job.block_ids, block_size, rule.budget + end - p))
    plans = []
    for layer_idx, kv in enumerate(kv_caches):
        key_cache, value_cache = split_kv(kv)
        keys, values = read_slots(key_cache, prompt_slots, kt), read_slots(value_cache, prompt_slots, vt)
        idx = kept_positions(method, job.queries[layer_idx], keys, values, scaling, layer_idx, len(kv_caches))
        gather = idx[..., None].expand(-1, -1, keys.shape[-1])
        new_k = torch.cat([keys.gather(1, gather), read_slots(key_cache, tail_slots, kt)], dim=1)
        new_v = torch.cat([values.gather(1, gather), read_slots(value_cache, tail_slots, vt)], dim=1)
        write_slots(key_cache, held_slots, new_k, kt)
        write_slots(value_cache, held_slots, new_v, vt)
        if keep_plans:
            plans.append(idx.clone())
    return plans


def compact_paged(method: Method, rule: PagedRule, job: Compaction, kv_caches: Sequence[torch.Tensor],
                  layout: KVLayout = PLAIN, keep_plans: bool = False) -> tuple[PackedPrompt, list[torch.Tensor]]:
    """Compress ``job`` under a per-layer or per-head method (:mod:`.paging`): kept prompt tokens packed densely
    into the request's first ``P`` blocks, tokens computed after the prompt right after them in vLLM's own
    layout. Every layer is read before anything is written (a packed token may land in another layer's plane).
    Returns where the prompt tokens went and, with ``keep_plans``, the kept positions ``(H, n_max)`` per layer
    (filler ``-1`` past each head's length)."""
    geom = Geometry.of(kv_caches)
    p, end, bs = job.prompt_length, job.computed, geom.block_size
    kt, vt = layout.keys_transposed, layout.values_transposed
    prompt_slots = torch.from_numpy(slot_ids(job.block_ids, bs, p))
    tail_slots = torch.from_numpy(slot_ids(job.block_ids, bs, end - p, start=p))
    kept, tails, plans = [], [], []
    for layer_idx, kv in enumerate(kv_caches):
        key_cache, value_cache = split_kv(kv)
        keys, values = read_slots(key_cache, prompt_slots, kt), read_slots(value_cache, prompt_slots, vt)
        idx, lengths = kept_plan(method, job.queries[layer_idx], keys, values, job.scaling, layer_idx, len(kv_caches))
        gather = idx[..., None].expand(-1, -1, keys.shape[-1])
        kept.append((keys.gather(1, gather), values.gather(1, gather), lengths))
        tails.append((read_slots(key_cache, tail_slots, kt), read_slots(value_cache, tail_slots, vt)))
        if keep_plans:
            steps = torch.arange(idx.shape[-1])
            plans.append(idx.masked_fill(steps >= lengths[:, None], -1))
    lengths = torch.stack([k[2] for k in kept])  # (L, H)
    check_total(int(lengths.sum()), rule.total(p), method.name)
    packed = pack(lengths, job.block_ids, geom)
    flat = flat_storage(kv_caches[0])
    ktiles, vtiles = key_tiles(flat, geom, kt), key_tiles(flat, geom, vt)
    held_tail = torch.from_numpy(slot_ids(job.block_ids, bs, end - p, start=packed.prompt_blocks * bs))
    for layer_idx, ((k, v, _), (tk, tv), kv) in enumerate(zip(kept, tails, kv_caches)):
        width = k.shape[1]  # this layer's widest head (the packed addresses are as wide as the widest layer's)
        valid = torch.arange(width) < packed.lengths[layer_idx][:, None]
        chunks, offsets = packed.chunks[layer_idx, :, :width][valid], packed.offsets[layer_idx, :, :width][valid]
        write_tokens(ktiles, chunks, offsets, k[valid], kt)
        write_tokens(vtiles, chunks + 1, offsets, v[valid], vt)
        key_cache, value_cache = split_kv(kv)
        write_slots(key_cache, held_tail, tk, kt)
        write_slots(value_cache, held_tail, tv, vt)
    return packed, plans
