"""The side-by-side tables ``mixkv compare`` prints: time, then memory, accuracy and agreement."""

from __future__ import annotations

from collections.abc import Sequence

from ..report import format_table

TIME_HEADERS = ["context", "method", "tokens", "prefill s mixkv", "prefill s kvpress", "kvpress/mixkv",
                "compress ms mixkv", "compress ms kvpress", "decode ms/tok mixkv", "decode ms/tok kvpress",
                "kvpress/mixkv"]
MEMORY_HEADERS = ["context", "method", "kept/head", "KV MiB mixkv", "KV MiB kvpress", "kvpress/mixkv",
                  "peak +MiB mixkv", "peak +MiB kvpress", "right mixkv", "right kvpress", "same answer",
                  "kept overlap"]


def to_ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def to_mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _acc(value: float | None, n: int | None) -> str:
    """``right/n`` when the count is known (clearer than a fraction for a handful of prompts)."""
    if value is None:
        return "-"
    return f"{value:.2f}" if not n else f"{round(value * n)}/{n}"


def _time_row(r: dict) -> list:
    return [r["context"], r["method"], _f(r["prompt_tokens"], ".0f"),
            _f(r["mixkv_prefill_s"], ".3f"), _f(r["kvpress_prefill_s"], ".3f"), _x(r["ratio_prefill_s"]),
            _f(to_ms(r["mixkv_compress_s"]), ".1f"), _f(to_ms(r["kvpress_compress_s"]), ".1f"),
            _f(r["mixkv_decode_ms_per_token"], ".1f"), _f(r["kvpress_decode_ms_per_token"], ".1f"),
            _x(r["ratio_decode_ms_per_token"])]


def _memory_row(r: dict) -> list:
    return [r["context"], r["method"], _f(r["kept_per_head"], ".0f"),
            _f(to_mib(r["mixkv_kv_bytes"]), ".2f"), _f(to_mib(r["kvpress_kv_bytes"]), ".2f"),
            _x(r["ratio_kv_bytes"]), _f(r["mixkv_peak_extra_mib"], ".0f"), _f(r["kvpress_peak_extra_mib"], ".0f"),
            _acc(r["mixkv_accuracy"], r["mixkv_n"]), _acc(r["kvpress_accuracy"], r["kvpress_n"]),
            _f(r["same_answer"], ".2f"), _f(r["kept_overlap"], ".3f")]


def format_tables(rows: Sequence[dict]) -> str:
    """Two plain-text tables (GitHub markdown) of :func:`~mixkv.lab.compare.summary.compare_rows`."""
    t1 = format_table(TIME_HEADERS, [_time_row(r) for r in rows])
    t2 = format_table(MEMORY_HEADERS, [_memory_row(r) for r in rows])
    return f"{t1}\n\n{t2}"
