"""The comparison's figure: decode time and KV bytes against context, both sides on shared axes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..figures import pyplot, save_figure, time_memory_axes
from .protocol import ADAKV_AS_KVPRESS, METHODS, PEER
from .tables import to_mib

COLORS = dict(zip((*METHODS, ADAKV_AS_KVPRESS), ("tab:gray", "tab:blue", "tab:orange", "tab:red")))


def plot_compare(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Decode ms/token and KV MiB after prefill vs context: mixkv solid, kvpress dashed."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for method in dict.fromkeys(r["method"] for r in rows):
        for impl, style in (("mixkv", "-"), ("kvpress", "--")):
            if impl == "kvpress" and method in PEER:  # a mixkv-only row; kvpress's line is its peer's
                continue
            pts = sorted((r["context"], r[f"{impl}_decode_ms_per_token"], to_mib(r[f"{impl}_kv_bytes"])) for r in rows
                         if r["method"] == method and r[f"{impl}_decode_ms_per_token"] is not None)
            if not pts:
                continue
            kw = {"color": COLORS.get(method), "marker": "o" if impl == "mixkv" else "s",
                  "label": f"{method} ({impl})"}
            a.plot([p[0] for p in pts], [p[1] for p in pts], style, **kw)
            b.plot([p[0] for p in pts], [p[2] for p in pts], style, **kw)
    time_memory_axes(a, b, "context (tokens)")
    a.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
