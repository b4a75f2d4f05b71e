"""Readable tables and PNG plots of evaluation and benchmark results (no computation here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with aligned columns (also valid GitHub markdown)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)) + " |"
              for r in cells[1:]]
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _numeric(text: str) -> bool:
    try:
        float(text.rstrip("%x"))
        return True
    except ValueError:
        return False


def accuracy_tables(results: list[dict]) -> str:
    """One table per task (and the mean): rows = method, columns = budget, cells = accuracy %."""
    budgets = sorted({r["budget"] for r in results if r["budget"] is not None})
    methods = list(dict.fromkeys(r["method"] for r in results))
    tasks = list(dict.fromkeys(r["task"] for r in results if r["task"] != "mean"))
    if any(r["task"] == "mean" for r in results):
        tasks.append("mean")
    out = []
    for task in tasks:
        rows = []
        for m in methods:
            by_budget = {r["budget"]: r for r in results if r["task"] == task and r["method"] == m}
            if None in by_budget:  # full cache: same value in every column
                rows.append([m] + [f"{100 * by_budget[None]['accuracy']:.0f}%"] * len(budgets))
            else:
                rows.append([m] + [f"{100 * by_budget[b]['accuracy']:.0f}%" if b in by_budget else None
                                   for b in budgets])
        n = max((r["n"] for r in results if r["task"] == task), default=0)
        out.append(f"{task} (n={n})\n" + format_table(["method"] + [f"B={b}" for b in budgets], rows))
    return "\n\n".join(out)


def plot_accuracy(results: list[dict], path: str | Path, title: str) -> Path:
    """Accuracy vs budget per method (mean over tasks when present); full cache as a dashed line."""
    from .plots import pyplot, save_figure

    plt = pyplot()
    task = "mean" if any(r["task"] == "mean" for r in results) else results[0]["task"]
    rows = [r for r in results if r["task"] == task]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["budget"], r["accuracy"]) for r in rows if r["method"] == method and r["budget"] is not None)
        full = [r["accuracy"] for r in rows if r["method"] == method and r["budget"] is None]
        if full:
            ax.axhline(100 * full[0], color="black", linestyle="--", linewidth=1, label=f"{method}")
        elif pts:
            style = "-" if "mixkv" in method else ":"
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, marker="o", label=method)
    ax.set_xscale("log", base=2)
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("budget (tokens kept per KV head, window included)")
    ax.set_ylabel(f"accuracy (%) — {task}")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)
