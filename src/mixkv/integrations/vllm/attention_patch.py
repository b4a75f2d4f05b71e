"""Attention side: hand every decoder layer's queries to the window store during prefill.

Wrapped: ``CPUAttentionBackendImpl.forward`` (vLLM 0.32's CPU backend). It receives the layer's
queries after the model's rotary embedding, the same ones its kernel attends with, which is where
mixkv's design asks window queries to be taken. The wrapper copies only the rows the model runner
marked for this step (none once every request decodes) and then calls the backend unchanged.
The target and the parameters the wrapper re-declares: :mod:`.internals`.
"""

from __future__ import annotations

import functools

from . import internals as vi
from .capture import WindowStore

STORE: WindowStore | None = None  # set by the model runner of this worker process


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
        return forward(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)

    vi.CPU_ATTENTION_FORWARD.install(forward_)
    impl_class._mixkv_patched = True
