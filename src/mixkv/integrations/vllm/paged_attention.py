"""Attention for requests compressed by a per-layer or per-head method: each KV head over its own tokens.

vLLM's CPU kernel takes one length per request for all heads, so it cannot read a packed prompt
(:mod:`.paging`). For those requests' rows the plugin computes attention itself, in torch, and overwrites
what the kernel wrote there (the kernel still runs on the whole batch; for these rows it reads valid blocks
of the request and its result is discarded). Per row, head ``h`` of layer ``l`` attends over

* its kept prompt tokens, at the addresses :func:`.paging.pack` gave them, and
* the tokens after the prompt, in the decode blocks in vLLM's own layout, up to the row's own position
  (causal within a step: a resumed request recomputes several outputs in one step).

The step's addresses are built once per step (:func:`build_step`) and each layer only offsets them, so a
layer costs two gathers, two small matrix products and a softmax. Pure torch, no vLLM import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .paging import Geometry, PackedPrompt, decode_addresses, key_tiles, read_tokens


@dataclass
class PagedStep:
    """This step's rows of per-head requests and every address their attention reads.

    ``rows`` ``(R,)``: rows of the flattened batch; ``chunks``/``offsets`` ``(R, L, H, N)``: key chunk and
    offset of each column (values at chunk + 1); ``mask`` ``(R, L, H, N)``: columns the row attends to.
    """

    rows: torch.Tensor
    chunks: torch.Tensor
    offsets: torch.Tensor
    mask: torch.Tensor

    def __bool__(self) -> bool:
        return bool(self.rows.numel())


@dataclass
class PagedRequest:
    """One per-head request scheduled in this step: its rows, how many decode-region tokens each row sees
    (its own position included), its packed prompt and the block ids after the prompt blocks."""

    rows: Sequence[int]
    visible: Sequence[int]
    prompt: PackedPrompt
    decode_blocks: Sequence[int]


def build_step(geom: Geometry, requests: Sequence[PagedRequest]) -> PagedStep:
    """Addresses and masks of every row of ``requests`` (see :class:`PagedStep`)."""
    num_layers, heads = geom.num_layers, geom.num_kv_heads
    parts = []
    for req in requests:
        n = req.prompt.chunks.shape[-1]
        j = max(req.visible) if len(req.visible) else 0
        blocks = torch.as_tensor(list(req.decode_blocks), dtype=torch.long)
        if j > len(blocks) * geom.block_size:
            raise RuntimeError(f"a row sees {j} tokens after the prompt; the request holds {len(blocks)} decode blocks")
        dc = torch.stack([decode_addresses(geom, layer, blocks, j)[0] for layer in range(num_layers)]) \
            if j else torch.zeros(num_layers, heads, 0, dtype=torch.long)
        do = (torch.arange(j) % geom.block_size).expand(num_layers, heads, j)
        chunks = torch.cat([req.prompt.chunks, dc], dim=-1)
        offsets = torch.cat([req.prompt.offsets, do], dim=-1)
        prompt_ok = torch.arange(n) < req.prompt.lengths[..., None]  # (L, H, n)
        for row, seen in zip(req.rows, req.visible):
            decode_ok = (torch.arange(j) < seen).expand(num_layers, heads, j)
            parts.append((row, chunks, offsets, torch.cat([prompt_ok, decode_ok], dim=-1)))
    if not parts:
        empty = torch.zeros(0, num_layers, heads, 0, dtype=torch.long)
        return PagedStep(torch.zeros(0, dtype=torch.long), empty, empty, empty.bool())
    width = max(p[1].shape[-1] for p in parts)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[-1]))

    return PagedStep(rows=torch.tensor([p[0] for p in parts], dtype=torch.long),
                     chunks=torch.stack([pad(p[1]) for p in parts]), offsets=torch.stack([pad(p[2]) for p in parts]),
                     mask=torch.stack([pad(p[3]) for p in parts]))


def attend(step: PagedStep, layer: int, query: torch.Tensor, flat: torch.Tensor, geom: Geometry, scale: float,
           keys_transposed: bool, values_transposed: bool) -> torch.Tensor:
    """Attention output ``(R, Hq, D)`` of the step's rows in ``layer``; ``query`` ``(T, Hq, D)``: the batch's."""
    q = query[step.rows].float()  # (R, Hq, D)
    r, hq, d = q.shape
    heads = geom.num_kv_heads
    chunks, offsets = step.chunks[:, layer], step.offsets[:, layer]  # (R, H, N)
    keys = read_tokens(key_tiles(flat, geom, keys_transposed), chunks, offsets, keys_transposed).float()
    values = read_tokens(key_tiles(flat, geom, values_transposed), chunks + 1, offsets, values_transposed).float()
    q = q.view(r, heads, hq // heads, d)
    scores = torch.einsum("rhgd,rhnd->rhgn", q, keys) * scale
    scores = scores.masked_fill(~step.mask[:, layer, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("rhgn,rhnd->rhgd", probs, values).reshape(r, hq, d)
