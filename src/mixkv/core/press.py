"""``with press(model, method): model.generate(...)`` — attach, compress each layer after its
prefill, detach (always, also when generation raises).

How it plugs in, with public extension points only:

* a forward pre-hook on the model reads ``input_ids`` (image-token positions) and the 2-D
  ``attention_mask`` (left padding) of the prompt;
* a registered attention function (:func:`mixkv.core.attention.make_attention_function`)
  captures the window queries and attends over compressed layers;
* a forward hook on each decoder layer's attention module replaces that layer's
  ``DynamicLayer`` by a :class:`~mixkv.core.cache.CompressedLayer` right after its prefill, so
  the full-size keys of a layer are freed before the next layer runs.

A session runs in one of two explicit modes: *compress* (a method is given; :func:`press`) or
*capture* (no method; the layers' prefills are handed to a callback and nothing is compressed,
as :func:`mixkv.core.capture.capture_prefill` uses it).

One press per model at a time: a second press on a model that is already pressed (nested, or
from another thread) raises. Presses on different models are independent. Use one model per
thread, or serialise the ``with`` blocks with your own lock.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from . import defaults
from .attention import make_attention_function
from .cache import CompressedLayer
from .held import QueryRing, held_positions, held_tokens, right_align
from .layer import LayerPrefill
from .methods.base import Method
from .models import ModelInfo, image_token_mask, inspect_model
from .registry import resolve_method
from .rows import RowClock, keep_all_plan, merge_rows, real_counts, select_rows
from .selection import KeepPlan, plan_keep

_session_ids = count()
_active: weakref.WeakKeyDictionary[nn.Module, PressSession] = weakref.WeakKeyDictionary()
_active_lock = threading.Lock()


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


class PressSession:
    """Live state of one press on one model. Use :func:`press` rather than this directly.

    ``method`` compresses each layer after its prefill; with ``method=None`` the session
    captures instead: ``on_capture`` receives each layer's :class:`LayerPrefill` (queries of
    the last ``capture_window`` tokens) and the cache is left as it is.
    """

    def __init__(self, model: nn.Module, method: Method | None, info: ModelInfo, *, record: bool = False,
                 timing: bool = False, capture_window: int | None = None,
                 on_capture: Callable[[LayerPrefill], None] | None = None,
                 decode_budget: int | None = None, every: int | None = None):
        if (method is None) == (on_capture is None):
            raise ValueError("PressSession: give a method (compress) or on_capture with capture_window (capture)")
        self.model, self.method, self.info = model, method, info
        self.decode_budget, self.every = check_decode_options(method, decode_budget, every)
        self.decode_method = method.with_budget(self.decode_budget) if self.decode_budget is not None else None
        self.window = method.window if method is not None else int(capture_window)
        self.kernel = method.kernel if method is not None else 1
        self.on_capture = on_capture
        self.record, self.timing = record, timing
        self.active = False
        self.stats = PressStats()
        self.plans: dict[int, KeepPlan] = {}
        self.image_mask: torch.Tensor | None = None
        self.attention_paths: set[str] = set()
        self._handles: list = []
        self._attn_name: str | None = None
        self._saved_impl: str | None = None
        self._registered_model = False
        self._cache = None
        # Per layer, what this forward does to it: "prefill" (compress a first prompt), "fill" (a
        # first prompt too short to compress), "segment" (compress a later turn's new tokens with
        # what is kept), "append" (decoding, or a later segment not longer than the window).
        self._action: dict[int, str] = {}
        self._queries: dict[int, tuple[torch.Tensor, float]] = {}
        self._rings: dict[int, QueryRing] = {}
        # Per cache layer (weakly: never keep a layer alive), per row: tokens since it was last re-scored
        # and tokens held; kept only with a decode budget (see mixkv.core.rows).
        self._clocks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Plain (uncompressed) cache layers this press filled: the only ones it may continue.
        self._owned: weakref.WeakSet = weakref.WeakSet()
        self._input_ids: torch.Tensor | None = None
        self._attention_mask: torch.Tensor | None = None
        self._new_valid: torch.Tensor | None = None
        self._new_real: list[int] | None = None  # real new tokens per row when some are padding
        self._new_count = 0
        self._segment_rows: list[int] | None = None  # rows whose own new segment is longer than W (None: all)
        self.want_attentions = False
        self.eager = False
        # The cache a forward started on and its layers' lengths then, until that forward returns.
        self._inflight: tuple[weakref.ref, list[int]] | None = None

    # ---- attach / detach -------------------------------------------------------------------
    def _claim_model(self) -> None:
        key = self.info.language_model
        with _active_lock:
            other = _active.get(key)
            if other is not None and other.active:
                raise RuntimeError(
                    f"{type(self.model).__name__} is already inside a mixkv press "
                    f"({other.describe()}); one press per model at a time: leave the first `with press(...)` "
                    "block before entering another, and use one model per thread (or your own lock)"
                )
            _active[key] = self
            self._registered_model = True

    def _release_model(self) -> None:
        if not self._registered_model:
            return
        with _active_lock:
            if _active.get(self.info.language_model) is self:
                del _active[self.info.language_model]
        self._registered_model = False

    def describe(self) -> str:
        return self.method.describe() if self.method is not None else f"capture(window={self.window})"

    def attach(self) -> None:
        self._claim_model()
        try:
            self._attach_hooks()
        except BaseException:
            self.detach()
            raise

    def _attach_hooks(self) -> None:
        config = self.info.text_config
        original_name = config._attn_implementation or "eager"
        if original_name == "eager":
            module = sys.modules[type(self.info.attention_modules[0]).__module__]
            original = module.eager_attention_forward
        elif original_name in ALL_ATTENTION_FUNCTIONS:
            original = ALL_ATTENTION_FUNCTIONS[original_name]
        else:
            raise ValueError(
                f"attention implementation {original_name!r} is not supported under a press; "
                "use eager, sdpa or flash_attention_2"
            )
        if original_name not in ALL_MASK_ATTENTION_FUNCTIONS:
            raise ValueError(f"attention implementation {original_name!r} has no mask function in transformers")
        name = f"mixkv{next(_session_ids)}_{original_name}"
        AttentionInterface.register(name, make_attention_function(original, self))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original_name])
        self._attn_name = name
        self.eager = original_name == "eager"
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._model_post_hook))
        for attn in self.info.attention_modules:
            self._handles.append(attn.register_forward_pre_hook(self._attn_pre_hook, with_kwargs=True))
            self._handles.append(attn.register_forward_hook(self._attn_post_hook, with_kwargs=True))
        self._saved_impl = config._attn_implementation
        config._attn_implementation = name
        self.active = True

    def detach(self) -> None:
        """Undo everything attach did; safe to call twice and after a partial attach."""
        self.active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._saved_impl is not None:
            config = self.info.text_config
            # Restore only what is still ours: never overwrite a setting someone changed since.
            if config._attn_implementation == self._attn_name:
                config._attn_implementation = self._saved_impl
            self._saved_impl = None
        if self._attn_name is not None:
            AttentionInterface._global_mapping.pop(self._attn_name, None)
            AttentionMaskInterface._global_mapping.pop(self._attn_name, None)
            self._attn_name = None
        self._cache = None
        self._action.clear()
        self._queries.clear()
        self._rings.clear()
        self._clocks = weakref.WeakKeyDictionary()
        self._inflight = None
        self._release_model()

    # ---- hooks -------------------------------------------------------------------------------
    def _model_pre_hook(self, module, args, kwargs):
        self._check_cache(kwargs.get("cache", kwargs.get("past_key_values")))
        self._action.clear()  # nothing of a forward that raised carries over
        self._queries.clear()
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        self._input_ids = input_ids if isinstance(input_ids, torch.Tensor) else None
        mask = kwargs.get("attention_mask")
        self._attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        want = kwargs.get("output_attentions")
        self.want_attentions = bool(getattr(self.model.config, "output_attentions", False) if want is None else want)
        # Validity of this forward's new tokens (padding of a later, padded turn): None when all real.
        self._new_valid = self._new_real = self._segment_rows = None
        embeds = kwargs.get("inputs_embeds")
        new = self._input_ids if self._input_ids is not None else embeds
        self._new_count = new.shape[1] if isinstance(new, torch.Tensor) and new.dim() >= 2 else 0
        if self._attention_mask is not None and self._new_count:
            q = self._new_count
            # A single new token is taken as real (generate never pads one): checking it would cost a
            # device sync per decoded token.
            if q > 1 and self._attention_mask.shape[-1] >= q and not bool(self._attention_mask.all()):
                tail = self._attention_mask[:, -q:].bool()
                if not bool(tail.all()):
                    self._new_valid = tail
                    self._new_real = real_counts(tail, tail.shape[0], q)
                    # A later turn's segment is compressed in the rows whose own segment is longer than the
                    # window, as each would be alone; the other rows only append it.
                    rows = [r for r, n in enumerate(self._new_real) if n > self.window]
                    self._segment_rows = None if len(rows) == len(self._new_real) else rows
        return None

    def _model_post_hook(self, module, args, output):
        self._inflight = None  # the forward returned: its cache is whole
        return None

    def _check_cache(self, cache) -> None:
        """Refuse a cache that a forward left half-updated (an exception or Ctrl-C inside a prefill)."""
        layers = getattr(cache, "layers", None)
        if not layers:
            self._inflight = None
            return
        lengths = [int(layer.get_seq_length()) for layer in layers]
        inflight = self._inflight
        torn = inflight is not None and inflight[0]() is cache and inflight[1] != lengths
        if torn or len(set(lengths)) > 1:
            raise RuntimeError(
                f"this KV cache was left half-updated: its layers hold {lengths} tokens, after a forward over it "
                "raised part-way (an exception, or Ctrl-C during a prefill). mixkv never continues such a cache: "
                "start generation with a new cache (rerun the conversation from its first prompt)"
            )
        self._inflight = (weakref.ref(cache), lengths)

    def _attn_pre_hook(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self._cache = cache
        idx = module.layer_idx
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if cache is None or hidden is None or not hasattr(cache, "layers"):
            self._action.pop(idx, None)  # no cache (use_cache=False, a loss): nothing to compress or extend
            return None
        layer = cache.layers[idx] if idx < len(cache.layers) else None
        if layer is not None and not isinstance(layer, (DynamicLayer, CompressedLayer)):
            raise ValueError(
                f"mixkv compresses transformers' DynamicCache (the default cache of generate); got a cache with "
                f"{type(layer).__name__} layers. Do not pass cache_implementation='static' or a StaticCache."
            )
        if isinstance(layer, CompressedLayer) and layer.owner is not None and layer.owner is not self:
            raise RuntimeError(
                "this KV cache was compressed under another mixkv press; continue it inside the press that "
                "made it, or start generation with a new cache"
            )
        q = hidden.shape[1]
        empty = layer is None or (not isinstance(layer, CompressedLayer) and layer.get_seq_length() == 0)
        if empty:
            if idx == 0:
                self._new_prefill()
            self._action[idx] = "prefill" if q > self.window else "fill"
            return None
        if self.on_capture is not None:  # capture mode only looks at first prefills
            self._action.pop(idx, None)
            return None
        if isinstance(layer, DynamicLayer) and layer not in self._owned:
            raise RuntimeError(
                f"layer {idx} of this KV cache was filled outside this mixkv press (with no press, or under "
                "another one); a press only continues caches it made: run the whole conversation, from its "
                "first prompt, inside one `with press(...)` block, or start generation with a new cache"
            )
        if self.decode_method is not None and layer not in self._clocks:
            self._clocks[layer] = self._clock_of(layer)
        segment = q > self.window and (self._segment_rows is None or len(self._segment_rows) > 0)
        self._action[idx] = "segment" if segment else "append"
        if isinstance(layer, CompressedLayer):
            layer.pending_valid = self._new_valid
        return None

    def _new_prefill(self) -> None:
        self.stats = PressStats()
        self.plans = {}
        self.image_mask = None
        self._rings.clear()

    def _clock_of(self, layer) -> RowClock:
        """Per-row counts of a layer the press has no clock for yet (its tokens before this forward):
        a plain layer nothing was cut from, or a compressed one built elsewhere (:func:`build_cache`)."""
        if isinstance(layer, CompressedLayer):
            held = (layer.kept_lengths.sum(-1).float() / layer.num_heads).tolist()
            return RowClock([layer.decoded] * layer.batch_size, [x + layer.decoded for x in held])
        b, stored = layer.keys.shape[0], layer.keys.shape[2]
        total = int(getattr(layer, "cumulative_length", 0) or stored)
        mask, valid = self._attention_mask, None
        if mask is not None and mask.shape[-1] == total + self._new_count:
            valid = mask[:, total - stored : total]
        return RowClock.fresh(real_counts(valid, b, stored))

    def layer_for(self, module):
        """The cache layer ``module`` is attending over right now (None without a cache)."""
        cache = self._cache
        idx = module.layer_idx
        if cache is None or not hasattr(cache, "layers") or idx >= len(cache.layers):
            return None
        return cache.layers[idx]

    def capture(self, module, query: torch.Tensor, scaling: float) -> None:
        """See every attention call's queries (after the model's RoPE / M-RoPE): keep the last ``W``
        of a prompt this layer will compress, and the recent ones for decode-time re-compression."""
        idx = module.layer_idx
        action = self._action.get(idx)
        if action in ("prefill", "segment"):
            self._queries[idx] = (query[:, :, -self.window :].detach(), float(scaling))
        if self.decode_method is not None and action is not None:
            ring = self._rings.get(idx)
            if ring is None:
                ring = self._rings[idx] = QueryRing(self.window)
            ring.push(query.detach(), scaling, self._new_real)

    def _attn_post_hook(self, module, args, kwargs, output):
        idx = module.layer_idx
        action = self._action.pop(idx, None)
        cache = self._cache
        if action is None or cache is None or not hasattr(cache, "layers") or idx >= len(cache.layers):
            return None
        if action in ("prefill", "segment"):
            captured = self._queries.pop(idx, None)
            if captured is None:
                raise RuntimeError(
                    f"mixkv: layer {idx} ran a prompt without the press's attention function "
                    f"({self.info.text_config._attn_implementation!r}); cannot compress it"
                )
            if action == "segment" and self.decode_method is not None:
                self._clocks[cache.layers[idx]].add(self._new_real or self._new_count)
            rows = self._segment_rows if action == "segment" else None
            self._compress(idx, cache, *captured, self.method, action, rows=rows)
            if rows is not None and self.decode_method is not None:  # the other rows only appended
                self._maybe_compress_decoded(idx, cache, skip=set(rows))
        elif action == "append" and self.decode_method is not None:
            self._clocks[cache.layers[idx]].add(self._new_real or self._new_count)
            self._maybe_compress_decoded(idx, cache)
        layer = cache.layers[idx]
        if isinstance(layer, DynamicLayer) and self.on_capture is None:
            self._owned.add(layer)
        return None

    # ---- compression ----------------------------------------------------------------------------
    def _image_mask(self, total: int, stored: int, device) -> torch.Tensor | None:
        """Image tokens among the stored keys (the last ``stored`` of ``total`` prompt tokens), a first prompt's."""
        ids = self._input_ids
        image = image_token_mask(ids, self.info) if ids is not None and ids.shape[-1] == total else None
        return None if image is None else image[:, total - stored:].to(device)

    def _compress(self, idx: int, cache, queries: torch.Tensor, scaling: float, method: Method | None,
                  kind: str, rows: list[int] | None = None) -> None:
        """Compress what layer ``idx`` holds now, scored by the last ``W`` ``queries``: a first prompt
        (``kind="prefill"``; in capture mode handed to ``on_capture`` instead), or the kept tokens with a
        later turn's segment (``"segment"``) or with decoded tokens (``"decode"``). ``rows``: only these
        sequences (the others keep all they hold); None: every sequence."""
        layer = cache.layers[idx]
        keys, values, valid, logical = held_tokens(layer, self._attention_mask)
        if queries.shape[2] < self.window or keys.shape[2] <= self.window:
            return
        positions = None
        if self.record and self.on_capture is None:
            prev = self.plans.get(idx)
            positions = held_positions(layer, *((prev.indices, prev.lengths) if prev is not None else (None, None)))
        if kind != "prefill":  # padding of a later turn sits between real tokens: move it out of the window
            keys, values, valid, positions = right_align(keys, values, valid, positions)
        image = real = None
        mask = self._attention_mask
        if kind == "prefill":
            image = self._image_mask(logical, keys.shape[2], keys.device)
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
        clock = None
        if self.decode_method is not None:
            clock = self._clocks.get(layer) if kind != "prefill" else RowClock.fresh(_row_tokens(record))
        tried = list(range(keys.shape[0])) if rows is None else rows
        tried = tried if kind == "decode" else None
        rows = None if rows is None or len(rows) == keys.shape[0] else rows
        if self._apply(idx, cache, method, record, logical, positions, rows, clock, tried):
            if kind == "segment":
                self.stats.segments_compressed += 1
            elif kind == "decode":
                self.stats.decode_compressions += 1
        elif tried and clock is not None:
            clock.since = [0 if r in tried else n for r, n in enumerate(clock.since)]  # fits: retry after `every`

    def _maybe_compress_decoded(self, idx: int, cache, skip: set[int] = frozenset()) -> None:
        """Decoding: re-compress the rows of layer ``idx`` that hold more than ``decode_budget`` tokens per
        head and got ``every`` tokens since they were last re-scored, with the decode budget.

        Each row is decided on its own counts (:class:`~mixkv.core.rows.RowClock`), so a sequence is
        re-compressed at the same steps alone and in a batch. After every forward, each row either got
        fewer than ``every`` tokens since it was last re-scored or holds at most ``decode_budget`` per
        head: it never holds more than ``max(its allocation, decode_budget) + every``, and the layer is
        copied at most once per ``every`` tokens of each row.
        """
        layer = cache.layers[idx]
        clock = self._clocks.get(layer)
        ring = self._rings.get(idx)
        if clock is None or ring is None:
            return
        rows = [r for r in clock.due(self.every, self.decode_budget) if r not in skip and ring.ready(r)]
        if not rows:
            return
        self._compress(idx, cache, ring.ordered(), ring.scaling, self.decode_method, "decode", rows=rows)

    def _apply(self, idx: int, cache, method: Method, record: LayerPrefill, logical: int,
               positions: torch.Tensor | None, rows: list[int] | None = None, clock: RowClock | None = None,
               tried: list[int] | None = None) -> bool:
        """Compress ``record`` (only ``rows`` of it, if given) with ``method`` into layer ``idx`` of
        ``cache``; False when all of it fits. ``clock``: the old layer's row counts, carried to the new one."""
        keys = record.keys
        if self.timing and keys.is_cuda:
            torch.cuda.synchronize(keys.device)
        start = time.perf_counter()
        if rows is None:
            new, plan = compress_layer(method, record, owner=self, prompt_length=logical)
        else:
            part = layer_plan(method, select_rows(record, rows))
            plan = None if part is None else merge_rows(keep_all_plan(record), rows, part)
            new = None if plan is None else CompressedLayer(keys, record.values, plan, prompt_length=logical,
                                                            owner=self)
        if new is None:
            return False  # every sequence fits its budget: keep the cache exactly as it is
        cache.layers[idx] = new
        if self.timing and keys.is_cuda:
            torch.cuda.synchronize(keys.device)
        self.stats.compress_seconds += time.perf_counter() - start
        self.note_plan(idx, plan, positions)
        if clock is not None:
            h = plan.lengths.shape[1]
            kept = plan.lengths.sum(-1).tolist()
            cut = [r for r, (k, n) in enumerate(zip(kept, _row_tokens(record, per_head=False))) if k < n]
            self._clocks[new] = clock.rebuilt([k / h for k in kept], cut, tried)
        return True

    def query_ring_bytes(self) -> int:
        """Bytes of the recent-query rings ``decode_budget`` keeps (``B x Hq x W x D`` per layer): memory
        on top of the cache that compression while decoding costs."""
        return sum(r.buffer.numel() * r.buffer.element_size() for r in self._rings.values() if r.buffer is not None)

    def seed_queries(self, idx: int, queries: torch.Tensor, scaling: float) -> None:
        """Give layer ``idx``'s decode-time ring the prefill's window queries (a cache built elsewhere,
        :func:`build_cache`), so decode re-compression can start before ``W`` tokens were decoded."""
        if self.decode_method is not None:
            ring = self._rings.setdefault(idx, QueryRing(self.window))
            ring.push(queries[:, :, -self.window :].detach(), scaling)

    def adopt(self, layer) -> None:
        """Let this press continue a plain cache layer built for it elsewhere (:func:`build_cache`)."""
        if isinstance(layer, DynamicLayer):
            self._owned.add(layer)

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


