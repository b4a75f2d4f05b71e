"""Speed and memory of methods on one model: prefill, compression, decoding, KV bytes, peak memory.

Every row of a context length shares one exact prefill (see :mod:`mixkv.core.capture`); each method
then compresses that capture, and decodes a fixed number of tokens whose per-step times give
the median. Timings on CUDA synchronise around each measured region.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from ..core import defaults
from ..core.attention import varlen_attention
from ..core.cache import CompressedLayer
from ..core.capture import build_cache, capture_prefill
from ..core.press import cache_kv_bytes, open_session, press
from ..core.registry import make_method
from ..core.selection import KeepPlan
from .machine import peak_rss_mib, reset_peak_rss


@dataclass
class BenchRow:
    context: int
    method: str
    budget: int | None
    prefill_s: float
    compress_s: float
    compress_pct_of_prefill: float
    decode_ms_per_token: float
    kv_bytes: int
    kv_bytes_theory: int
    kv_bytes_allocated: int
    peak_mem_mib: float | None
    attention_path: str


def theoretical_bytes(prefill, plans: dict[int, KeepPlan], decoded: int = 0) -> int:
    """Kept tokens x head_dim x 2 (K and V) x dtype size, summed over layers."""
    total = 0
    for cap in prefill.layers:
        b, h, n, d = cap.keys.shape
        elem = cap.keys.element_size()
        plan = plans.get(cap.layer_idx)
        tokens = int(plan.lengths.sum()) if plan is not None else b * h * n
        total += (tokens + b * h * decoded) * d * 2 * elem
    return total


def _allocated(cache) -> int:
    """Bytes allocated for keys and values (spare tail capacity and index metadata included)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, CompressedLayer):
            total += layer.allocated_bytes()
        else:
            total += layer.keys.numel() * layer.keys.element_size() * 2
    return total


