"""Attention side: hand every decoder layer's queries to the window store during prefill.

Wrapped: ``CPUAttentionBackendImpl.forward`` (vLLM 0.32's CPU backend). It receives the layer's
queries after the model's rotary embedding, the same ones its kernel attends with, which is where
mixkv's design asks window queries to be taken. The wrapper copies only the rows the model runner
marked for this step (none once every request decodes) and then calls the backend unchanged.
"""

from __future__ import annotations

import functools

from .capture import WindowStore

STORE: WindowStore | None = None  # set by the model runner of this worker process


def patch_attention() -> None:
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    if getattr(CPUAttentionBackendImpl, "_mixkv_patched", False):
        return
    forward = CPUAttentionBackendImpl.forward

    @functools.wraps(forward)
    def forward_(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
        store = STORE
        if store is not None and store.step and attn_metadata is not None and self.attn_type == AttentionType.DECODER:
            q = query.reshape(query.shape[0], self.num_heads, self.head_size)
            store.record(layer.layer_name, q, self.scale)
        return forward(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)

    CPUAttentionBackendImpl.forward = forward_
    CPUAttentionBackendImpl._mixkv_patched = True
