"""Decoding from a captured prefill: the loop every experiment shares.

:func:`run_method` builds one method's cache from a shared prefill (see
:mod:`mixkv.core.capture`) inside a press and decodes greedily; evaluation, the demo, the
benchmark and calibration all call it instead of writing their own loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..core.capture import Prefill, build_cache, build_stacked_cache
from ..core.methods.base import Method
from ..core.press import cache_kv_bytes, open_session, press
from ..core.selection import KeepPlan


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy_decode(model, cache, first_token: int, max_new_tokens: int, eos_token_ids: set[int] | None = None,
                  step_seconds: list[float] | None = None, on_step: Callable[[object], None] | None = None
                  ) -> list[int]:
    """Greedy decoding of one sequence from a (compressed) cache; returns the new token ids.

    ``first_token`` comes from the prefill's last logits; each further step feeds the previous
    token. With ``step_seconds`` every step's wall time is appended (synchronised on CUDA);
    ``on_step(cache)`` runs after each step, outside the timing.
    """
    eos = eos_token_ids or set()
    token = int(first_token)
    out = [token]
    device = model.device
    while len(out) < max_new_tokens and token not in eos:
        if step_seconds is not None:
            _sync(device)
            start = time.perf_counter()
        step = model(input_ids=torch.tensor([[token]], device=device), cache=cache, use_cache=True)
        token = int(step.logits[0, -1].argmax())
        if step_seconds is not None:
            _sync(device)
            step_seconds.append(time.perf_counter() - start)
        if on_step is not None:
            on_step(cache)
        out.append(token)
    return out


@dataclass
class MethodRun:
    """One method decoded from a shared prefill."""

    tokens: list[int]
    plans: dict[int, KeepPlan]
    kv_bytes: int  # after prefill, before any decoded token
    compress_seconds: float
    decode_seconds: float
    step_seconds: list[float] = field(default_factory=list)
    attention_paths: set[str] = field(default_factory=set)
    cache: object = None  # kept only with keep_cache=True
    decode_compressions: int = 0  # layer re-compressions while decoding (decode_budget)
    decode_compress_seconds: float = 0.0
    query_ring_bytes: int = 0  # the press's recent-query rings (decode_budget), not part of the cache


def run_method(model, prefill: Prefill, method: Method | None, max_new_tokens: int,
               eos_token_ids: set[int] | None = None, *, time_steps: bool = False,
               keep_cache: bool = False, on_cache: Callable[[object], None] | None = None,
               on_step: Callable[[object], None] | None = None, decode_budget: int | None = None,
               every: int | None = None) -> MethodRun:
    """Build ``method``'s cache from ``prefill`` (the full cache for None) and decode greedily.

    ``on_cache(cache)`` is called once the cache is built, before the first decoded token (for
    measurements of the cache as the prefill left it); ``on_step(cache)`` after each step.
    ``decode_budget`` / ``every``: compression while decoding (see :func:`mixkv.core.press.press`).
    """
    steps: list[float] | None = [] if time_steps else None
    first = int(prefill.logits[0].argmax())
    device = model.device
    if method is None:
        cache, plans, secs = build_cache(prefill, None, None)
        nbytes = cache_kv_bytes(cache)
        if on_cache is not None:
            on_cache(cache)
        start = time.perf_counter()
        tokens = greedy_decode(model, cache, first, max_new_tokens, eos_token_ids, steps, on_step)
        paths: set[str] = set()
        recompressions, recompress_secs, ring_bytes = 0, 0.0, 0
    else:
        with press(model, method, decode_budget=decode_budget, every=every) as session:
            _sync(device)
            t0 = time.perf_counter()
            cache, plans, _ = build_cache(prefill, method, session)
            _sync(device)
            secs = time.perf_counter() - t0
            nbytes = cache_kv_bytes(cache)
            if on_cache is not None:
                on_cache(cache)
            start = time.perf_counter()
            before = session.stats.compress_seconds
            tokens = greedy_decode(model, cache, first, max_new_tokens, eos_token_ids, steps, on_step)
            paths = set(session.attention_paths)
            recompressions = session.stats.decode_compressions
            recompress_secs = session.stats.compress_seconds - before
            ring_bytes = session.query_ring_bytes()
    decode = time.perf_counter() - start
    return MethodRun(tokens, plans, nbytes, secs, decode, steps or [], paths, cache if keep_cache else None,
                     recompressions, recompress_secs, ring_bytes)


@torch.no_grad()
def greedy_decode_batch(model, cache, first_tokens: list[int], max_new_tokens: int,
                        eos_token_ids: set[int] | None = None) -> list[list[int]]:
    """Greedy decoding of ``len(first_tokens)`` sequences in one batch; each row stops as
    :func:`greedy_decode` would (its cap or an end token), the batch when every row has."""
    eos = eos_token_ids or set()
    out = [[int(t)] for t in first_tokens]
    done = [row[0] in eos or max_new_tokens <= 1 for row in out]
    token = torch.tensor(first_tokens, device=model.device)[:, None]
    while not all(done):
        logits = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
        nxt = logits.argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(t)
                done[i] = t in eos or len(out[i]) >= max_new_tokens
        token = nxt[:, None]
    return out


def run_methods_stacked(model, prefill: Prefill, methods: list[Method], max_new_tokens: int,
                        eos_token_ids: set[int] | None = None) -> list[MethodRun]:
    """Decode several methods' compressions of one prompt as one batch (one :class:`MethodRun` each).

    Same kept tokens as :func:`run_method` per method; the decode runs once for all of them, so a
    CPU reads the weights once per step instead of once per method (evaluation grids: many times
    faster). Tokens can differ from one-at-a-time decoding only where floating-point sums of a
    batched product differ and two logits tie to that precision. Compression while decoding is not
    supported here. Decode time is shared equally among the methods.
    """
    if not methods:
        return []
    first = int(prefill.logits[0].argmax())
    session = open_session(model, methods[0])
    try:
        for method in methods[1:]:
            method.validate_for(session.info)
        cache, plans, secs = build_stacked_cache(prefill, list(methods), session)
        start = time.perf_counter()
        tokens = greedy_decode_batch(model, cache, [first] * len(methods), max_new_tokens, eos_token_ids)
        decode = (time.perf_counter() - start) / len(methods)
        paths = set(session.attention_paths)
    finally:
        session.detach()
    layers = prefill.layers
    runs = []
    for i in range(len(methods)):
        nbytes = 0
        for cap in layers:
            plan = plans[i].get(cap.layer_idx)
            tokens_kept = cap.keys.shape[1] * cap.keys.shape[2] if plan is None else int(plan.lengths.sum())
            nbytes += 2 * tokens_kept * cap.keys.shape[3] * cap.keys.element_size()
        runs.append(MethodRun(tokens[i], plans[i], nbytes, secs[i], decode, attention_paths=paths))
    return runs
