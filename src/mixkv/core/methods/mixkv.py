"""MixKV: inside each head, mix importance with diversity by how redundant the head is.

Paper: Liu, Gui, Zhang, Zhang, "Mixing Importance with Diversity: Joint Optimization for KV
Cache Compression in Large Vision-Language Models", ICLR 2026. Spec: ``docs/method.md``, "MixKV".

MixKV wraps a base method (``MixKV(SnapKV(budget=64))`` is the paper's "SnapKV + MixKV"):
the base keeps deciding how many tokens each layer and head gets; MixKV replaces only the
score that picks *which* tokens. A redundant head (keys all alike, as over blank image
regions) gains most from keeping far-apart keys; a non-redundant head keeps the important ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .. import defaults, scores
from ..layer import LayerPrefill
from ..models import ModelInfo
from ..profiles import Profile, load_profile
from .base import ScoreWrapper


@dataclass
class MixKV(ScoreWrapper):
    """``s = r * s_div + (1 - r) * (s_ext + s_int)`` per head; budgets and allocation from ``base``.

    Parameters:

    * ``base``: the base method (SnapKV, PyramidKV, AdaKV, SparseMM, HeadKV);
    * ``redundancy``: ``"online"`` (default: from the current prompt's keys, O(N)) or an offline
      :class:`~mixkv.core.profiles.Profile` / JSON path with ``key_redundancy`` per (layer, KV head);
    * ``use_vnorm`` / ``use_diversity``: switch the two added terms off (for ablations);
    * ``diversity``: ``"prompt"`` (the paper: distance from the centroid of all prompt keys) or
      ``"modality"`` (from the centroid of the token's own modality, image or text; a text prompt is
      one modality, so it is the paper's score there) -- see :class:`MixKVModality`.
    """

    redundancy: str | Profile | Path = defaults.REDUNDANCY
    use_vnorm: bool = True
    use_diversity: bool = True
    diversity: str = "prompt"

    suffix = "mixkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.diversity not in ("prompt", "modality"):
            raise ValueError(f"MixKV: diversity must be 'prompt' or 'modality', got {self.diversity!r}")
        if isinstance(self.redundancy, str) and self.redundancy == "online":
            return
        if not isinstance(self.redundancy, (Profile, str, Path)):
            raise ValueError(
                f"MixKV: redundancy must be 'online', a calibration Profile or a profile JSON path, "
                f"got {self.redundancy!r}"
            )
        if not isinstance(self.redundancy, Profile):
            self.redundancy = load_profile(self.redundancy)
        if self.redundancy.key_redundancy is None:
            raise ValueError(
                f"MixKV: profile for {self.redundancy.model!r} has no key_redundancy; "
                "use redundancy='online' or calibrate with `mixkv calibrate`"
            )

    def validate_for(self, info: ModelInfo) -> None:
        super().validate_for(info)
        if isinstance(self.redundancy, Profile):
            self.redundancy.check_shape(info)

    def head_redundancy(self, layer: LayerPrefill) -> torch.Tensor:
        """``(B, H)`` redundancy of each head: online from the keys, or the profile's row."""
        if isinstance(self.redundancy, Profile):
            row = self.redundancy.key_redundancy[layer.layer_idx].to(layer.keys.device, torch.float32)
            return row[None, :].expand(layer.keys.shape[0], -1).clamp(0.0, 1.0)
        return layer.key_redundancy

    def score(self, layer: LayerPrefill) -> torch.Tensor:
        s_ext, target = layer.s_ext, layer.s_ext_mean
        s_imp = s_ext
        if self.use_vnorm:
            s_imp = s_imp + scores.intrinsic_importance(layer.values, layer.window, target, layer.cand_valid)
        if not self.use_diversity:
            return s_imp
        if self.diversity == "modality" and layer.image_mask is not None:
            s_div = scores.diversity_within_groups(layer.k_hat, layer.image_mask, layer.window, target, layer.valid)
        else:
            s_div = scores.diversity_from(layer.k_hat, layer.key_centroid, layer.window, target, layer.valid)
        return scores.mix(s_imp, s_div, self.head_redundancy(layer))

    def describe(self) -> str:
        red = "online" if not isinstance(self.redundancy, Profile) else f"profile:{self.redundancy.model}"
        extra = ", diversity=modality" if self.diversity != "prompt" else ""
        return f"{type(self).__name__}({self.base.describe()}, redundancy={red}{extra})"


@dataclass
class MixKVModality(MixKV):
    """MixKV with diversity measured inside each modality (``"<base>+mixkv-modal"``): an option, not the paper.

    On an image prompt the image tokens' diversity is their distance from the image centroid, the text
    tokens' from the text centroid, each min-max normalised within its modality; importance, redundancy
    and budgets are MixKV's. Text-only prompts (and re-compressions, which do not track modality) get the
    paper's score. Why: see :func:`mixkv.core.scores.diversity_within_groups`.
    """

    diversity: str = "modality"

    suffix = "mixkv-modal"
    reads_modality: ClassVar[bool] = True

