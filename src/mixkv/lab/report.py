"""Readable plain-text tables (also GitHub markdown) of lab results: no computation, no plotting."""

from __future__ import annotations

from collections.abc import Sequence


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
    """One table per task (and the mean): rows = method, columns = budget, cells = accuracy %.

    Rows with ``accuracy_near`` (grounding within one cell) get their own table after the task's.
    """
    near = [dict(r, task=f"{r['task']} within one cell", accuracy=r["accuracy_near"])
            for r in results if "accuracy_near" in r]
    if near:
        out_rows: list[dict] = []
        for r in results:
            out_rows.append(r)
            out_rows.extend(x for x in near if x["task"] == f"{r['task']} within one cell"
                            and (x["method"], x["budget"]) == (r["method"], r["budget"]))
        results = out_rows
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
        headers = ["method"] + [f"B={b}" for b in budgets]
        if not budgets:  # only the full cache was run: one accuracy column
            headers = ["method", "accuracy"]
            rows = [[m, f"{100 * r['accuracy']:.0f}%"] for m in methods for r in results
                    if r["task"] == task and r["method"] == m]
        out.append(f"{task} (n={n})\n" + format_table(headers, rows))
    return "\n\n".join(out)


def gap_table(summary: list[dict], results: list[dict]) -> str:
    """The gap analysis (:func:`mixkv.lab.gap.gap_summary` rows) as a table, with the share of the
    base -> full gap each ``+mixkv`` method closes."""
    from .gap import gap_closed

    rows = []
    for r in summary:
        closed = gap_closed(results, r["method"].removesuffix("+mixkv"), r["budget"]) \
            if r["method"].endswith("+mixkv") and r["budget"] else None
        rows.append([r["method"], r["budget"] or "-", f"{100 * r['accuracy']:.1f}%", f"{100 * r['answer_kept']:.1f}%",
                     f"{100 * r['dropped'] / r['n']:.1f}%", f"{100 * r['kept_but_wrong'] / r['n']:.1f}%",
                     "-" if r["accuracy_when_kept"] is None else f"{100 * r['accuracy_when_kept']:.1f}%",
                     "-" if closed is None else f"{100 * closed:.0f}%"])
    return "gap analysis (all tasks)\n" + format_table(
        ["method", "budget", "accuracy", "answer kept", "failed: dropped", "failed: kept", "acc. when kept",
         "gap closed"], rows)
