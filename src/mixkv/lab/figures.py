"""PNG figures of lab results (matplotlib on the Agg backend): the one place that sets pyplot up."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.selection import KeepPlan
from .analysis import kept_share


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, tight: bool = True, dpi: int | None = None) -> Path:
    """Write ``fig`` as PNG (creating the folder) and close it."""
    if tight:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi) if dpi is not None else fig.savefig(path)
    pyplot().close(fig)
    return path


def time_memory_axes(a, b, xlabel: str) -> None:
    """Shared look of the decode-time (left) and KV-bytes (right) panels."""
    for ax, label in ((a, "decode time per token (ms)"), (b, "KV cache after prefill (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    b.set_yscale("log")


def kept_share_per_layer(plans: dict[int, KeepPlan], num_layers: int, n: int) -> torch.Tensor:
    """``(layers, n)``: the share of each layer's KV heads that kept each prompt position (1 = all)."""
    return torch.stack([kept_share(plans, num_layers, n, layer=layer) for layer in range(num_layers)])


def plot_kept_positions(kept: dict[str, dict[int, KeepPlan]], n: int, path: Path, marks: list[int] | None = None,
                        title: str = "") -> Path:
    """One heat-map panel per method: layers (rows) x prompt positions (columns)."""
    plt = pyplot()
    panels = {name: plans for name, plans in kept.items() if plans}
    if not panels:
        raise ValueError("nothing was compressed: no kept positions to draw")
    num_layers = 1 + max(max(p) for p in panels.values())
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 1.3 + 1.5 * len(panels)), dpi=110, squeeze=False)
    image = None
    for ax, (name, plans) in zip(axes[:, 0], panels.items()):
        share = kept_share_per_layer(plans, num_layers, n)
        image = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_ylabel(f"{name}\nlayer", fontsize=8)
        ax.tick_params(labelsize=7)
        for m in marks or []:
            ax.axvline(m, color="red", linewidth=0.8, alpha=0.8)
    axes[-1, 0].set_xlabel("prompt position (red: the tokens holding the answer)")
    fig.suptitle(title, fontsize=10)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="share of KV heads keeping the token", shrink=0.9)
    return save_figure(fig, path, tight=False)


def plot_bench(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Two panels vs context length: decode ms/token and KV MiB held after prefill, per method."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["context"], r["decode_ms_per_token"], r["kv_bytes"] / 2**20) for r in rows
                     if r["method"] == method)
        style = "--" if method == "full" else ("-" if "mixkv" in method else ":")
        a.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=method)
        b.plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=method)
    time_memory_axes(a, b, "prompt tokens")
    a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_accuracy(results: list[dict], path: str | Path, title: str) -> Path:
    """Accuracy vs budget per method (mean over tasks when present); full cache as a dashed line."""
    plt = pyplot()
    task = "mean" if any(r["task"] == "mean" for r in results) else results[0]["task"]
    rows = [r for r in results if r["task"] == task]
    fig, ax = plt.subplots(figsize=(8.4, 4.4), dpi=120)
    # one colour per base, so a base and its wrappers read as a family: base dotted, +mixkv solid, others dashed
    palette = plt.get_cmap("tab10").colors
    colours: dict[str, tuple] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["budget"], r["accuracy"]) for r in rows if r["method"] == method and r["budget"] is not None)
        full = [r["accuracy"] for r in rows if r["method"] == method and r["budget"] is None]
        if full:
            ax.axhline(100 * full[0], color="black", linestyle="--", linewidth=1, label=f"{method}")
        elif pts:
            base, _, wrapper = method.partition("+")
            colour = colours.setdefault(base, palette[len(colours) % len(palette)])
            style = ":" if not wrapper else ("-" if wrapper == "mixkv" else "--")
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, color=colour, marker="o", label=method)
    ax.set_xscale("log", base=2)
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("budget (tokens kept per KV head, window included)")
    ax.set_ylabel(f"accuracy (%) — {task}")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return save_figure(fig, path)


