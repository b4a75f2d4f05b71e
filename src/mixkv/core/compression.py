"""What a press does to one cache layer: build its record, compress it, keep the books.

:class:`Compressor` holds the press's method(s) and everything a compression produces (``stats``,
``plans``), but nothing about hooks: the press (:mod:`mixkv.core.press`) decides *when* a layer is
compressed (:class:`LayerAction`) and hands over the facts of the current forward (:class:`Forward`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from .cache import CacheOwner, CompressedLayer
from .decoding import DecodeTracker, RowClock, check_decode_options, real_counts, row_tokens
from .held import held_positions, held_tokens, right_align
from .layer import LayerPrefill
from .methods.base import Method
from .models import ModelInfo, image_token_mask
from .selection import KeepPlan, plan_layer


class LayerAction(Enum):
    """What one forward does to one cache layer (decided in the attention pre-hook, done in its post-hook)."""

    PREFILL = "prefill"  # a first prompt longer than the window: compress it
    FILL = "fill"  # a first prompt not longer than the window: keep it whole
    SEGMENT = "segment"  # a later turn's segment longer than the window: compress it with what is kept
    APPEND = "append"  # decoding, or a later segment that fits the window: append (and maybe re-score)


@dataclass
class Forward:
    """Facts of the model forward in flight, read once by the press's model pre-hook."""

    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None  # (B, T) over the whole conversation, or None
    new_count: int = 0  # new tokens this forward appends
    new_valid: torch.Tensor | None = None  # (B, new_count) False on padding of a later turn; None: all real
    new_real: list[int] | None = None  # real new tokens per row, when some are padding
    segment_rows: list[int] | None = None  # rows whose own segment is longer than the window (None: all)


