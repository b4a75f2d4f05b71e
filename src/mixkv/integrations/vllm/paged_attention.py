"""Attention for requests compressed by a per-layer or per-head method: each KV head over its own tokens.

vLLM's CPU kernel takes one length per request for all heads, so it cannot read a packed prompt
(:mod:`.paging`). For those requests' rows the plugin computes attention itself, in torch, and overwrites
what the kernel wrote there (the kernel still runs on the whole batch; for these rows it reads valid blocks
of the request and its result is discarded). Per row, head ``h`` of layer ``l`` attends over

* its kept prompt tokens, at the addresses :func:`.paging.pack` gave them, and
* the tokens after the prompt, in the decode blocks in vLLM's own layout, up to the row's own position
  (causal within a step: a resumed request recomputes several outputs in one step).

Attention reads whole tiles (one contiguous copy each, ``index_select``) and masks the slots that are not the
head's: a packed head's tokens span at most ``ceil(n / bs) + 1`` tiles. The step's tiles and masks are built
once per step (:func:`build_step`, from tiles computed when the request was packed), so a layer costs two
gathers, two small matrix products and a softmax. Pure torch, no vLLM import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .paging import Geometry, PackedPrompt, decode_tiles


@dataclass
class PagedStep:
    """This step's rows of per-head requests and every tile their attention reads.

    ``rows`` ``(R,)``: rows of the flattened batch; ``tiles`` ``(R, L, H, T)``: key chunks of the tiles each
    row's head attends over, the decode blocks' first (``decode`` tiles, the same in every layer) then the kept
    prompt's (values at chunk + 1); ``mask`` ``(R, L, H, T * bs)``: the tile slots the row attends to;
    ``widths`` ``(L,)``: tiles layer ``l`` needs (``decode`` + its widest head's prompt tiles): a layer whose
    heads keep few tokens reads no more than it needs.
    """

    rows: torch.Tensor
    tiles: torch.Tensor
    mask: torch.Tensor
    widths: list[int]

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
    """Tiles and masks of every row of ``requests`` (see :class:`PagedStep`), a few tensor operations per request."""
    num_layers, heads, bs = geom.num_layers, geom.num_kv_heads, geom.block_size
    if not requests:
        empty = torch.zeros(0, num_layers, heads, 0, dtype=torch.long)
        return PagedStep(torch.zeros(0, dtype=torch.long), empty, empty.bool(), [0] * num_layers)
    used = []
    for req in requests:
        j = max(req.visible) if len(req.visible) else 0
        used.append(-(-j // bs))
        if used[-1] > len(req.decode_blocks):
            raise RuntimeError(f"a row sees {j} tokens after the prompt; the request holds "
                               f"{len(req.decode_blocks)} decode blocks")
    td = max(used)
    tp = max(req.prompt.tiles.shape[-1] for req in requests)
    rows, tiles, masks = [], [], []
    widths = torch.zeros(num_layers, dtype=torch.long)
    for req, u in zip(requests, used):
        blocks = torch.as_tensor(list(req.decode_blocks[:u]), dtype=torch.long)
        decode = decode_tiles(geom, blocks)  # (L, H, u)
        prompt = req.prompt.tiles
        t = torch.cat([decode, decode[..., :1].expand(-1, -1, td - u) if u else prompt[..., :1].expand(-1, -1, td),
                       prompt, prompt[..., :1].expand(-1, -1, tp - prompt.shape[-1])], dim=-1)
        visible = torch.as_tensor(list(req.visible), dtype=torch.long)
        decode_ok = torch.arange(td * bs)[None, :] < visible[:, None]  # (rows, td * bs)
        prompt_ok = torch.nn.functional.pad(req.prompt.tile_mask, (0, (tp - prompt.shape[-1]) * bs))
        n = len(req.rows)
        masks.append(torch.cat([decode_ok[:, None, None, :].expand(-1, num_layers, heads, -1),
                                prompt_ok.expand(n, -1, -1, -1)], dim=-1))
        tiles.append(t.expand(n, -1, -1, -1))
        rows += list(req.rows)
        widths = torch.maximum(widths, req.prompt.layer_tiles)
    return PagedStep(rows=torch.tensor(rows, dtype=torch.long), tiles=torch.cat(tiles), mask=torch.cat(masks),
                     widths=(widths + td).tolist())


def attend(step: PagedStep, layer: int, query: torch.Tensor, flat: torch.Tensor, geom: Geometry, scale: float,
           keys_transposed: bool, values_transposed: bool) -> torch.Tensor:
    """Attention output ``(R, Hq, D)`` of the step's rows in ``layer``; ``query`` ``(T, Hq, D)``: the batch's.

    Whole tiles are gathered (one contiguous copy each) and the slots that are not the head's are masked."""
    q = query[step.rows].float()  # (R, Hq, D)
    r, hq, d = q.shape
    heads, bs = geom.num_kv_heads, geom.block_size
    t = step.widths[layer]
    tiles = step.tiles[:, layer, :, :t]  # (R, H, t)
    chunks = flat.view(-1, geom.chunk) if flat.dim() == 1 else flat  # flat storage, or already its chunk view
    keys = chunks.index_select(0, tiles.reshape(-1)).float()
    values = chunks.index_select(0, (tiles + 1).reshape(-1)).float()
    q = q.view(r, heads, hq // heads, d)
    if keys_transposed:  # each tile [D, bs]: contract over D in place, no transposed copy
        scores = torch.einsum("rhgd,rhtdb->rhgtb", q, keys.view(r, heads, t, d, bs)).reshape(r, heads, hq // heads,
                                                                                                t * bs)
    else:
        scores = torch.einsum("rhgd,rhnd->rhgn", q, keys.view(r, heads, t * bs, d))
    scores = scores * scale
    if values_transposed:
        values = values.view(r, heads, t, d, bs).transpose(-1, -2)
    values = values.reshape(r, heads, t * bs, d)
    scores = scores.masked_fill(~step.mask[:, layer, :, None, : t * bs], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("rhgn,rhnd->rhgd", probs, values).reshape(r, hq, d)
