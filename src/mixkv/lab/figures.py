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
