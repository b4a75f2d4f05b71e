"""Pictures of redundancy and of what compression keeps, in the spirit of the MixKV paper.

Four figures (PNG, matplotlib with the Agg backend, fixed pixel sizes: ``FIGSIZES`` at ``DPI``):

(a) ``redundancy_heatmap.png``: key redundancy (average pairwise cosine of a head's keys) per
    layer x KV head, from a calibration profile or measured on the analysed prompts.
(b) ``similarity_histograms.png``: per-token average key similarity (each token's mean cosine to
    the head's other tokens) of two token groups -- image vs text tokens for a VLM prompt,
    repeated (filler) vs unique sentences for a text prompt -- in one head, and the groups'
    redundancy over all heads of the model.
(c) ``coverage.png``: a 2-D projection (SVD/PCA of the unit-normalised keys) of one head's keys,
    with the tokens kept by SnapKV (importance only) and by SnapKV + MixKV marked.
(d) ``kept_patches.png``: for an image prompt, the share of KV heads keeping each patch per
    method, overlaid on the image (skipped for text prompts).

With a profile that has SparseMM scores, ``head_scores_heatmap.png`` shows them like (a).

This module draws them (data in, PNG out); the maths is in :mod:`mixkv.lab.analysis` and the run
(prefill, plans, which figure gets what) in :mod:`mixkv.lab.analyze`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..core.selection import KeepPlan
from .analysis import kept_share
from .figures import pyplot, save_figure

DPI = 100
FIGSIZES = {  # inches; pixels = inches * DPI
    "heatmap": (7.0, 8.0),
    "histograms": (12.0, 4.8),
    "coverage": (12.0, 5.6),
    "patches": (12.0, 5.0),
}
FILES = {"heatmap": "redundancy_heatmap.png", "histograms": "similarity_histograms.png",
         "coverage": "coverage.png", "patches": "kept_patches.png", "head_scores": "head_scores_heatmap.png"}


def expected_pixels(kind: str) -> tuple[int, int]:
    """``(width, height)`` in pixels of a figure of ``kind`` (see ``FIGSIZES``)."""
    w, h = FIGSIZES["heatmap" if kind == "head_scores" else kind]
    return round(w * DPI), round(h * DPI)


def plot_redundancy_heatmap(matrix: torch.Tensor, path: str | Path, title: str,
                            label: str = "key redundancy (mean pairwise cosine of keys)") -> Path:
    """(a) Layers (rows) x KV heads (columns), values annotated when the grid is small."""
    plt = pyplot()
    m = torch.as_tensor(matrix).float()
    layers, heads = m.shape
    fig, ax = plt.subplots(figsize=FIGSIZES["heatmap"], dpi=DPI)
    im = ax.imshow(m.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-6, float(m.max())),
                   interpolation="nearest")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    step = max(1, layers // 16)
    ax.set_yticks(range(0, layers, step))
    if layers * heads <= 160:
        for i in range(layers):
            for j in range(heads):
                v = float(m[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.6 * float(m.max()) else "black")
    fig.colorbar(im, ax=ax, label=label, shrink=0.9)
    ax.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.1, right=0.95, top=0.92, bottom=0.07)
    return save_figure(fig, path, tight=False, dpi=DPI)


def plot_similarity_histograms(per_token: dict[str, torch.Tensor], per_head: dict[str, torch.Tensor],
                               path: str | Path, title: str, head_label: str) -> Path:
    """(b) Left: per-token average similarity by group in one head; right: group redundancy over heads."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=FIGSIZES["histograms"], dpi=DPI)
    def bins(groups: dict[str, torch.Tensor]):
        v = torch.cat([x[torch.isfinite(x)].float() for x in groups.values()])
        lo, hi = (float(v.min()), float(v.max())) if v.numel() else (0.0, 1.0)
        pad = max(0.02, 0.05 * (hi - lo))
        return torch.linspace(lo - pad, hi + pad, 41).numpy()

    for name, values in per_token.items():
        v = values[torch.isfinite(values)].numpy()
        a.hist(v, bins=bins(per_token), alpha=0.55, density=True, label=f"{name} (n={len(v)}, mean {v.mean():.2f})")
    a.set_xlabel("average cosine similarity of a token's key to the other keys")
    a.set_ylabel("density")
    a.set_title(head_label, fontsize=9)
    a.legend(fontsize=8)
    for name, values in per_head.items():
        v = values[torch.isfinite(values)].numpy()
        b.hist(v, bins=bins(per_head), alpha=0.55, label=f"{name} (mean {v.mean():.2f})")
    b.set_xlabel("redundancy of the group's keys in one head (mean pairwise cosine)")
    b.set_ylabel("number of (layer, KV head)")
    b.set_title("across all heads of the model", fontsize=9)
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.86, bottom=0.12, wspace=0.2)
    return save_figure(fig, path, tight=False, dpi=DPI)


