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
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import count

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .attention import make_attention_function
from .cache import CompressedLayer
from .compression import Compressor, Forward, LayerAction, PressStats, cache_kv_bytes, read_forward
from .decoding import check_decode_options
from .layer import LayerPrefill
from .methods.base import Method
from .models import ModelInfo, inspect_model
from .registry import resolve_method
from .selection import KeepPlan

__all__ = ["LayerAction", "PressSession", "PressStats", "cache_kv_bytes", "open_session", "press"]

_session_ids = count()
_active: weakref.WeakKeyDictionary[nn.Module, PressSession] = weakref.WeakKeyDictionary()
_active_lock = threading.Lock()


class PressSession:
    """Live state of one press on one model. Use :func:`press` rather than this directly.

    ``method`` compresses each layer after its prefill; with ``method=None`` the session
    captures instead: ``on_capture`` receives each layer's :class:`LayerPrefill` (queries of
    the last ``capture_window`` tokens) and the cache is left as it is. What a compression does
    lives in ``self.compressor`` (:class:`~mixkv.core.compression.Compressor`); this class decides
    when, from transformers' hooks.
    """

    def __init__(self, model: nn.Module, method: Method | None, info: ModelInfo, *, record: bool = False,
                 timing: bool = False, capture_window: int | None = None,
                 on_capture: Callable[[LayerPrefill], None] | None = None,
                 decode_budget: int | None = None, every: int | None = None):
        if (method is None) == (on_capture is None):
            raise ValueError("PressSession: give a method (compress) or on_capture with capture_window (capture)")
        self.model, self.method, self.info = model, method, info
        self.window = method.window if method is not None else int(capture_window)
        self.compressor = Compressor(method, info, self.window, self, record=record, timing=timing,
                                     on_capture=on_capture, decode_budget=decode_budget, every=every)
        self.on_capture = on_capture
        self.active = False
        self.attention_paths: set[str] = set()
        self.want_attentions = False  # this forward asked for attention weights
        self.eager = False  # the wrapped attention is eager (it returns weights)
        self.forward = Forward()
        self._handles: list = []
        self._attn_name: str | None = None
        self._saved_impl: str | None = None
        self._registered_model = False
        self._cache = None
        self._action: dict[int, LayerAction] = {}  # per layer, what this forward does to it
        self._queries: dict[int, tuple[torch.Tensor, float]] = {}
        # Plain (uncompressed) cache layers this press filled: the only ones it may continue.
        self._owned: weakref.WeakSet = weakref.WeakSet()
        # The cache a forward started on and its layers' lengths then, until that forward returns.
        self._inflight: tuple[weakref.ref, list[int]] | None = None

    # ---- what the compressor keeps, read from the session -----------------------------------
    @property
    def stats(self) -> PressStats:
        return self.compressor.stats

    @property
    def plans(self) -> dict[int, KeepPlan]:
        return self.compressor.plans

    @property
    def image_mask(self) -> torch.Tensor | None:
        return self.compressor.image_mask

    @property
    def decode_budget(self) -> int | None:
        return self.compressor.decode_budget

    @property
    def every(self) -> int | None:
        return self.compressor.every

    @property
    def decode_method(self) -> Method | None:
        return self.compressor.decode_method

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
        if self.compressor.decoding is not None:
            self.compressor.decoding.clear()
        self._inflight = None
        self._release_model()

    # ---- hooks -------------------------------------------------------------------------------
    def _model_pre_hook(self, module, args, kwargs):
        self._check_cache(kwargs.get("cache", kwargs.get("past_key_values")))
        self._action.clear()  # nothing of a forward that raised carries over
        self._queries.clear()
        want = kwargs.get("output_attentions")
        self.want_attentions = bool(getattr(self.model.config, "output_attentions", False) if want is None else want)
        self.forward = read_forward(kwargs, args, self.window)
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
                self.compressor.new_prompt()
            self._action[idx] = LayerAction.PREFILL if q > self.window else LayerAction.FILL
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
        decoding, fwd = self.compressor.decoding, self.forward
        if decoding is not None:
            decoding.track(layer, fwd.attention_mask, fwd.new_count)
        segment = q > self.window and (fwd.segment_rows is None or len(fwd.segment_rows) > 0)
        self._action[idx] = LayerAction.SEGMENT if segment else LayerAction.APPEND
        if isinstance(layer, CompressedLayer):
            layer.expect(fwd.new_valid)
        return None

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
        if action in (LayerAction.PREFILL, LayerAction.SEGMENT):
            self._queries[idx] = (query[:, :, -self.window :].detach(), float(scaling))
        if self.compressor.decoding is not None and action is not None:
            self.compressor.decoding.push(idx, query, scaling, self.forward.new_real)

    def _attn_post_hook(self, module, args, kwargs, output):
        idx = module.layer_idx
        action = self._action.pop(idx, None)
        cache = self._cache
        if action is None or cache is None or not hasattr(cache, "layers") or idx >= len(cache.layers):
            return None
        fwd, comp = self.forward, self.compressor
        appended = fwd.new_real or fwd.new_count
        if action in (LayerAction.PREFILL, LayerAction.SEGMENT):
            captured = self._queries.pop(idx, None)
            if captured is None:
                raise RuntimeError(
                    f"mixkv: layer {idx} ran a prompt without the press's attention function "
                    f"({self.info.text_config._attn_implementation!r}); cannot compress it"
                )
            rows = fwd.segment_rows if action is LayerAction.SEGMENT else None
            if action is LayerAction.SEGMENT and comp.decoding is not None:
                comp.decoding.appended(cache.layers[idx], appended)
            comp.compress(idx, cache, *captured, action, fwd, rows=rows)
            if rows is not None and comp.decoding is not None:  # the other rows only appended their segment
                comp.recompress_due(idx, cache, fwd, skip=set(rows))
        elif action is LayerAction.APPEND and comp.decoding is not None:
            comp.decoding.appended(cache.layers[idx], appended)
            comp.recompress_due(idx, cache, fwd)
        layer = cache.layers[idx]
        if isinstance(layer, DynamicLayer) and self.on_capture is None:
            self._owned.add(layer)
        return None

    # ---- caches built elsewhere (mixkv.core.capture) ------------------------------------------
    def query_ring_bytes(self) -> int:
        """Bytes of the recent-query rings ``decode_budget`` keeps (``B x Hq x W x D`` per layer): memory
        on top of the cache that compression while decoding costs."""
        decoding = self.compressor.decoding
        return 0 if decoding is None else decoding.ring_bytes()

    def seed_queries(self, idx: int, queries: torch.Tensor, scaling: float) -> None:
        """Give layer ``idx``'s decode-time ring the prefill's window queries (a cache built elsewhere,
        :func:`build_cache`), so decode re-compression can start before ``W`` tokens were decoded."""
        if self.compressor.decoding is not None:
            self.compressor.decoding.push(idx, queries[:, :, -self.window :], scaling)

    def adopt(self, layer) -> None:
        """Let this press continue a plain cache layer built for it elsewhere (:func:`build_cache`)."""
        if isinstance(layer, DynamicLayer):
            self._owned.add(layer)

    def note_plan(self, idx: int, plan: KeepPlan, positions: torch.Tensor | None = None) -> None:
        """Count a layer compression made elsewhere (see :meth:`Compressor.note_plan`)."""
        self.compressor.note_plan(idx, plan, positions)


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
