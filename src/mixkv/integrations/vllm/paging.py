"""Per-head paging: where a request keeps its prompt tokens when layers and heads keep different numbers.

vLLM gives a request one list of blocks for every layer, and a block of layer ``l`` is a
``(num_kv_heads, block_size, 2 * head_size)`` region of that layer's cache tensor. vLLM 0.32 places every
layer's tensor in one backing allocation, so each ``(layer, block, KV head)`` region, a **tile** of
``block_size`` tokens of one head, has a fixed address in one flat storage. A tile's first
``block_size * head_size`` elements hold keys, the next as many hold values; we address both in
**chunks** of ``block_size * head_size`` elements (keys: chunk ``c``, values: ``c + 1``).

A request compressed by a per-layer or per-head method keeps ``n[l, h]`` prompt tokens in head ``h`` of
layer ``l``. Its first ``P`` blocks hold them **packed densely**: every block brings ``L * H`` tiles (one per
layer and head), tile ``q`` of the request is block ``q // (L H)``, layer plane ``(q // H) % L``, head plane
``q % H``, and the ``k``-th kept token (in ``(layer, head, position)`` order) sits at offset ``k % bs`` of
tile ``k // bs``. A token may so live in another layer's plane than its own: only the plugin's attention
reads these tiles, through their addresses. Hence

    P = ceil(sum(n) / (L * H * block_size)),

within one block of the method's own memory. Tokens after the prompt (decoded ones) go after those ``P``
blocks in vLLM's normal layout (slot = position - offset, ``offset = prompt - P * block_size``), written by
the engine's own cache writer, so only attention over the prompt part needs the plugin.

The scheduler and the worker both need ``P`` and share no message (:mod:`.slots`), so ``sum(n)`` must be a
function of the prompt length alone (:func:`kept_total`): a method that declares ``keeps_full_budget`` keeps
exactly ``budget * L * H`` (AdaKV, SparseMM and HeadKV apportion that total exactly; how the heads share it
depends on the data, the total does not); any other (PyramidKV: a schedule of the length) is asked its
allocation on a data-free prompt of that length. The worker checks every request against it
(:func:`check_total`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mixkv.core.layer import LayerPrefill
from mixkv.core.methods.base import Method


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kept_total(method: Method, prompt_length: int, num_layers: int, num_kv_heads: int) -> int:
    """Prompt tokens ``method`` keeps over all layers and KV heads of one request (window included).

    Computed from the method's allocation on a data-free prompt of ``prompt_length`` tokens; the total of
    every built-in method does not depend on the data (see the module docstring), and the worker checks it.
    """
    n, heads = int(prompt_length), int(num_kv_heads)
    w = min(method.window, n)
    zeros_q, zeros_kv = torch.zeros(1, heads, w, 1), torch.zeros(1, heads, n, 1)

    def record(layer_idx: int) -> LayerPrefill:
        return LayerPrefill(layer_idx=layer_idx, num_layers=num_layers, queries=zeros_q, keys=zeros_kv,
                            values=zeros_kv, scaling=1.0, window=method.window, kernel=method.kernel)

    budget = int(method.budget_per_sequence(record(0))[0])
    if n <= budget:
        return n * heads * num_layers  # kept whole
    if method.keeps_full_budget:  # declared: the total is the budget, however the heads share it
        return budget * heads * num_layers
    total = 0
    for layer_idx in range(num_layers):
        total += int(method.allocate(record(layer_idx)).sum()) + heads * w
    return total


def check_total(got: int, expected: int, method_name: str) -> None:
    """The worker's check that a request kept what the scheduler paged for."""
    if got != expected:
        raise RuntimeError(f"{method_name} kept {got} tokens over all layers and heads where its allocation of a "
                           f"prompt this long keeps {expected}; the vLLM plugin pages by that total, so a method whose "
                           "total depends on the data cannot be served (declare keeps_full_budget only if it holds)")