def _row_tokens(record: LayerPrefill, per_head: bool = True) -> list:
    """Real tokens of each row of ``record``: per head on average (``per_head``), or over all heads."""
    b, h, n, _ = record.keys.shape
    total = record.token_mask.expand(b, h, n).sum((1, 2))
    return (total.float() / h).tolist() if per_head else total.tolist()


def compress_layer(method: Method, layer: LayerPrefill, owner: PressSession | None = None,
                   prompt_length: int | None = None) -> tuple[CompressedLayer | None, KeepPlan | None]:
    """Compress one layer's prefill with ``method``; ``(None, None)`` when every prompt fits.

    ``layer`` may hold a larger window than the method's (a shared capture): the method sees its
    own last ``window`` queries. ``prompt_length`` is the logical length the compressed layer
    reports (default: the stored keys').
    """
    plan = layer_plan(method, layer)
    if plan is None:
        return None, None
    length = layer.keys.shape[2] if prompt_length is None else prompt_length
    return CompressedLayer(layer.keys, layer.values, plan, prompt_length=length, owner=owner), plan


def layer_plan(method: Method, layer: LayerPrefill, own_record: bool = True) -> KeepPlan | None:
    """The positions ``method`` keeps of one layer's prefill; None when every prompt fits its budget.

    ``own_record=False``: ``layer`` is already a record for this method's window and kernel, which
    the caller may share among methods (their scores are computed once; see
    :func:`mixkv.core.capture.build_stacked_cache`).
    """
    if own_record:
        layer = layer.for_method(method.window, method.kernel)
    elif (layer.window, layer.kernel) != (method.window, method.kernel):
        raise ValueError(f"record for window {layer.window} / kernel {layer.kernel}, method needs "
                         f"{method.window} / {method.kernel}")
    budget = method.budget_per_sequence(layer)
    if not bool((layer.n_valid > budget).any()):
        return None
    return plan_keep(method, layer)


