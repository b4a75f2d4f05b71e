#!/usr/bin/env python3
"""One table from several lmms-eval runs of mixkv twins: a row per method, a column per benchmark metric.

    python scripts/lmms_table.py out/lmms-qwen25vl7b            # every *_results.json below it

lmms-eval prints one table per run; a compression study runs one per (method, budget). This reads each run's
``*_results.json`` (method = the ``method=`` / ``budget=`` / ``ratio=`` of its ``model_args``) and, when
``--log_samples`` was given, its ``*_samples_*.jsonl`` for the mean per-sample KV cache the plugin logged
(``token_counts[0].kv_bytes``, relative to ``kv_bytes_full``) and compression time. Standard library only.

Decision: per benchmark one headline metric (``--metrics`` overrides): the first of lmms-eval's metric names
listed in ``HEADLINE`` that the run reports, else every metric without ``stderr``; values are printed as
lmms-eval reports them (most in [0, 1], OCRBench's too, TextCaps' CIDEr unbounded).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

HEADLINE = ("anls", "relaxed_overall", "exact_match", "ocrbench_accuracy", "CIDEr", "screenspot_Center_ACC",
            "accuracy")


def method_of(model_args: str) -> str:
    """``snapkv+mixkv@64`` / ``snapkv@r0.1`` / ``full`` from an lmms-eval ``model_args`` string."""
    parts = dict(p.split("=", 1) for p in str(model_args).split(",") if "=" in p)
    method = parts.get("method", "snapkv+mixkv")
    if method == "full":
        return "full"
    if "ratio" in parts:
        return f"{method}@r{parts['ratio']}"
    return f"{method}@{parts.get('budget', 64)}"


def headline(metrics: dict, wanted: list[str] | None) -> dict[str, float]:
    names = {k.split(",", 1)[0]: v for k, v in metrics.items()
             if "," in k and "stderr" not in k and isinstance(v, (int, float))}
    for name in wanted or HEADLINE:
        if name in names:
            return {name: names[name]}
    return names if wanted is None else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("roots", nargs="+", help="folders given to lmms-eval as --output_path")
    p.add_argument("--metrics", default=None, help="comma list of metric names to show (default: HEADLINE)")
    args = p.parse_args(argv)
    wanted = args.metrics.split(",") if args.metrics else None
    cells: dict[str, dict[str, float]] = defaultdict(dict)
    kv: dict[str, list[float]] = defaultdict(list)
    ms: dict[str, list[float]] = defaultdict(list)
    columns: list[str] = []
    for root in args.roots:
        for path in sorted(Path(root).rglob("*_results.json")):
            payload = json.loads(path.read_text())
            method = method_of(payload.get("config", {}).get("model_args", ""))
            for task, metrics in payload.get("results", {}).items():
                for name, value in headline(metrics, wanted).items():
                    col = f"{task} {name}"
                    if col not in columns:
                        columns.append(col)
                    cells[method][col] = value
            stamp = path.name[: -len("_results.json")]
            for samples in path.parent.glob(f"{stamp}_samples_*.jsonl"):
                for line in samples.read_text().splitlines():
                    counts = (json.loads(line).get("token_counts") or [None])[0] or {}
                    if counts.get("kv_bytes") is not None and counts.get("kv_bytes_full"):
                        kv[method].append(counts["kv_bytes"] / counts["kv_bytes_full"])
                    if counts.get("compress_ms") is not None:
                        ms[method].append(counts["compress_ms"])
    if not cells:
        print(f"no *_results.json under {', '.join(args.roots)}", file=sys.stderr)
        return 1
    header = ["method", *columns, "KV kept (mean)", "compress ms (mean)"]
    rows = [header]
    for method in sorted(cells, key=lambda m: (m != "full", m)):
        row = [method] + [f"{cells[method][c]:.4g}" if c in cells[method] else "-" for c in columns]
        row.append(f"{sum(kv[method]) / len(kv[method]):.3f}" if kv[method] else "-")
        row.append(f"{sum(ms[method]) / len(ms[method]):.1f}" if ms[method] else "-")
        rows.append(row)
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows[1:]:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