def plot_coverage(points: torch.Tensor, kept: dict[str, torch.Tensor], path: str | Path, title: str,
                  marks: torch.Tensor | None = None, explained: torch.Tensor | None = None,
                  window: int = 0) -> Path:
    """(c) One panel per method: dropped keys (grey, darker = later in the prompt), kept keys
    (coloured; the last ``window`` tokens, always kept, as black crosses), answer tokens (red rings)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(kept), figsize=FIGSIZES["coverage"], dpi=DPI, squeeze=False,
                             sharex=True, sharey=True)
    p = points.numpy()
    n = p.shape[0]
    pos = torch.arange(n).numpy()
    in_window = torch.arange(n) >= n - window
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    for k, (ax, (name, mask)) in enumerate(zip(axes[0], kept.items())):
        drop = (~mask).numpy()
        chosen = (mask & ~in_window).numpy()
        ax.scatter(p[drop, 0], p[drop, 1], s=6, c=pos[drop], cmap="Greys", vmin=-0.4 * n, vmax=1.4 * n,
                   label=f"dropped ({int(drop.sum())}; darker = later)")
        ax.scatter(p[chosen, 0], p[chosen, 1], s=16, c=colours[k % len(colours)],
                   label=f"kept by the score ({int(chosen.sum())})")
        if window:
            w = in_window.numpy()
            ax.scatter(p[w, 0], p[w, 1], s=14, c="black", marker="x", linewidths=0.8,
                       label=f"window, always kept ({int(w.sum())})")
        if marks is not None and bool(marks.any()):
            got = int((marks & mask).sum())
            ax.scatter(p[marks, 0], p[marks, 1], s=70, facecolors="none", edgecolors="red", linewidths=1.3,
                       label=f"answer tokens ({got}/{int(marks.sum())} kept)")
        ax.set_title(name, fontsize=10)
        ev = "" if explained is None else f" ({100 * float(explained[0]):.0f}% of variance)"
        ax.set_xlabel(f"principal component 1{ev}")
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    ev = "" if explained is None else f" ({100 * float(explained[1]):.0f}% of variance)"
    axes[0, 0].set_ylabel(f"principal component 2{ev}")
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.86, bottom=0.1, wspace=0.08)
    return save_figure(fig, path, tight=False, dpi=DPI)


def plot_kept_patches(image, grid: tuple[int, int], image_positions: torch.Tensor,
                      plans: dict[str, dict[int, KeepPlan]], num_layers: int, n: int, path: str | Path,
                      title: str, layer: int | None = None, head: int | None = None,
                      answer_patches: Sequence[int] = ()) -> Path:
    """(d) Per method, the share of KV heads keeping each patch, over the image.

    ``image`` a PIL image; ``grid`` ``(rows, cols)`` patches; ``image_positions`` ``(rows*cols,)``
    prompt positions of the image tokens in row-major patch order; ``plans`` method -> layer ->
    :class:`~mixkv.core.selection.KeepPlan` (batch index 0); ``layer`` / ``head`` restrict the share.
    """
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    plt = pyplot()
    rows, cols = grid
    positions = torch.as_tensor(image_positions).long()
    if positions.numel() != rows * cols:
        raise ValueError(f"{positions.numel()} image positions for a {rows}x{cols} patch grid")
    # Dropped patches are darkened, kept ones left clear: black with alpha 0.85 * (1 - share).
    shade = ListedColormap([(0.0, 0.0, 0.0, 0.85 * (1.0 - v)) for v in np.linspace(0.0, 1.0, 256)])
    fig, axes = plt.subplots(1, len(plans), figsize=FIGSIZES["patches"], dpi=DPI, squeeze=False)
    width, height = image.size
    im = None
    for ax, (name, method_plans) in zip(axes[0], plans.items()):
        share = kept_share(method_plans, num_layers, n, layer, head)[positions].reshape(rows, cols)
        ax.imshow(np.asarray(image.convert("RGB")), extent=(0, width, height, 0))
        im = ax.imshow(share.numpy(), extent=(0, width, height, 0), cmap=shade, vmin=0.0, vmax=1.0,
                       interpolation="nearest")
        pw, ph = width / cols, height / rows
        for p in answer_patches:
            r, c = divmod(int(p), cols)
            ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, fill=False, edgecolor="cyan", linewidth=1.5))
        answer = f", answer cells {float(share.flatten()[list(answer_patches)].mean()):.2f}" if answer_patches else ""
        ax.set_title(f"{name}\nmean share {float(share.mean()):.2f}{answer}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(left=0.02, right=0.86, top=0.82, bottom=0.04, wspace=0.05)
    bar = fig.colorbar(im, cax=fig.add_axes([0.89, 0.1, 0.015, 0.68]))
    bar.set_label("share of KV heads keeping the patch (dark: dropped)")
    fig.suptitle(title + ("  (cyan: answer cells)" if answer_patches else ""), fontsize=10)
    return save_figure(fig, path, tight=False, dpi=DPI)


