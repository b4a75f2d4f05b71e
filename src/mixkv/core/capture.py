"""One exact prefill, many methods: capture a prompt's prefill once, compress it per method.

Prefill attention is exact under every method (compression only changes what is stored), so
every layer's hidden states, window queries and keys are the same for all methods and budgets.
Evaluation and benchmarks capture them once (:func:`capture_prefill`, a press session in its
explicit *capture* mode) and build one compressed cache per method (:func:`build_cache`)
instead of re-running the prefill for each. :func:`build_stacked_cache` goes one step further for
evaluation: one cache whose batch entries are different methods' compressions of the same prompt, so
all of them decode in one batched forward (a CPU decode step is bound by reading the weights, which a
batch reads once).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from . import defaults
from .cache import CompressedLayer
from .compression import compress_layer
from .layer import LayerPrefill
from .methods.base import Method
from .press import PressSession, open_session
from .selection import KeepPlan, keep_all_plan, plan_layer, stack_plans


@dataclass
class Prefill:
    """A captured prefill: one :class:`LayerPrefill` per layer (window ``window``), last logits."""

    layers: list[LayerPrefill]
    logits: torch.Tensor  # (B, vocab) at the last prompt position
    prompt_length: int
    window: int
    seconds: float
    image_mask: torch.Tensor | None = None


def capture_prefill(model, inputs: dict, window: int = defaults.WINDOW) -> Prefill:
    """Run the prompt once, keeping what any method with window ``<= window`` needs."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"capture window must be a positive int, got {window!r}")
    layers: list[LayerPrefill] = []
    start = time.perf_counter()
    session = open_session(model, None, capture_window=window, on_capture=layers.append)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        image = session.image_mask
    finally:
        session.detach()
    n = inputs["input_ids"].shape[1]
    if len(layers) != session.info.num_layers:
        raise ValueError(f"prompt of {n} tokens is too short to capture a window of {window} queries")
    return Prefill(layers, out.logits[:, -1].detach(), n, window, time.perf_counter() - start, image)


def build_cache(
    prefill: Prefill, method: Method | None, owner: PressSession | None
) -> tuple[DynamicCache, dict[int, KeepPlan], float]:
    """A fresh cache for ``method`` from a captured prefill (the full cache when ``method`` is None).

    Returns the cache, the kept positions per layer and the seconds spent compressing.
    ``owner`` is the active press that will decode on it.
    """
    cache = DynamicCache()
    plans: dict[int, KeepPlan] = {}
    seconds = 0.0
    for cap in prefill.layers:
        layer = None
        if owner is not None:
            owner.seed_queries(cap.layer_idx, cap.queries, cap.scaling)
        if method is not None:
            start = time.perf_counter()
            layer, plan = compress_layer(method, cap, owner=owner, prompt_length=prefill.prompt_length)
            seconds += time.perf_counter() - start
            if plan is not None:
                plans[cap.layer_idx] = plan
                if owner is not None:
                    owner.note_plan(cap.layer_idx, plan)
        if layer is None:
            layer = DynamicLayer()
            layer.update(cap.keys, cap.values)
            if owner is not None:
                owner.adopt(layer)
        cache.layers.append(layer)
    return cache, plans, seconds


def build_stacked_cache(
    prefill: Prefill, methods: list[Method], owner: PressSession
) -> tuple[DynamicCache, list[dict[int, KeepPlan]], list[float]]:
    """One cache of batch ``len(methods)``: entry ``i`` holds what ``methods[i]`` keeps of the prompt.

    The prefill must be of one sequence. Each method's plan is computed as :func:`build_cache`
    computes it, from one record per (window, kernel) and layer that the methods share (scores
    computed once, freed with the layer's turn); a layer a method leaves whole (the prompt fits its
    budget) keeps every token in that entry. Returns the cache (every layer a :class:`CompressedLayer`
    owned by ``owner``), each method's plans and its compression seconds.
    """
    if not methods:
        raise ValueError("build_stacked_cache needs at least one method")
    if prefill.layers and prefill.layers[0].keys.shape[0] != 1:
        raise ValueError(f"stacking needs a prefill of one sequence, got batch {prefill.layers[0].keys.shape[0]}")
    cache = DynamicCache()
    plans: list[dict[int, KeepPlan]] = [{} for _ in methods]
    seconds = [0.0] * len(methods)
    k = len(methods)
    for cap in prefill.layers:
        per = []
        records = {}  # one record per (window, kernel): methods that share it score the layer once
        for i, method in enumerate(methods):
            start = time.perf_counter()
            key = (method.window, method.kernel)
            if key not in records:
                records[key] = cap.for_method(*key)
            plan = plan_layer(method, records[key], own_record=False)
            seconds[i] += time.perf_counter() - start
            if plan is not None:
                plans[i][cap.layer_idx] = plan
            per.append(plan if plan is not None else keep_all_plan(cap))
        b, h, n, d = cap.keys.shape
        layer = CompressedLayer(cap.keys.expand(k, h, n, d), cap.values.expand(k, h, n, d), stack_plans(per),
                                prompt_length=prefill.prompt_length, owner=owner)
        cache.layers.append(layer)
    return cache, plans, seconds
