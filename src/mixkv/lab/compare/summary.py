"""From run records to the report: aggregation per (context, method, side), kvpress/mixkv ratios,
and the cross-check of the two implementations (same answers, same kept positions).

Pure functions on plain dicts (the run records both sides write), so they are tested on fake runs.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .prompts import score_text
from .protocol import PEER, REPORT_FORMAT, method_order


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(runs: Sequence[dict]) -> dict[tuple[int, str, str], dict]:
    """Per (context, method, impl): medians of the timings (decode: over all steps of all prompts),
    mean KV bytes and accuracy (``score`` must already be set on each run)."""
    groups: dict[tuple[int, str, str], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(int(r["context"]), r["method"], r["impl"])].append(r)
    return {key: _summarize_group(key, rs) for key, rs in groups.items()}


def _summarize_group(key: tuple[int, str, str], rs: list[dict]) -> dict:
    steps = [t for r in rs for t in r.get("decode_step_ms") or []]
    extra = [r["peak_rss_mib"] - r["rss_before_mib"] for r in rs
             if r.get("peak_rss_mib") is not None and r.get("rss_before_mib") is not None]
    return {
        "context": key[0], "method": key[1], "impl": key[2], "n": len(rs),
        "prompt_tokens": _mean([r["prompt_tokens"] for r in rs]),
        "kept_per_head": _mean([r.get("kept_per_head") for r in rs]),
        "prefill_s": _median([r["prefill_s"] for r in rs]),
        "compress_s": _median([r.get("compress_s") for r in rs]),
        "decode_ms_per_token": _median(steps) if steps else _median([r.get("decode_ms_per_token") for r in rs]),
        "kv_bytes": _mean([r["kv_bytes"] for r in rs]),
        "kv_bytes_unmasked": _mean([r.get("kv_bytes_unmasked", r["kv_bytes"]) for r in rs]),
        "peak_rss_mib": max((r["peak_rss_mib"] for r in rs if r.get("peak_rss_mib") is not None), default=None),
        "peak_extra_mib": _median(extra),
        "accuracy": _mean([r.get("score") for r in rs]),
    }


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, None when either is missing or the denominator is 0."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def kept_overlap(a: list | None, b: list | None) -> list[float] | None:
    """Per layer: identical kept (head, position) pairs / the larger of the two kept counts.

    ``a`` and ``b`` are ``[layer][kv_head] -> positions``. 1.0 means the same tokens were kept.
    """
    if not a or not b or len(a) != len(b):
        return None
    out = []
    for la, lb in zip(a, b):
        if len(la) != len(lb):
            return None
        same = sum(len(set(ha) & set(hb)) for ha, hb in zip(la, lb))
        total = max(sum(len(h) for h in la), sum(len(h) for h in lb))
        out.append(same / total if total else 1.0)
    return out


def alloc_difference(a: list | None, b: list | None) -> float | None:
    """Mean over layers and heads of ``|kept_a - kept_b| / mean kept``: 0 when every head keeps as many.

    ``a`` and ``b`` are ``[layer][kv_head] -> count`` (AdaKV moves budget between heads).
    """
    if not a or not b or len(a) != len(b):
        return None
    diffs = []
    for la, lb in zip(a, b):
        if len(la) != len(lb) or not la:
            return None
        mean = (sum(la) + sum(lb)) / (2 * len(la))
        diffs.extend(abs(x - y) / mean if mean else 0.0 for x, y in zip(la, lb))
    return statistics.mean(diffs)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first decoded token that differs (None: identical over the common length)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def agreement(mixkv_runs: Sequence[dict], kvpress_runs: Sequence[dict]) -> dict[tuple[int, str], dict]:
    """Per (context, method): identical answers, identical correctness, kept-position overlap."""
    by_key = {(r["prompt_id"], r["method"]): r for r in kvpress_runs}
    groups: dict[tuple[int, str], list[tuple[dict, dict]]] = defaultdict(list)
    for m in mixkv_runs:
        k = by_key.get((m["prompt_id"], PEER.get(m["method"], m["method"])))
        if k is not None:
            groups[(int(m["context"]), m["method"])].append((m, k))
    return {key: _agreement_group(pairs) for key, pairs in groups.items()}


def _agreement_group(pairs: list[tuple[dict, dict]]) -> dict:
    overlaps = [kept_overlap(m.get("kept"), k.get("kept")) for m, k in pairs]
    overlaps = [o for o in overlaps if o]
    by_layer = [statistics.mean(col) for col in zip(*overlaps)] if overlaps else None
    first_steps = [first_divergence(m["decode_tokens"], k["decode_tokens"]) for m, k in pairs
                   if m.get("decode_tokens") and k.get("decode_tokens")]
    allocs = [alloc_difference(m.get("kept_counts"), k.get("kept_counts")) for m, k in pairs]
    allocs = [a for a in allocs if a is not None]
    return {
        "n": len(pairs),
        "same_answer": sum(m["tokens"] == k["tokens"] for m, k in pairs) / len(pairs),
        "same_correctness": sum(m.get("score") == k.get("score") for m, k in pairs) / len(pairs),
        "first_divergent_token": first_steps,
        "kept_overlap": statistics.mean(by_layer) if by_layer else None,
        "kept_overlap_by_layer": by_layer,
        "alloc_difference": statistics.mean(allocs) if allocs else None,
    }


def compare_rows(summary: dict[tuple[int, str, str], dict], agree: dict[tuple[int, str], dict] | None = None
                 ) -> list[dict]:
    """One row per (context, method) present on either side; ratios are kvpress / mixkv."""
    agree = agree or {}
    keys = sorted({(c, m) for c, m, _ in summary}, key=lambda k: (k[0], method_order(k[1])))
    rows = []
    for ctx, method in keys:
        m = summary.get((ctx, method, "mixkv"), {})
        k = summary.get((ctx, PEER.get(method, method), "kvpress"), {})
        row: dict[str, Any] = {"context": ctx, "method": method,
                               "prompt_tokens": m.get("prompt_tokens", k.get("prompt_tokens")),
                               "kept_per_head": m.get("kept_per_head", k.get("kept_per_head"))}
        for field in ("prefill_s", "compress_s", "decode_ms_per_token", "kv_bytes", "kv_bytes_unmasked",
                      "peak_rss_mib", "peak_extra_mib", "accuracy", "n"):
            row[f"mixkv_{field}"] = m.get(field)
            row[f"kvpress_{field}"] = k.get(field)
        for field in ("prefill_s", "compress_s", "decode_ms_per_token", "kv_bytes", "peak_extra_mib"):
            row[f"ratio_{field}"] = ratio(k.get(field), m.get(field))
        a = agree.get((ctx, method), {})
        row["same_answer"] = a.get("same_answer")
        row["kept_overlap"] = a.get("kept_overlap")
        rows.append(row)
    return rows


def _strip(runs: Sequence[dict]) -> list[dict]:
    """Runs without the bulky kept positions (their overlap is in the agreement section)."""
    return [{k: v for k, v in r.items() if k != "kept"} for r in runs]


def build_report(spec: dict, mixkv_runs: list[dict], kvpress_data: dict, extra: dict | None = None) -> dict:
    """Score both sides with mixkv's scorer, summarise, pair up; the JSON written by ``mixkv compare``."""
    prompts = {p["id"]: p for p in spec["prompts"]}
    kv_runs = kvpress_data["runs"]
    for r in list(mixkv_runs) + list(kv_runs):
        r["score"] = score_text(prompts[r["prompt_id"]], r.get("text", ""))
    summary = summarize(list(mixkv_runs) + list(kv_runs))
    agree = agreement(mixkv_runs, kv_runs)
    return {
        "format": REPORT_FORMAT, "version": 1, "settings": spec["settings"], "rows": compare_rows(summary, agree),
        "agreement": [{"context": c, "method": m, **v} for (c, m), v in sorted(agree.items())],
        "kvpress": {k: v for k, v in kvpress_data.items() if k != "runs"},
        "runs": {"mixkv": _strip(mixkv_runs), "kvpress": _strip(kv_runs)},
        **(extra or {}),
    }