def check_decode_options(method: Method | None, decode_budget, every) -> tuple[int | None, int | None]:
    """Validate ``press(decode_budget=, every=)``; returns them with ``every``'s default filled in."""
    if decode_budget is None:
        if every is not None:
            raise ValueError("every= only applies with decode_budget=... (tokens per head kept while decoding)")
        return None, None
    if method is None:
        raise ValueError("decode_budget= needs a compression method (not 'full' or a capture)")
    whole = isinstance(decode_budget, int) and not isinstance(decode_budget, bool)
    if not whole or not method.window < decode_budget <= 2**31:
        raise ValueError(
            f"decode_budget must be an int larger than the window ({method.window}): tokens kept per KV head "
            f"while decoding, window included; got {decode_budget!r}"
        )
    every = defaults.DECODE_EVERY if every is None else every
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(
            f"every must be a positive int (re-compress at most once per `every` new tokens), got {every!r}"
        )
    return decode_budget, every


def open_session(model: nn.Module, method: Method | None, **kwargs) -> PressSession:
    """Inspect ``model``, validate ``method`` against it and attach a session (caller detaches)."""
    info = inspect_model(model)
    if method is not None:
        method.validate_for(info)
    session = PressSession(model, method, info, **kwargs)
    session.attach()
    return session