def bench_context(model, inputs: dict, methods: Sequence[str], budget: int, window: int = defaults.WINDOW,
                  steps: int = 16, repeats: int = 3, floor_inputs: dict | None = None) -> list[BenchRow]:
    """All methods on one prompt, from one shared prefill.

    Compression is timed per method (median of ``repeats`` after a warm-up). Decoding is timed in
    turns: every method's cache is built first, then each step decodes one token with each method
    in a round robin (its press attached around the step, outside the timed region), so that
    machine noise hits all methods alike and their ratios hold on a busy machine. With
    ``floor_inputs`` (a prompt about as short as the budget) a ``floor`` row joins the round robin:
    the full cache of that short prompt, the least a compressed cache can cost per token.
    """
    device = inputs["input_ids"].device
    cuda = torch.device(device).type == "cuda"
    prefill_times = []
    pre = None
    for _ in range(max(1, repeats)):
        pre = None  # free the previous capture before the next prefill
        pre = capture_prefill(model, inputs, window=window)
        prefill_times.append(pre.seconds)
    prefill_s = statistics.median(prefill_times)
    n = pre.prompt_length
    reset_peak_rss(trim=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    entries = []
    for name in methods:
        method = make_method(name, budget=budget, window=window)
        built = [_build(model, pre, method) for _ in range(repeats + 1)]  # the first is a warm-up
        entry = built[-1]
        entry["compress_s"] = statistics.median(b["compress_s"] for b in built[1:])
        entry["name"], entry["method"] = name, method
        entries.append(entry)
        del built
    if floor_inputs is not None:
        short = capture_prefill(model, floor_inputs, window=window)
        entry = _build(model, short, None)
        entry.update(name="floor", method=None, context=short.prompt_length)
        entries.append(entry)
    times = decode_round_robin(model, entries, steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_rss_mib()
    rows = []
    for entry, step_times in zip(entries, times):
        method = entry["method"]
        compress_s = entry["compress_s"] if method is not None else 0.0
        rows.append(BenchRow(
            context=entry.get("context", n), method=entry["name"], budget=None if method is None else budget,
            prefill_s=prefill_s if entry["name"] != "floor" else 0.0, compress_s=compress_s,
            compress_pct_of_prefill=100 * compress_s / prefill_s if prefill_s else 0.0,
            decode_ms_per_token=1000 * statistics.median(step_times), kv_bytes=entry["kv_bytes"],
            kv_bytes_theory=entry["theory"], kv_bytes_allocated=entry["allocated"], peak_mem_mib=peak,
            attention_path=",".join(sorted(entry["session"].attention_paths)) or "none"
            if entry["session"] is not None else "full",
        ))
    return rows


def _build(model, pre, method) -> dict:
    """A method's cache from a captured prefill, its session (detached) and what it holds."""
    session = open_session(model, method) if method is not None else None
    try:
        t0 = time.perf_counter()
        cache, plans, _ = build_cache(pre, method, session)
        if method is not None and cache.layers and cache.layers[0].device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    finally:
        if session is not None:
            session.detach()
    kv = cache_kv_bytes(cache)
    return {"cache": cache, "session": session, "compress_s": seconds, "kv_bytes": kv,
            "theory": theoretical_bytes(pre, plans) if method is not None else kv, "allocated": _allocated(cache),
            "token": int(pre.logits[0].argmax())}


@torch.no_grad()
def decode_round_robin(model, entries: list[dict], steps: int) -> list[list[float]]:
    """Seconds of each greedy decode step of each entry, taken in turns (one step of each per round).

    An entry's press session is re-attached around its step (the cache belongs to it); attaching
    is not timed. The first round is a warm-up.
    """
    device = model.device
    times: list[list[float]] = [[] for _ in entries]
    for step in range(steps + 1):
        for entry, out in zip(entries, times):
            session = entry["session"]
            if session is not None:
                session.attach()
            try:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                logits = model(input_ids=torch.tensor([[entry["token"]]], device=device), cache=entry["cache"],
                               use_cache=True).logits
                entry["token"] = int(logits[0, -1].argmax())
                dt = time.perf_counter() - t0
            finally:
                if session is not None:
                    session.detach()
            if step > 0:
                out.append(dt)
    return times


def rows_to_dicts(rows: Sequence[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def timed_interleaved(fns: Sequence, iters: int, warmup: int = 3) -> list[float]:
    """Median seconds of each function, run in turns so that machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


# ---- microbenchmark: one decoding step over per-head lengths vs a dense cache --------------------

LAYOUTS = {  # KV heads x query heads per KV head, head dim: the layouts of real models
    "3x3x64": "SmolLM2-135M",
    "2x6x128": "Qwen2.5-VL-3B",
    "4x7x128": "Qwen2.5-VL-7B, InternVL3-8B",
    "8x4x128": "LLaVA-NeXT-Mistral-7B, Llama-3-8B",
    "32x1x128": "LLaVA-1.5-7B",
}


def parse_layout(text: str) -> tuple[int, int, int]:
    """``"8x4x128"`` -> (KV heads, query heads per KV head, head dim)."""
    try:
        h, g, d = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"layout {text!r} is not KVHEADSxGROUPxHEADDIM, e.g. 8x4x128") from None
    if min(h, g, d) < 1:
        raise ValueError(f"layout {text!r}: every part must be positive")
    return h, g, d


MICRO_MIN_KV_HEADS = 2
"""Lengths vary across a sequence's KV heads (their sum is fixed): one head has nothing to vary."""

MICRO_MIN_LENGTH = 2
"""Below 2 tokens per head on average every head keeps exactly one: nothing varies."""


def check_micro_layout(text: str) -> tuple[int, int, int]:
    """A layout the microbenchmark can measure (see :data:`MICRO_MIN_KV_HEADS`), parsed."""
    h, g, d = parse_layout(text)
    if h < MICRO_MIN_KV_HEADS:
        raise ValueError(f"layout {text!r} has {h} KV head; the microbenchmark varies lengths across a sequence's "
                         f"KV heads, so a layout needs at least {MICRO_MIN_KV_HEADS} (KVHEADSxGROUPxHEADDIM, "
                         "e.g. 2x6x128)")
    return h, g, d


def check_micro_lengths(lengths_per_head: Sequence[int]) -> None:
    """Mean tokens per head the microbenchmark can spread (see :data:`MICRO_MIN_LENGTH`)."""
    small = [n for n in lengths_per_head if n < MICRO_MIN_LENGTH]
    if small:
        raise ValueError(f"mean tokens per head must be at least {MICRO_MIN_LENGTH} (with 1 every head keeps one "
                         f"token and nothing varies), got {small}")


def check_micro_batches(batches: Sequence[int]) -> None:
    if any(b < 1 for b in batches):
        raise ValueError(f"batch sizes must be positive, got {list(batches)}")


def micro_grid(layouts: Sequence[str], batches: Sequence[int], lengths_per_head: Sequence[int],
               max_tokens: int) -> list[tuple[str, int, int]]:
    """The microbenchmark's ``(layout, batch, mean length)`` settings within ``max_tokens`` per layer.

    Raises a ValueError saying what is accepted for a value it cannot measure, instead of failing
    inside the measurement.
    """
    heads = {layout: check_micro_layout(layout)[0] for layout in layouts}
    check_micro_lengths(lengths_per_head)
    check_micro_batches(batches)
    return [(lay, b, n) for lay in layouts for b in batches for n in lengths_per_head
            if b * heads[lay] * n <= max_tokens]


def _head_lengths(batch: int, heads: int, mean_len: int, spread: float, gen) -> torch.Tensor:
    """Per-(sequence, head) lengths spread +-``spread`` around ``mean_len``, summing to ``heads * mean_len``."""
    raw = 1 - spread + 2 * spread * torch.rand(batch, heads, generator=gen)
    lengths = torch.clamp((raw / raw.sum(-1, keepdim=True) * heads * mean_len).round().long(), min=1)
    lengths[:, -1] = heads * mean_len - lengths[:, :-1].sum(-1)
    return lengths.clamp_min(1)


def micro_decode_step(lengths_per_head: Sequence[int], layouts: Sequence[str] = ("3x3x64",),
                      batches: Sequence[int] = (1,), iters: int = 50, spread: float = 0.5, seed: int = 0,
                      dtype=torch.float32, max_tokens: int = 1 << 20, progress: bool = True) -> list[dict]:
    """One decode step of attention: our variable-length layer vs dense SDPA with the same total
    tokens vs a dense cache padded to the longest head with an additive mask (what a library that
    only masks pays). Median of interleaved runs.

    For each mean length ``L`` the heads get lengths spread in ``[(1-spread) L, (1+spread) L]``
    (rescaled to total ``H * L``), as AdaKV produces. Settings with more than ``max_tokens``
    tokens per layer (``B * H * L``) are skipped (memory). Layouts need 2 or more KV heads and ``L``
    must be at least 2 (:func:`micro_grid`); small ``L`` can still draw equal lengths (``min_len ==
    max_len``), measured as the uniform layer it then is.
    """
    gen = torch.Generator().manual_seed(seed)
    grid = micro_grid(layouts, batches, lengths_per_head, max_tokens)
    rows = []
    for layout, b, mean_len in tqdm(grid, desc="micro", disable=not progress):
        h, g, d = parse_layout(layout)
        lengths = _head_lengths(b, h, mean_len, spread, gen)
        n = int(lengths.max())
        keys = torch.randn(b, h, n, d, generator=gen).to(dtype)
        values = torch.randn(b, h, n, d, generator=gen).to(dtype)
        plan = KeepPlan(torch.arange(n).expand(b, h, n).contiguous(), lengths)
        layer = CompressedLayer(keys, values, plan, n)
        layer.update(torch.randn(b, h, 1, d).to(dtype), torch.randn(b, h, 1, d).to(dtype))
        del keys, values
        q = torch.randn(b, h * g, 1, d, generator=gen).to(dtype)
        dk = torch.randn(b, h, mean_len + 1, d, generator=gen).to(dtype)
        dv = torch.randn(b, h, mean_len + 1, d, generator=gen).to(dtype)
        pk = torch.randn(b, h, n + 1, d, generator=gen).to(dtype)
        pv = torch.randn(b, h, n + 1, d, generator=gen).to(dtype)
        cols = torch.arange(n + 1)
        keep = (cols[None, None, :] < lengths[..., None]) | (cols == n)  # kept prompt tokens + the new one
        pmask = torch.zeros(b, h, 1, n + 1, dtype=dtype).masked_fill(~keep[:, :, None, :], float("-inf"))
        pmask = pmask.repeat_interleave(g, dim=1)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        t_var, t_dense, t_pad = timed_interleaved([
            partial(varlen_attention, q, layer, d**-0.5),
            partial(sdpa, q, dk, dv, scale=d**-0.5, enable_gqa=True),
            partial(sdpa, q, pk, pv, attn_mask=pmask, scale=d**-0.5, enable_gqa=True),
        ], iters)
        rows.append({"layout": layout, "model": LAYOUTS.get(layout, ""), "batch": b, "tokens_per_head": mean_len,
                     "num_kv_heads": h, "group": g, "head_dim": d, "dtype": str(dtype).replace("torch.", ""),
                     "varlen_ms": 1000 * t_var, "dense_ms": 1000 * t_dense, "padded_ms": 1000 * t_pad,
                     "ratio": t_var / t_dense, "ratio_padded": t_var / t_pad,
                     "min_len": int(lengths.min()), "max_len": int(lengths.max()),
                     # heads that drew equal lengths make a uniform layer: nothing packed
                     "regions": [] if layer.packing is None else [r.size for r in layer.packing.regions],
                     "kv_bytes": layer.kv_bytes(), "allocated_bytes": layer.allocated_bytes()})
        del layer, dk, dv, pk, pv, pmask
    return rows


# ---- throughput: a batch of long prompts decoded together ------------------------------------------

def throughput(model, inputs: dict, methods: Sequence[str], budget: int, window: int = defaults.WINDOW,
               steps: int = 8) -> list[dict]:
    """Decoded tokens per second for a batch (``inputs`` of batch ``B``), per method, from one shared prefill.

    What a server gains from a smaller cache: every step decodes ``B`` tokens; the rate is
    ``B * steps / seconds`` over the decode steps after the first (a warm-up).
    """
    pre = capture_prefill(model, inputs, window=window)
    b = inputs["input_ids"].shape[0]
    rows = []
    for name in methods:
        method = make_method(name, budget=budget, window=window)
        run = _batch_decode(model, pre, method, steps + 1)
        rows.append({"method": name, "batch": b, "prompt_tokens": pre.prompt_length, "budget": budget,
                     "steps": steps, "tokens_per_s": b * steps / sum(run[1:]), "step_ms": 1000 * statistics.median(run),
                     "prefill_s": pre.seconds})
    return rows


@torch.no_grad()
def _batch_decode(model, pre, method, steps: int) -> list[float]:
    """Seconds of each greedy decode step of a whole batch from a captured prefill."""
    def loop(cache) -> list[float]:
        token = pre.logits.argmax(-1, keepdim=True)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(input_ids=token, cache=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
        return times

    if method is None:
        return loop(build_cache(pre, None, None)[0])
    with press(model, method) as session:
        return loop(build_cache(pre, method, session)[0])
