"""``analyze``: one analysis run on a model: prefill the prompts, plan SnapKV and MixKV, draw the figures.

What each figure shows is in :mod:`mixkv.lab.analysis_figures`; the maths in :mod:`mixkv.lab.analysis`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core import defaults, scores
from ..core.capture import build_cache, capture_prefill
from ..core.methods import MixKV, SnapKV
from ..core.models import inspect_model
from .analysis import kept_mask, kept_share, project_2d, repeated_sentence_spans, token_similarity
from .analysis_figures import (
    FILES,
    plot_coverage,
    plot_kept_patches,
    plot_redundancy_heatmap,
    plot_similarity_histograms,
)
from .calibration.sources import char_spans_to_mask


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
    region = sample.region_mask if sample.region_mask is not None else valid
    repeated, unique = repeated_sentence_spans(meta["text"])
    rep = char_spans_to_mask(meta["offsets"], repeated) & region
    uni = char_spans_to_mask(meta["offsets"], unique) & region & ~rep
    if not bool(rep.any()) or not bool(uni.any()):
        return None
    return {"repeated sentences (filler)": rep, "unique sentences (facts, question)": uni}


def analyze(model, samples: Sequence, out_dir: str | Path, *, model_name: str, budget: int = defaults.BUDGET,
            window: int = defaults.WINDOW, focus: int = 0, layer: int | None = None, head: int | None = None,
            profile=None) -> AnalysisResult:
    """Draw the four figures for ``samples`` (calibration samples, see :mod:`mixkv.lab.calibration`).

    The heat map shows ``profile.key_redundancy`` when a profile is given, else the online
    redundancy averaged over ``samples``; figures (b)-(d) use ``samples[focus]``. ``layer`` /
    ``head`` pick the head of (b) and (c): by default the most redundant head outside layer 0.
    """
    out_dir = Path(out_dir)
    result = AnalysisResult()
    if not samples:
        raise ValueError("analyze needs at least one prompt")
    info = inspect_model(model)
    if profile is not None:  # checked before any figure is drawn: nothing half-written
        profile.check_shape(info)
        if profile.key_redundancy is None:
            raise ValueError(f"profile for {profile.model!r} has no key_redundancy; make one with `mixkv calibrate`")
    focus_pre, online = None, []
    for i, sample in enumerate(samples):
        pre = capture_prefill(model, sample.inputs, window=window)
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
