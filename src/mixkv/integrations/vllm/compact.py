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
from .selection import kept_positions
from .slots import CompressionRule, slot_ids


@dataclass
class Compaction:
    """One request's compression: where it is and what it computed."""

    block_ids: list[int]
    prompt_length: int
    computed: int  # tokens in the cache after this step (>= prompt_length)
    queries: torch.Tensor  # (L, Hq, W, D) window queries, layer order as ``kv_caches``


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
