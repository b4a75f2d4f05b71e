"""One exact prefill, many methods: capture a prompt's prefill once, compress it per method.

Prefill attention is exact under every method (compression only changes what is stored), so
every layer's hidden states, window queries and keys are the same for all methods and budgets.
Evaluation and benchmarks capture them once (:func:`shared_prefill`) and build one compressed
cache per method (:func:`build_cache`) instead of re-running the prefill for each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .methods import SnapKV
from .press import LayerCapture, PressSession, compress_layer, press
from .selection import KeepPlan


@dataclass
class Prefill:
    """A captured prefill: per-layer window queries and full keys/values, last logits."""

    layers: list[LayerCapture]
    logits: torch.Tensor  # (B, vocab) at the last prompt position
    prompt_length: int
    window: int
    seconds: float
    image_mask: torch.Tensor | None = None


def shared_prefill(model, inputs: dict, window: int = 32) -> Prefill:
    """Run the prompt once, keeping what any method with window ``<= window`` needs."""
    start = time.perf_counter()
    with torch.no_grad(), press(model, SnapKV(budget=window + 1, window=window)) as session:
        session.sink = []
        out = model(**inputs, use_cache=True)
        layers = session.sink
        image = session.image_mask
    n = inputs["input_ids"].shape[1]
    if len(layers) != session.info.num_layers:
        raise ValueError(f"prompt of {n} tokens is too short to capture a window of {window} queries")
    return Prefill(layers, out.logits[:, -1].detach(), n, window, time.perf_counter() - start, image)


def build_cache(
    prefill: Prefill, method, owner: PressSession | None
) -> tuple[DynamicCache, dict[int, KeepPlan], float]:
    """A fresh cache for ``method`` from a captured prefill (the full cache when ``method`` is None).

    Returns the cache, the kept positions per layer and the seconds spent compressing.
    ``owner`` is the active press that will decode on it.
    """
    cache = DynamicCache()
    plans: dict[int, KeepPlan] = {}
    seconds = 0.0
    num_layers = len(prefill.layers)
    for cap in prefill.layers:
        layer = None
        if method is not None:
            if method.window > prefill.window:
                raise ValueError(f"method window {method.window} exceeds the captured window {prefill.window}")
            start = time.perf_counter()
            layer, plan = compress_layer(
                method, cap.layer_idx, num_layers, cap.queries[:, :, -method.window :], cap.keys, cap.values,
                cap.scaling, cap.valid, cap.image_mask, owner=owner,
            )
            seconds += time.perf_counter() - start
            if plan is not None:
                plans[cap.layer_idx] = plan
                if owner is not None:
                    owner.note_plan(cap.layer_idx, plan)
        if layer is None:
            layer = DynamicLayer()
            layer.update(cap.keys, cap.values)
        cache.layers.append(layer)
    return cache, plans, seconds


@torch.no_grad()
def greedy_decode(model, cache, first_logits: torch.Tensor, max_new_tokens: int,
                  eos_token_ids: set[int] | None = None) -> list[int]:
    """Greedy decoding of one sequence from a (compressed) cache; returns the new token ids."""
    eos = eos_token_ids or set()
    token = int(first_logits[0].argmax())
    out = [token]
    device = first_logits.device
    while len(out) < max_new_tokens and token not in eos:
        step = model(input_ids=torch.tensor([[token]], device=device), cache=cache, use_cache=True)
        token = int(step.logits[0, -1].argmax())
        out.append(token)
    return out
