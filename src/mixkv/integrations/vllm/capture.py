"""Keep each prefilling request's last ``W`` prompt queries, per layer, as the engine computed them.

The model runner says before each forward which rows of the flattened batch are window queries of
which request (:class:`StepCapture`); the attention backend hands every layer's query tensor to
:meth:`WindowStore.record`, which copies those rows. A window may span several steps (chunked
prefill), so rows accumulate per request until the request is compressed and its buffer dropped.
Queries are taken where attention receives them, after the model's own rotary embedding, as
mixkv's design asks (no re-derived RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepCapture:
    """This step's window rows: per request id, its rows of the flattened batch and their window slots."""

    parts: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def __bool__(self) -> bool:
        return bool(self.parts)

    @classmethod
    def from_arrays(cls, rows, requests, slots, req_ids: list[str]) -> StepCapture:
        """From :func:`.slots.window_tokens`' arrays (``requests`` index ``req_ids``)."""
        rows, requests, slots = (torch.as_tensor(a, dtype=torch.long) for a in (rows, requests, slots))
        parts = {}
        for r in torch.unique(requests).tolist():
            sel = requests == r
            parts[req_ids[r]] = (rows[sel], slots[sel])
        return cls(parts)


@dataclass
class WindowStore:
    """Window queries per request ``(L, Hq, W, D)``, filled layer by layer."""

    window: int
    layer_index: dict[str, int]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    scaling: float | None = None
    step: StepCapture | None = None

    def record(self, layer_name: str, query: torch.Tensor, scaling: float) -> None:
        """Copy this step's window rows of ``query`` ``(T, Hq, D)`` for layer ``layer_name``."""
        step = self.step
        if not step:
            return
        layer = self.layer_index.get(layer_name)
        if layer is None:  # a layer outside the compressed KV group (none in decoder-only models)
            return
        self.scaling = scaling
        for req_id, (rows, slots) in step.parts.items():
            buf = self.buffers.get(req_id)
            if buf is None:
                _, hq, d = query.shape
                buf = torch.zeros(len(self.layer_index), hq, self.window, d, dtype=query.dtype)
                self.buffers[req_id] = buf
            buf[layer][:, slots, :] = query[rows].permute(1, 0, 2)

    def take(self, req_id: str) -> torch.Tensor:
        """The request's complete window, removed from the store."""
        return self.buffers.pop(req_id)

    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            self.buffers.pop(req_id, None)