def read_forward(kwargs: dict, args: tuple, window: int) -> Forward:
    """The facts of a model forward the press needs, from its arguments: the prompt ids (image tokens),
    the 2-D attention mask, and which new tokens are padding (a later, padded turn)."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    ids = ids if isinstance(ids, torch.Tensor) else None
    mask = kwargs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    new = ids if ids is not None else kwargs.get("inputs_embeds")
    q = new.shape[1] if isinstance(new, torch.Tensor) and new.dim() >= 2 else 0
    forward = Forward(input_ids=ids, attention_mask=mask, new_count=q)
    # A single new token is taken as real (generate never pads one): checking it would cost a device sync
    # per decoded token.
    if mask is None or q <= 1 or mask.shape[-1] < q or bool(mask.all()):
        return forward
    tail = mask[:, -q:].bool()
    if bool(tail.all()):
        return forward
    forward.new_valid = tail
    forward.new_real = real_counts(tail, tail.shape[0], q)
    # A later turn's segment is compressed in the rows whose own segment is longer than the window, as
    # each would be alone; the other rows only append it.
    rows = [r for r, n in enumerate(forward.new_real) if n > window]
    forward.segment_rows = None if len(rows) == len(forward.new_real) else rows
    return forward


@dataclass
class PressStats:
    """What the press did since the last new prompt (reset when a prefill starts on an empty cache).

    ``layers_compressed`` counts every layer compression: after the prefill, after a later turn's
    segment (``segments_compressed`` of them) and while decoding (``decode_compressions``).
    """

    compress_seconds: float = 0.0
    layers_compressed: int = 0
    prompt_length: int = 0
    kept_per_layer: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H) kept tokens
    segments_compressed: int = 0
    decode_compressions: int = 0


class Compressor:
    """Compress layers for one press: a method (or, with ``on_capture``, hand each first prefill's record
    to a callback), and with ``decode_budget`` re-score rows while decoding (:mod:`mixkv.core.decoding`).

    ``owner``: the press whose compressed layers these are (they refuse updates once it is left).
    ``record=True`` keeps each compressed layer's kept logical positions in ``plans``.
    """

    def __init__(self, method: Method | None, info: ModelInfo, window: int, owner: CacheOwner, *,
                 record: bool = False, timing: bool = False,
                 on_capture: Callable[[LayerPrefill], None] | None = None,
                 decode_budget: int | None = None, every: int | None = None):
        self.method, self.info, self.window, self.owner = method, info, window, owner
        self.kernel = method.kernel if method is not None else 1
        self.decode_budget, self.every = check_decode_options(method, decode_budget, every)
        self.decode_method = None if self.decode_budget is None else method.with_budget(self.decode_budget)
        self.decoding = None if self.decode_budget is None else DecodeTracker(window, self.decode_budget, self.every)
        self.record, self.timing, self.on_capture = record, timing, on_capture
        self.stats = PressStats()
        self.plans: dict[int, KeepPlan] = {}
        self.image_mask: torch.Tensor | None = None

    def new_prompt(self) -> None:
        """A prefill starts on an empty cache: the books start again."""
        self.stats = PressStats()
        self.plans = {}
        self.image_mask = None
        if self.decoding is not None:
            self.decoding.new_prompt()

    def compress(self, idx: int, cache, queries: torch.Tensor, scaling: float, action: LayerAction,
                 forward: Forward, rows: list[int] | None = None) -> None:
        """Compress what layer ``idx`` holds now, scored by the last ``W`` ``queries``: a first prompt
        (``PREFILL``; in capture mode handed to ``on_capture`` instead), the kept tokens with a later
        turn's segment (``SEGMENT``), or with decoded tokens (``APPEND``: a decode-time re-scoring, with
        the decode budget). ``rows``: only these sequences (the others keep all they hold); None: all."""
        method = self.decode_method if action is LayerAction.APPEND else self.method
        layer = cache.layers[idx]
        mask = forward.attention_mask
        keys, values, valid, logical = held_tokens(layer, mask)
        if queries.shape[2] < self.window or keys.shape[2] <= self.window:
            return
        first = action is LayerAction.PREFILL
        positions = None
        if self.record and self.on_capture is None:
            prev = self.plans.get(idx)
            positions = held_positions(layer, *((prev.indices, prev.lengths) if prev is not None else (None, None)))
        if not first:  # padding of a later turn sits between real tokens: move it out of the window
            keys, values, valid, positions = right_align(keys, values, valid, positions)
        image = real = None
        if first:
            image = self._image_mask(forward.input_ids, logical, keys.shape[2], keys.device)
            if idx == 0:
                self.image_mask = image
                self.stats.prompt_length = logical
        elif mask is not None and mask.shape[-1] == logical:
            real = mask.sum(-1).to(keys.device)
        record = LayerPrefill(
            layer_idx=idx, num_layers=self.info.num_layers, queries=queries, keys=keys, values=values,
            scaling=scaling, valid=valid, image_mask=image, window=self.window, kernel=self.kernel,
            real_length=real,
        )
        if self.on_capture is not None:
            self.on_capture(record)
            return
        b = keys.shape[0]
        tried = (list(range(b)) if rows is None else rows) if action is LayerAction.APPEND else None
        rows = None if rows is None or len(rows) == b else rows
        clock = None
        if self.decoding is not None:
            clock = RowClock.fresh(row_tokens(record)) if first else self.decoding.clocks.get(layer)
        if self._apply(idx, cache, method, record, logical, positions, rows, clock, tried):
            if action is LayerAction.SEGMENT:
                self.stats.segments_compressed += 1
            elif action is LayerAction.APPEND:
                self.stats.decode_compressions += 1
        elif tried and clock is not None:
            clock.restart(tried)  # every row re-scored fits: try again after `every` tokens

    def recompress_due(self, idx: int, cache, forward: Forward, skip: set[int] = frozenset()) -> None:
        """Decoding: re-compress the rows of layer ``idx`` that are due (see :mod:`mixkv.core.decoding`)
        with the decode budget. A row then never holds more than ``max(its allocation, decode_budget)
        + every`` tokens per head, and is re-scored at the same steps alone and in a batch."""
        rows = self.decoding.due(idx, cache.layers[idx], skip)
        if rows:
            ring = self.decoding.rings[idx]
            self.compress(idx, cache, ring.ordered(), ring.scaling, LayerAction.APPEND, forward, rows)

    def _apply(self, idx: int, cache, method: Method, record: LayerPrefill, logical: int,
               positions: torch.Tensor | None, rows: list[int] | None, clock: RowClock | None,
               tried: list[int] | None) -> bool:
        """Compress ``record`` (only ``rows`` of it, if given) with ``method`` into layer ``idx`` of
        ``cache``; False when all of it fits. ``clock``: the old layer's row counts, carried to the new one."""
        keys = record.keys
        if self.timing and keys.is_cuda:
            torch.cuda.synchronize(keys.device)
        start = time.perf_counter()
        new, plan = compress_layer(method, record, owner=self.owner, prompt_length=logical, rows=rows)
        if new is None:
            return False  # every sequence fits its budget: keep the cache exactly as it is
        cache.layers[idx] = new
        if self.timing and keys.is_cuda:
            torch.cuda.synchronize(keys.device)
        self.stats.compress_seconds += time.perf_counter() - start
        self.note_plan(idx, plan, positions)
        if clock is not None:
            self.decoding.carry(clock, new, plan, record, tried)
        return True

    def _image_mask(self, ids: torch.Tensor | None, total: int, stored: int, device) -> torch.Tensor | None:
        """Image tokens among the stored keys (the last ``stored`` of ``total`` prompt tokens), a first prompt's."""
        image = image_token_mask(ids, self.info) if ids is not None and ids.shape[-1] == total else None
        return None if image is None else image[:, total - stored:].to(device)

    def note_plan(self, idx: int, plan: KeepPlan, positions: torch.Tensor | None = None) -> None:
        """Count a layer compression; with ``record``, keep its kept tokens' logical positions.

        ``positions`` ``(B, H, L)``: the logical position of each slot ``plan`` indexes (None: the
        plan's indices are positions already, as after a first prefill that fills the cache).
        """
        self.stats.layers_compressed += 1
        self.stats.kept_per_layer[idx] = plan.lengths.detach().cpu()
        if self.record:
            indices, lengths = plan.indices.detach().cpu(), plan.lengths.detach().cpu()
            if positions is not None:
                indices = positions.cpu().gather(-1, indices)
                indices = torch.where(plan.valid().cpu(), indices, torch.zeros_like(indices))
            self.plans[idx] = KeepPlan(indices, lengths)


def compress_layer(method, record: LayerPrefill, owner: CacheOwner | None = None, prompt_length: int | None = None,
                   rows: list[int] | None = None) -> tuple[CompressedLayer | None, KeepPlan | None]:
    """Compress one layer's record with ``method`` (only ``rows`` of it, if given, see
    :func:`~mixkv.core.selection.plan_layer`); ``(None, None)`` when every sequence fits.

    ``record`` may hold a larger window than the method's (a shared capture): the method sees its
    own last ``window`` queries. ``prompt_length`` is the logical length the compressed layer
    reports (default: the stored keys').
    """
    plan = plan_layer(method, record, rows)
    if plan is None:
        return None, None
    length = record.keys.shape[2] if prompt_length is None else prompt_length
    return CompressedLayer(record.keys, record.values, plan, prompt_length=length, owner=owner), plan


def cache_kv_bytes(cache) -> int:
    """Bytes of keys and values a cache holds (compressed layers counted exactly)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, CompressedLayer):
            total += layer.kv_bytes()
        elif getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total
