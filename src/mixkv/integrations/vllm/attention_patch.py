"""Attention side: hand every decoder layer's queries to the window store during prefill, and attend for
requests compressed by a per-layer or per-head method.

Wrapped: ``CPUAttentionBackendImpl.forward`` (vLLM 0.32's CPU backend). It receives the layer's
queries after the model's rotary embedding, the same ones its kernel attends with, which is where
mixkv's design asks window queries to be taken. The wrapper copies only the rows the model runner
marked for this step (none once every request decodes) and then calls the backend unchanged. When the
step holds rows of per-head requests (:data:`PAGED`), their rows of the output are then recomputed by
:func:`.paged_attention.attend` (each KV head over its own kept tokens; the kernel cannot: it takes one
length per request for all heads).
The target and the parameters the wrapper re-declares: :mod:`.internals`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import internals as vi
from .capture import WindowStore
from .kvlayout import KVLayout
from .paged_attention import PagedStep, attend
from .paging import Geometry

STORE: WindowStore | None = None  # set by the model runner of this worker process


@dataclass
class PagedContext:
    """What a layer needs to attend for per-head requests in this step (set per step by the model runner)."""

    step: PagedStep
    geometry: Geometry
    flat: torch.Tensor
    layout: KVLayout
    layer_index: dict[str, int]


PAGED: PagedContext | None = None  # this step's per-head rows, or None


def patch_attention() -> None:
    impl_class = vi.CPU_ATTENTION_IMPL.resolve()
    decoder = vi.ATTENTION_TYPE.resolve().DECODER

    if getattr(impl_class, "_mixkv_patched", False):
        return
    forward = vi.CPU_ATTENTION_FORWARD.resolve()

    @functools.wraps(forward)
    def forward_(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
        store = STORE
        if store is not None and store.step and attn_metadata is not None and self.attn_type == decoder:
            q = query.reshape(query.shape[0], self.num_heads, self.head_size)
            store.record(layer.layer_name, q, self.scale)
        output = forward(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
        paged = PAGED
        if paged is not None and attn_metadata is not None and self.attn_type == decoder:
            index = paged.layer_index.get(layer.layer_name)
            if index is not None:  # per-head requests: each head over its own tokens, replacing the kernel's rows
                q = query.reshape(query.shape[0], self.num_heads, self.head_size)
                rows = attend(paged.step, index, q, paged.flat, paged.geometry, self.scale,
                              paged.layout.keys_transposed, paged.layout.values_transposed)
                output.view(output.shape[0], self.num_heads, self.head_size)[paged.step.rows] = rows.to(output.dtype)
        return output

    vi.CPU_ATTENTION_FORWARD.install(forward_)
    impl_class._mixkv_patched = True