@dataclass(frozen=True)
class PagedRule:
    """How many blocks a per-head method's kept prompt takes: ``P(prompt) = ceil(total / (L H bs))``."""

    method: Method
    num_layers: int
    num_kv_heads: int
    block_size: int
    _totals: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    def total(self, prompt_length: int) -> int:
        """Kept prompt tokens of a request this long (cached: the scheduler asks every step)."""
        got = self._totals.get(prompt_length)
        if got is None:
            got = self._totals[prompt_length] = kept_total(self.method, prompt_length, self.num_layers,
                                                           self.num_kv_heads)
        return got

    def prompt_blocks(self, prompt_length: int) -> int:
        return cdiv(self.total(prompt_length), self.num_layers * self.num_kv_heads * self.block_size)

    def prompt_slots(self, prompt_length: int) -> int:
        """Slots the kept prompt occupies in the request's block order (decoded tokens follow them)."""
        return self.prompt_blocks(prompt_length) * self.block_size


@dataclass(frozen=True)
class Geometry:
    """Chunk addresses of every tile in the cache's one backing storage (see the module docstring).

    ``layer_base[l]``: chunk of (block 0, head 0) keys of layer ``l``; a block adds ``block_stride`` chunks,
    a head ``head_stride``.
    """

    block_size: int
    head_size: int
    num_kv_heads: int
    layer_base: tuple[int, ...]
    block_stride: int
    head_stride: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_base)

    @property
    def chunk(self) -> int:
        return self.block_size * self.head_size

    @classmethod
    def of(cls, kv_caches: Sequence[torch.Tensor]) -> Geometry:
        """The geometry of vLLM's per-layer cache views; raises when they do not share one storage this way."""
        first = kv_caches[0]
        _, heads, bs, two_d = first.shape
        d = two_d // 2
        chunk = bs * d
        ptr = first.untyped_storage().data_ptr()
        bases = []
        for i, kv in enumerate(kv_caches):
            if kv.untyped_storage().data_ptr() != ptr or kv.shape != first.shape or kv.stride() != first.stride() \
                    or kv.dtype != first.dtype:
                raise RuntimeError(f"mixkv per-head paging needs every layer's KV cache in one backing storage "
                                   f"with one shape and stride; layer {i} differs ({tuple(kv.shape)}, {kv.stride()})")
            if kv.storage_offset() % chunk:
                raise RuntimeError(f"layer {i}'s KV cache starts {kv.storage_offset()} elements into the storage, "
                                   f"not on a tile boundary ({chunk} elements)")
            bases.append(kv.storage_offset() // chunk)
        s0, s1, s2, s3 = first.stride()
        if (s2, s3) != (two_d, 1) or s1 != bs * two_d or s0 % chunk:
            raise RuntimeError(f"mixkv per-head paging: unexpected KV cache strides {first.stride()} for shape "
                               f"{tuple(first.shape)} (each (block, head) region must be contiguous)")
        return cls(block_size=bs, head_size=d, num_kv_heads=heads, layer_base=tuple(bases),
                   block_stride=s0 // chunk, head_stride=s1 // chunk)

    def tile_chunks(self, layer: torch.Tensor, block_ids: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Key chunk of each (layer plane, block id, head plane) triple (broadcast)."""
        base = torch.tensor(self.layer_base, dtype=torch.long)[layer]
        return base + block_ids.long() * self.block_stride + head.long() * self.head_stride


def flat_storage(kv: torch.Tensor) -> torch.Tensor:
    """The whole backing storage of ``kv`` (any layer's view) as one flat tensor of its dtype."""
    n = kv.untyped_storage().nbytes() // kv.element_size()
    return kv.as_strided((n,), (1,), 0)


def key_tiles(flat: torch.Tensor, geom: Geometry, transposed: bool) -> torch.Tensor:
    """Chunks as tiles indexed ``[chunk, offset, :]`` (token-major) or ``[chunk, :, offset]`` (transposed)."""
    n = flat.numel() // geom.chunk
    if transposed:
        return flat[: n * geom.chunk].view(n, geom.head_size, geom.block_size)
    return flat[: n * geom.chunk].view(n, geom.block_size, geom.head_size)


def write_tokens(tiles: torch.Tensor, chunks: torch.Tensor, offsets: torch.Tensor, tokens: torch.Tensor,
                 transposed: bool) -> None:
    data = tokens.to(tiles.dtype)
    if transposed:
        tiles[chunks, :, offsets] = data
    else:
        tiles[chunks, offsets, :] = data


@dataclass
class PackedPrompt:
    """Where one request's kept prompt tokens live.

    Per token: ``chunks``/``offsets`` ``(L, H, n_max)``, the key chunk and offset of each kept token of each
    (layer, head) (entries past ``lengths`` ``(L, H)`` are filler; values are at chunk + 1), used to write them.
    Per tile, for attention: ``tiles`` ``(L, H, T)`` the key chunks a head's tokens span (in order; filler
    repeats a real one) and ``tile_mask`` ``(L, H, T * bs)`` which of those tiles' slots are this head's.
    """

    chunks: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    prompt_blocks: int
    tiles: torch.Tensor
    tile_mask: torch.Tensor
    layer_tiles: torch.Tensor  # (L,) tiles layer l's widest head spans: what its attention reads


def pack(lengths: torch.Tensor, block_ids: Sequence[int], geom: Geometry) -> PackedPrompt:
    """Dense addresses for ``lengths`` ``(L, H)`` kept tokens in the request's first blocks ``block_ids``."""
    num_layers, heads = lengths.shape
    total = int(lengths.sum())
    per_block = num_layers * heads * geom.block_size
    p = cdiv(total, per_block)
    if p > len(block_ids):
        raise ValueError(f"{total} kept tokens need {p} blocks; the request holds {len(block_ids)}")
    n_max = int(lengths.max()) if lengths.numel() else 0
    steps = torch.arange(n_max)
    valid = steps < lengths[..., None]  # (L, H, n_max)
    start = torch.cumsum(lengths.flatten(), 0) - lengths.flatten()  # first token index of each (l, h)
    k = (start.view(num_layers, heads, 1) + steps).masked_fill(~valid, 0)
    tile = k // geom.block_size
    blocks = torch.as_tensor(list(block_ids), dtype=torch.long)
    chunks = geom.tile_chunks((tile // heads) % num_layers, blocks[tile // (num_layers * heads)], tile % heads)
    offsets = k % geom.block_size
    # tiles each head spans: global tiles first..last of its token range [start, start + n)
    bs = geom.block_size
    start = start.view(num_layers, heads)
    first = start // bs
    last = torch.where(lengths > 0, (start + lengths - 1) // bs, first)
    width = int((last - first).max()) + 1 if lengths.numel() else 0
    tile_ids = torch.minimum(first[..., None] + torch.arange(width), last[..., None])  # (L, H, T), filler repeats
    tiles = geom.tile_chunks((tile_ids // heads) % num_layers, blocks[tile_ids // (num_layers * heads)],
                             tile_ids % heads)
    slot = (first[..., None] * bs + torch.arange(width * bs))  # global token index of each slot
    in_range = (slot >= start[..., None]) & (slot < (start + lengths)[..., None])
    return PackedPrompt(chunks=chunks.masked_fill(~valid, 0), offsets=offsets.masked_fill(~valid, 0),
                        lengths=lengths.clone(), prompt_blocks=p, tiles=tiles, tile_mask=in_range,
                        layer_tiles=(last - first + 1).amax(dim=1))


def decode_tiles(geom: Geometry, block_ids: torch.Tensor) -> torch.Tensor:
    """Key chunks ``(L, H, len(block_ids))`` of the decode blocks (after the kept prompt), in vLLM's own layout:
    decode slot ``s`` is offset ``s % bs`` of block ``block_ids[s // bs]``, in every layer and head."""
    layers = torch.arange(geom.num_layers)[:, None, None]
    heads = torch.arange(geom.num_kv_heads)[None, :, None]
    return geom.tile_chunks(layers, block_ids.long()[None, None, :], heads)