def plot_long_answer(rows, path: str | Path, title: str = "") -> Path:
    """KV MiB held after every decoded token, one line per configuration (full, method, method with a
    decode budget): a bounded cache is a flat line; the legend gives the amortised ms per token."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.4), dpi=110)
    for r in rows:
        style = "--" if r.method == "full" else ("-" if r.decode_budget is not None else ":")
        ax.plot(range(len(r.kv_mib_trace)), r.kv_mib_trace, style, label=f"{r.label}: {r.ms_per_token:.0f} ms/token")
    ax.set_xlabel("decoded tokens")
    ax.set_ylabel("KV cache held (MiB)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def _base_of(method: str) -> str:
    return method.removesuffix("+mixkv")


def _method_styles(methods) -> dict[str, dict]:
    """One colour per base method; ``+mixkv`` solid with filled markers, the base dotted and hollow."""
    plt = pyplot()
    bases = list(dict.fromkeys(_base_of(m) for m in methods if m != "full"))
    colours = plt.get_cmap("tab10")
    out = {}
    for m in methods:
        colour = colours(bases.index(_base_of(m)) % 10) if m != "full" else "black"
        mix = m.endswith("+mixkv")
        out[m] = {"color": colour, "linestyle": "-" if mix else ":", "marker": "o",
                  "markerfacecolor": colour if mix else "white"}
    return out


def plot_accuracy_by_task(results: list[dict], path: str | Path, title: str) -> Path:
    """One panel per task (and the mean): accuracy vs budget per method, full cache dashed.

    Colour = base method; solid line with filled markers = the base with MixKV, dotted = the base alone.
    """
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in results if r["task"] != "mean"))
    if any(r["task"] == "mean" for r in results):
        tasks.append("mean")
    methods = list(dict.fromkeys(r["method"] for r in results))
    styles = _method_styles(methods)
    budgets = sorted({r["budget"] for r in results if r["budget"] is not None})
    cols = min(3, len(tasks))
    rows_n = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.3 * cols, 3.4 * rows_n), dpi=110, squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        rows = [r for r in results if r["task"] == task]
        for m in methods:
            full = [r["accuracy"] for r in rows if r["method"] == m and r["budget"] is None]
            pts = sorted((r["budget"], r["accuracy"]) for r in rows if r["method"] == m and r["budget"] is not None)
            if full:
                ax.axhline(100 * full[0], color="black", linestyle="--", linewidth=1, label=m)
            elif pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], label=m, markersize=4, linewidth=1.2,
                        **styles[m])
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_ylim(-2, 102)
        ax.set_title(task, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("accuracy (%)")
    axes[-1, 0].set_xlabel("budget (tokens per KV head)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(7, len(labels)), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    return save_figure(fig, path, tight=False)


def plot_gap(summary: list[dict], maps: dict[str, torch.Tensor], path: str | Path, title: str,
             budget: int) -> Path:
    """The gap analysis in three panels.

    Left: accuracy vs the mean share of answer tokens kept, one point per (method, budget).
    Middle: failures at ``budget`` split into *answer dropped* and *kept but wrong* per method.
    Right: per layer, the share of (head, answer token) pairs kept at ``budget`` (``maps``: method ->
    (layers, heads) from :func:`mixkv.lab.gap.heads_map`).
    """
    plt = pyplot()
    methods = list(dict.fromkeys(r["method"] for r in summary))
    styles = _method_styles(methods)
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.6), dpi=110)
    for m in methods:
        pts = sorted((r["budget"] or 0, r["answer_kept"], r["accuracy"]) for r in summary if r["method"] == m)
        st = styles[m]
        if m == "full":
            a.scatter([p[1] * 100 for p in pts], [p[2] * 100 for p in pts], color="black", marker="*", s=80, label=m)
            continue
        a.plot([p[1] * 100 for p in pts], [p[2] * 100 for p in pts], color=st["color"], linestyle=st["linestyle"],
               marker="o", markerfacecolor=st["markerfacecolor"], linewidth=1, markersize=5, label=m)
    a.set_xlabel("answer tokens kept (% of layer x head x token)")
    a.set_ylabel("accuracy (%)")
    a.grid(alpha=0.3)
    a.legend(fontsize=6, ncol=2)
    a.set_title("accuracy vs answer kept (points: budgets)", fontsize=9)
    at = [r for r in summary if r["budget"] == budget]
    names = [r["method"] for r in at]
    x = range(len(at))
    dropped = [100 * r["dropped"] / r["n"] for r in at]
    wrong = [100 * r["kept_but_wrong"] / r["n"] for r in at]
    b.bar(x, dropped, color="tab:red", label="answer dropped (a token in < 50% of heads)")
    b.bar(x, wrong, bottom=dropped, color="tab:gray", label="answer kept, reply wrong")
    b.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
    b.set_ylabel(f"failures at B={budget} (% of samples)")
    b.legend(fontsize=7)
    b.grid(alpha=0.3, axis="y")
    b.set_title(f"what the failures miss (B={budget})", fontsize=9)
    for m, share in maps.items():
        st = styles.get(m, {"color": "black", "linestyle": "-"})
        per_layer = share.mean(1).numpy() * 100
        c.plot(range(len(per_layer)), per_layer, color=st["color"], linestyle=st["linestyle"], linewidth=1.2, label=m)
    c.set_xlabel("layer")
    c.set_ylabel("answer tokens kept (% of heads x tokens)")
    c.set_ylim(-2, 102)
    c.grid(alpha=0.3)
    c.legend(fontsize=6, ncol=2)
    c.set_title(f"where in the model (B={budget})", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
