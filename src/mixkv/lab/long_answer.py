"""Long answers: what compression while decoding (``press(decode_budget=...)``) costs and saves.

One prompt is prefilled once; each configuration (full cache, a method, the same method with a
decode budget) then decodes the same number of tokens greedily from its own cache, recording the
KV bytes after every step and every step's time. Configurations run in turn, ``repeats`` times in a
round robin, so slow drift of the machine hits them alike; per-step times are the median over the
repeats. The answer is compared with the full cache's token by token (``same_as_full``: tokens equal
before the first difference), the cheapest sign that a bounded cache still follows the same path.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from ..core.capture import Prefill
from ..core.press import cache_kv_bytes
from ..core.registry import make_method
from .run import run_method

MIB = float(1 << 20)


@dataclass
class LongAnswerRow:
    """One configuration's decode of a long answer (times in ms, memory in MiB)."""

    method: str
    decode_budget: int | None
    every: int | None
    new_tokens: int
    ms_per_token: float  # mean over steps and repeats: the amortised cost, re-compressions included
    ms_per_token_median: float
    kv_mib_start: float  # after prefill (and compression)
    kv_mib_peak: float
    kv_mib_end: float
    decode_compressions: int
    recompress_ms_per_token: float
    same_as_full: int
    query_ring_mib: float = 0.0  # the press's recent queries (decode_budget), held besides the cache
    kv_mib_trace: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.method if self.decode_budget is None else f"{self.method} (decode {self.decode_budget})"


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def long_answer(model, prefill: Prefill, configs: Sequence[tuple[str, int | None]], budget: int, window: int,
                every: int, new_tokens: int, repeats: int = 1,
                progress: Callable[[str], None] | None = None) -> list[LongAnswerRow]:
    """Decode ``new_tokens`` for each ``(method, decode_budget)`` (``("full", None)`` for the full cache)."""
    methods = {c: None if c[0] == "full" else make_method(c[0], budget=budget, window=window) for c in configs}
    steps: dict[tuple, list[list[float]]] = {c: [] for c in configs}
    last: dict[tuple, object] = {}
    for rep in range(repeats):
        for c in configs:
            trace: list[int] = []
            run = run_method(model, prefill, methods[c], new_tokens, None, time_steps=True,
                             on_cache=lambda cache, t=trace: t.append(cache_kv_bytes(cache)),
                             on_step=lambda cache, t=trace: t.append(cache_kv_bytes(cache)),
                             decode_budget=c[1], every=every if c[1] is not None else None)
            steps[c].append(run.step_seconds)
            last[c] = (run, trace)
            if progress is not None:
                progress(f"repeat {rep + 1}/{repeats}: {c[0]}{'' if c[1] is None else f' decode {c[1]}'}")
    full_tokens = last[("full", None)][0].tokens if ("full", None) in last else None
    rows = []
    for c in configs:
        run, trace = last[c]
        per_step = [statistics.median(s) for s in zip(*steps[c], strict=True)]
        all_steps = [x for s in steps[c] for x in s]
        rows.append(LongAnswerRow(
            method=c[0], decode_budget=c[1], every=every if c[1] is not None else None, new_tokens=len(run.tokens),
            ms_per_token=1000 * statistics.fmean(all_steps), ms_per_token_median=1000 * statistics.median(per_step),
            kv_mib_start=trace[0] / MIB, kv_mib_peak=max(trace) / MIB, kv_mib_end=trace[-1] / MIB,
            decode_compressions=run.decode_compressions,
            recompress_ms_per_token=1000 * run.decode_compress_seconds / max(len(run.step_seconds), 1),
            same_as_full=_first_difference(run.tokens, full_tokens) if full_tokens is not None else len(run.tokens),
            query_ring_mib=run.query_ring_bytes / MIB, kv_mib_trace=[b / MIB for b in trace],
        ))
    return rows


def rows_to_dicts(rows: Sequence[LongAnswerRow]) -> list[dict]:
    return [asdict(r) for r in rows]
