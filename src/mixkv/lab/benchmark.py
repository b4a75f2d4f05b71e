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
from ..core.capture import capture_prefill
from ..core.registry import make_method
from ..core.selection import KeepPlan
from .machine import peak_rss_mib, reset_peak_rss
from .run import run_method


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
                  steps: int = 16, repeats: int = 3) -> list[BenchRow]:
    """All methods on one prompt; the first decode run of each method is a discarded warm-up.

    ``steps`` tokens are decoded per run (the first comes from the prefill, so ``steps - 1`` timed
    decode steps); every step's time enters the median.
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
    rows = []
    for name in methods:
        method = make_method(name, budget=budget, window=window)
        per_step, compress = [], []
        peak = None
        path = "full"
        kv = theory = alloc = 0
        for rep in range(repeats + 1):  # rep 0 is the warm-up
            reset_peak_rss(trim=False)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            allocated: list[int] = []
            run = run_method(model, pre, method, steps + 1, None, time_steps=True,
                             on_cache=lambda cache, out=allocated: out.append(_allocated(cache)))
            if method is not None:
                kv, theory, alloc = run.kv_bytes, theoretical_bytes(pre, run.plans), allocated[0]
                path = ",".join(sorted(run.attention_paths)) or "none"
            if rep > 0:
                per_step.extend(run.step_seconds)
                compress.append(run.compress_seconds)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_rss_mib()
            del run
        if method is None:
            # Bytes after prefill: the full cache before any decoded token.
            kv = theory = alloc = theoretical_bytes(pre, {})
        compress_s = statistics.median(compress) if compress else 0.0
        rows.append(BenchRow(
            context=n, method=name, budget=None if method is None else budget, prefill_s=prefill_s,
            compress_s=compress_s, compress_pct_of_prefill=100 * compress_s / prefill_s if prefill_s else 0.0,
            decode_ms_per_token=1000 * statistics.median(per_step), kv_bytes=kv, kv_bytes_theory=theory,
            kv_bytes_allocated=alloc, peak_mem_mib=peak, attention_path=path,
        ))
    return rows


def rows_to_dicts(rows: Sequence[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def _timed_pair(first, second, iters: int) -> tuple[float, float]:
    """Median seconds of two functions, interleaved so that machine noise hits both alike."""
    for _ in range(3):
        first()
        second()
    a, b = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t2 - t1)
    return statistics.median(a), statistics.median(b)


# ---- microbenchmark: one decoding step over per-head lengths vs a dense cache --------------------

def micro_decode_step(lengths_per_head: Sequence[int], num_kv_heads: int = 3, group: int = 3, head_dim: int = 64,
                      iters: int = 50, spread: float = 0.5, seed: int = 0, dtype=torch.float32,
                      progress: bool = True) -> list[dict]:
    """Median time of one decode step: variable-length layer vs dense SDPA with the same total tokens.

    For each mean length ``L`` the heads get lengths spread in ``[(1-spread) L, (1+spread) L]``
    (rescaled to total ``H * L``), as AdaKV produces; the dense cache holds ``L`` per head.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for mean_len in tqdm(lengths_per_head, desc="micro", disable=not progress):
        h, d = num_kv_heads, head_dim
        raw = 1 - spread + 2 * spread * torch.rand(h, generator=gen)
        lengths = torch.clamp((raw / raw.sum() * h * mean_len).round().long(), min=1)
        lengths[-1] = h * mean_len - lengths[:-1].sum()
        n = int(lengths.max()) + 1
        keys = torch.randn(1, h, n, d, generator=gen).to(dtype)
        values = torch.randn(1, h, n, d, generator=gen).to(dtype)
        idx = torch.zeros(1, h, n, dtype=torch.long)
        for i in range(h):  # setup only
            idx[0, i, : lengths[i]] = torch.arange(int(lengths[i]))
        layer = CompressedLayer(keys, values, KeepPlan(idx[..., : int(lengths.max())], lengths[None]), n)
        layer.update(torch.randn(1, h, 1, d).to(dtype), torch.randn(1, h, 1, d).to(dtype))
        q = torch.randn(1, h * group, 1, d, generator=gen).to(dtype)
        dk = torch.randn(1, h, mean_len + 1, d, generator=gen).to(dtype)
        dv = torch.randn(1, h, mean_len + 1, d, generator=gen).to(dtype)

        t_var, t_dense = _timed_pair(
            partial(varlen_attention, q, layer, d**-0.5),
            partial(torch.nn.functional.scaled_dot_product_attention, q, dk, dv, scale=d**-0.5, enable_gqa=True),
            iters,
        )
        rows.append({"tokens_per_head": mean_len, "num_kv_heads": h, "group": group, "head_dim": d,
                     "varlen_ms": 1000 * t_var, "dense_ms": 1000 * t_dense, "ratio": t_var / t_dense,
                     "min_len": int(lengths.min()), "max_len": int(lengths.max())})
    return rows