@contextmanager
def press(model: nn.Module, method="snapkv+mixkv", *, record: bool = False, timing: bool = False,
          decode_budget: int | None = None, every: int | None = None,
          **method_kwargs) -> Iterator[PressSession | None]:
    """Compress the KV cache of ``model`` at the end of every prefill inside the block.

    ``method``: a method object (``MixKV(SnapKV(budget=64))``) or a registry name
    (``"snapkv+mixkv"``, see :func:`mixkv.core.registry.available_methods`) with ``budget=``,
    ``ratio=``, ``window=`` ... as keyword arguments. ``"full"`` (or None) compresses nothing.

    Later turns: a ``generate`` that continues a cache made inside this block compresses its new
    prompt segment (when longer than the window) together with what each head kept, into the same
    budget; positions stay true. A cache made outside this block (no press, or another one) raises.

    ``decode_budget``: also bound the cache while decoding: a layer holding more than
    ``decode_budget`` tokens per head is re-scored with its last ``W`` queries and cut back to the
    method's own allocation at that budget, at most once per ``every`` new tokens (default 32).

    ``record=True`` keeps the logical positions each compressed layer kept (``session.plans``).
    Yields the :class:`PressSession` (None for "full"). The model is restored on exit, also on error.
    One press per model at a time (a second one raises).
    """
    resolved = resolve_method(method, **method_kwargs)
    if resolved is None:
        if decode_budget is not None or every is not None:
            check_decode_options(None, decode_budget, every)
        yield None
        return
    session = open_session(model, resolved, record=record, timing=timing, decode_budget=decode_budget, every=every)
    try:
        yield session
    finally:
        session.detach()


def cache_kv_bytes(cache) -> int:
    """Bytes of keys and values a cache holds (compressed layers counted exactly)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, CompressedLayer):
            total += layer.kv_bytes()
        elif getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total
