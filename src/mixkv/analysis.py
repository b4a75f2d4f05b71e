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

Layout: pure maths first (tensors in, tensors out), then the figure functions (data in, PNG
out), then :func:`analyze` (model plumbing: prefill, plans, which figure gets what).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import scores
from .selection import KeepPlan

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


# ---------------------------------------------------------------------------------------------------
# maths (pure)


def token_similarity(states: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's average cosine similarity to the head's other tokens, in O(N).

    ``states`` ``(B, H, N, D)``; returns ``(B, H, N)``: ``(N <k̂_i, c> - 1) / (N - 1)`` with ``c`` the
    mean unit vector over valid tokens (so its mean over tokens is :func:`mixkv.scores.redundancy`).
    Padding gets NaN.
    """
    c = scores.key_centroid(states, valid)
    k_hat = F.normalize(states.float(), dim=-1, eps=scores.EPS)
    n = states.shape[-2] if valid is None else valid.sum(-1).float()[:, None, None]
    n = torch.as_tensor(n, dtype=torch.float32, device=states.device)
    sim = (n * (k_hat * c[:, :, None, :]).sum(-1) - 1.0) / (n - 1.0).clamp_min(1.0)
    if valid is not None:
        sim = sim.masked_fill(~valid[:, None, :], float("nan"))
    return sim


def project_2d(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA to 2-D by SVD of the centred ``(N, D)`` points: ``(coords (N, 2), explained variance ratio (2,))``.

    Signs are fixed (largest loading positive) so the picture is deterministic.
    """
    x = points.float() - points.float().mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[:2]
    flip = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
    comps = comps * torch.where(flip == 0, torch.ones_like(flip), flip)
    var = s**2
    return x @ comps.T, var[:2] / var.sum().clamp_min(1e-12)


def kept_mask(plan: KeepPlan, n: int, head: int, batch_index: int = 0) -> torch.Tensor:
    """``(n,)`` bool: prompt positions one head keeps."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[plan.indices[batch_index, head, : int(plan.lengths[batch_index, head])]] = True
    return mask


def kept_share(plans: dict[int, KeepPlan], num_layers: int, n: int, layer: int | None = None,
               head: int | None = None) -> torch.Tensor:
    """``(n,)``: share of KV heads keeping each position (over all layers, one layer, or one head).

    A layer without a plan was not compressed and keeps everything.
    """
    layers = range(num_layers) if layer is None else [layer]
    any_plan = next(iter(plans.values()), None)
    num_heads = 1 if any_plan is None else any_plan.indices.shape[1]
    total = torch.zeros(n)
    count = 0
    for li in layers:
        plan = plans.get(li)
        for h in range(num_heads) if head is None else [head]:  # plotting only: a small loop over heads
            total += kept_mask(plan, n, h).float() if plan is not None else torch.ones(n)
            count += 1
    return total / max(count, 1)


_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")


def repeated_sentence_spans(text: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Character spans of sentences that occur more than once in ``text`` (filler) and of the others."""
    found = [(m.start(), m.end(), m.group().strip()) for m in _SENTENCE.finditer(text) if m.group().strip()]
    counts: dict[str, int] = {}
    for *_, s in found:
        counts[s] = counts.get(s, 0) + 1
    repeated = [(a, b) for a, b, s in found if counts[s] > 1]
    unique = [(a, b) for a, b, s in found if counts[s] == 1]
    return repeated, unique


# ---------------------------------------------------------------------------------------------------
# figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the pixel size stays FIGSIZES * DPI
    _pyplot().close(fig)
    return path


def plot_redundancy_heatmap(matrix: torch.Tensor, path: str | Path, title: str,
                            label: str = "key redundancy (mean pairwise cosine of keys)") -> Path:
    """(a) Layers (rows) x KV heads (columns), values annotated when the grid is small."""
    plt = _pyplot()
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
    return _save(fig, path)


def plot_similarity_histograms(per_token: dict[str, torch.Tensor], per_head: dict[str, torch.Tensor],
                               path: str | Path, title: str, head_label: str) -> Path:
    """(b) Left: per-token average similarity by group in one head; right: group redundancy over heads."""
    plt = _pyplot()
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
    return _save(fig, path)


def plot_coverage(points: torch.Tensor, kept: dict[str, torch.Tensor], path: str | Path, title: str,
                  marks: torch.Tensor | None = None, explained: torch.Tensor | None = None,
                  window: int = 0) -> Path:
    """(c) One panel per method: dropped keys (grey, darker = later in the prompt), kept keys
    (coloured; the last ``window`` tokens, always kept, as black crosses), answer tokens (red rings)."""
    plt = _pyplot()
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
    return _save(fig, path)


def plot_kept_patches(image, grid: tuple[int, int], image_positions: torch.Tensor,
                      plans: dict[str, dict[int, KeepPlan]], num_layers: int, n: int, path: str | Path,
                      title: str, layer: int | None = None, head: int | None = None,
                      answer_patches: Sequence[int] = ()) -> Path:
    """(d) Per method, the share of KV heads keeping each patch, over the image.

    ``image`` a PIL image; ``grid`` ``(rows, cols)`` patches; ``image_positions`` ``(rows*cols,)``
    prompt positions of the image tokens in row-major patch order; ``plans`` method -> layer ->
    :class:`~mixkv.selection.KeepPlan` (batch index 0); ``layer`` / ``head`` restrict the share.
    """
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    plt = _pyplot()
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
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# plumbing: one analysis run


@dataclass
class AnalysisResult:
    files: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def token_groups(sample, prefill) -> dict[str, torch.Tensor] | None:
    """Two token groups to compare: image vs text (VLM), repeated vs unique sentences (text), else None."""
    n = prefill.prompt_length
    valid = prefill.layers[0].valid
    valid = torch.ones(n, dtype=torch.bool) if valid is None else valid[0].cpu()
    if prefill.image_mask is not None:
        image = prefill.image_mask[0].cpu() & valid
        return {"image tokens": image, "text tokens": valid & ~image}
    meta = getattr(sample, "meta", {}) or {}
    if "offsets" not in meta or "text" not in meta:
        return None
    from .calibration import _char_spans_to_mask

    region = sample.region_mask if sample.region_mask is not None else valid
    repeated, unique = repeated_sentence_spans(meta["text"])
    rep = _char_spans_to_mask(meta["offsets"], repeated) & region
    uni = _char_spans_to_mask(meta["offsets"], unique) & region & ~rep
    if not bool(rep.any()) or not bool(uni.any()):
        return None
    return {"repeated sentences (filler)": rep, "unique sentences (facts, question)": uni}


def analyze(model, samples: Sequence, out_dir: str | Path, *, model_name: str, budget: int = 64, window: int = 32,
            focus: int = 0, layer: int | None = None, head: int | None = None, profile=None) -> AnalysisResult:
    """Draw the four figures for ``samples`` (calibration samples, see :mod:`mixkv.calibration`).

    The heat map shows ``profile.key_redundancy`` when a profile is given, else the online
    redundancy averaged over ``samples``; figures (b)-(d) use ``samples[focus]``. ``layer`` /
    ``head`` pick the head of (b) and (c): by default the most redundant head outside layer 0.
    """
    from .methods import MixKV, SnapKV
    from .models import inspect_model
    from .prefill import build_cache, shared_prefill

    out_dir = Path(out_dir)
    result = AnalysisResult()
    if not samples:
        raise ValueError("analyze needs at least one prompt")
    focus_pre, online = None, []
    for i, sample in enumerate(samples):
        pre = shared_prefill(model, sample.inputs, window=window)
        online.append(torch.stack([scores.redundancy(c.keys, c.valid)[0].cpu() for c in pre.layers]))
        if i == focus:
            focus_pre = pre
        del pre
    sample, pre = samples[focus], focus_pre
    num_layers, n = len(pre.layers), pre.prompt_length
    if profile is not None:
        matrix, source = profile.key_redundancy, f"calibration profile ({profile.data.get('source', '?')}, " \
                                                 f"{profile.data.get('prompts', '?')} prompts)"
    else:
        matrix, source = torch.stack(online).mean(0), f"online, mean over {len(samples)} prompt(s)"
    rest = matrix[1:] if num_layers > 1 else matrix
    if layer is None:
        flat = int(rest.argmax())
        layer, head = flat // matrix.shape[1] + (1 if num_layers > 1 else 0), flat % matrix.shape[1]
    head = 0 if head is None else head
    if not (0 <= layer < num_layers and 0 <= head < matrix.shape[1]):
        raise ValueError(f"layer {layer} / head {head} out of range ({num_layers} layers, {matrix.shape[1]} KV heads)")
    per_layer = matrix.mean(1)
    result.summary.update(redundancy_source=source, redundancy_min=float(matrix.min()),
                          redundancy_max=float(matrix.max()), redundancy_mean=float(matrix.mean()),
                          redundancy_per_layer=[round(float(v), 3) for v in per_layer], layer=layer, head=head,
                          prompt_tokens=n)
    result.files["heatmap"] = plot_redundancy_heatmap(
        matrix, out_dir / FILES["heatmap"], f"{model_name}: key redundancy per layer and KV head\n{source}")

    if profile is not None and profile.head_scores is not None:
        steps = profile.data.get("counted_steps", "?")
        result.files["head_scores"] = plot_redundancy_heatmap(
            profile.head_scores, out_dir / FILES["head_scores"],
            f"{model_name}: SparseMM head scores per layer and KV head\n{source}, {steps} decoded answer tokens",
            label="hit rate: strongest attention lands on the answer region")

    cap = pre.layers[layer]
    groups = token_groups(sample, pre)
    if groups is None:
        result.skipped["histograms"] = "no two token groups in this prompt (no image, no repeated sentences)"
    else:
        sim = token_similarity(cap.keys, cap.valid)[0, head].cpu()
        per_token = {name: sim[mask] for name, mask in groups.items()}
        per_head = {}
        for name, mask in groups.items():
            per_head[name] = torch.cat([scores.redundancy(c.keys, mask[None].to(c.keys.device))[0].cpu()
                                        for c in pre.layers])
        result.summary["group_similarity_mean"] = {k: float(v.mean()) for k, v in per_token.items()}
        result.summary["group_redundancy_mean_over_heads"] = {k: float(v.mean()) for k, v in per_head.items()}
        result.files["histograms"] = plot_similarity_histograms(
            per_token, per_head, out_dir / FILES["histograms"],
            f"{model_name}: how alike are the keys of each token group", f"layer {layer}, KV head {head}")

    redundancy = profile if profile is not None else "online"
    methods = {f"SnapKV (budget {budget})": SnapKV(budget=budget, window=window),
               f"SnapKV + MixKV (budget {budget})": MixKV(SnapKV(budget=budget, window=window),
                                                         redundancy=redundancy)}
    info = inspect_model(model)
    for m in methods.values():
        m.validate_for(info)  # a profile made for another model raises here
    plans = {name: build_cache(pre, m, None)[1] for name, m in methods.items()}
    answer = sample.answer_mask.cpu() if getattr(sample, "answer_mask", None) is not None else None
    kept = {name: (kept_mask(p[layer], n, head) if layer in p else torch.ones(n, dtype=torch.bool))
            for name, p in plans.items()}
    if answer is not None:
        result.summary["answer_tokens_kept_share"] = {
            name: float(kept_share(p, num_layers, n)[answer].mean()) for name, p in plans.items()}
    k_hat = F.normalize(cap.keys[0, head].float(), dim=-1).cpu()
    coords, explained = project_2d(k_hat)
    r = float(matrix[layer, head])
    result.files["coverage"] = plot_coverage(
        coords, kept, out_dir / FILES["coverage"],
        f"{model_name}: keys of layer {layer}, KV head {head} (redundancy {r:.2f}), {n} tokens, budget {budget} "
        "-- PCA of unit keys", marks=answer, explained=explained, window=window)

    image = getattr(sample, "image", None)
    if image is None or getattr(sample, "grid", None) is None:
        result.skipped["patches"] = "not an image prompt"
    else:
        positions = sample.meta.get("image_positions")
        if positions is None:
            positions = pre.image_mask[0].nonzero().flatten().cpu()
        positions = torch.as_tensor(positions).long()
        patches = [] if answer is None else [i for i, p in enumerate(positions.tolist()) if bool(answer[p])]
        result.files["patches"] = plot_kept_patches(
            image, sample.grid, positions, plans, num_layers, n, out_dir / FILES["patches"],
            f"{model_name}: patches kept at budget {budget} (share of all layers' KV heads)",
            answer_patches=patches)
    return result
