"""MixKV: inside each head, mix importance with diversity by how redundant the head is.

MixKV wraps a base method (``MixKV(SnapKV(budget=64))`` is the paper's "SnapKV + MixKV"):
the base keeps deciding how many tokens each layer and head gets; MixKV replaces only the
score that picks *which* tokens. A redundant head (keys all alike, as over blank image
regions) gains most from keeping far-apart keys; a non-redundant head keeps the important ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import scores
from ..profiles import Profile, load_profile
from .base import BudgetedMethod, LayerContext


@dataclass
class MixKV:
    """``s = r * s_div + (1 - r) * (s_ext + s_int)`` per head; allocation from ``base``.

    ``redundancy``: ``"online"`` (from the current prompt's keys, O(N)) or an offline
    :class:`~mixkv.profiles.Profile` / JSON path with ``key_redundancy`` per (layer, KV head).
    ``use_vnorm`` / ``use_diversity`` switch the two added terms (for ablations).
    """

    base: BudgetedMethod
    redundancy: str | Profile | Path = "online"
    use_vnorm: bool = True
    use_diversity: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.base, MixKV):
            raise ValueError("MixKV wraps a base method (SnapKV, PyramidKV, AdaKV, SparseMM), not another MixKV")
        if not isinstance(self.base, BudgetedMethod):
            raise ValueError(
                f"MixKV: base must be a method such as SnapKV(budget=64) or AdaKV(budget=64), got {self.base!r}"
            )
        if isinstance(self.redundancy, str) and self.redundancy == "online":
            return
        if not isinstance(self.redundancy, Profile):
            self.redundancy = load_profile(self.redundancy)
        if self.redundancy.key_redundancy is None:
            raise ValueError(
                f"MixKV: profile for {self.redundancy.model!r} has no key_redundancy; "
                "use redundancy='online' or calibrate with `mixkv calibrate`"
            )

    # Budget plumbing is the base's.
    @property
    def window(self) -> int:
        return self.base.window

    @property
    def budget(self) -> int | None:
        return self.base.budget

    @property
    def ratio(self) -> float | None:
        return self.base.ratio

    @property
    def name(self) -> str:
        return f"{self.base.name}+mixkv"

    @property
    def head_adaptive(self) -> bool:
        return getattr(self.base, "head_adaptive", False)

    def budget_per_sequence(self, ctx: LayerContext) -> torch.Tensor:
        return self.base.budget_per_sequence(ctx)

    @property
    def kernel(self) -> int:
        return self.base.kernel

    def validate_for(self, info) -> None:
        self.base.validate_for(info)
        if isinstance(self.redundancy, Profile):
            self.redundancy.check_shape(info)

    def allocate(self, ctx: LayerContext) -> torch.Tensor:
        return self.base.allocate(ctx)

    def head_redundancy(self, ctx: LayerContext) -> torch.Tensor:
        """``(B, H)`` redundancy of each head: online from the keys, or the profile's row."""
        if isinstance(self.redundancy, Profile):
            row = self.redundancy.key_redundancy[ctx.layer_idx].to(ctx.keys.device, torch.float32)
            return row[None, :].expand(ctx.keys.shape[0], -1).clamp(0.0, 1.0)
        return ctx.key_redundancy

    def score(self, ctx: LayerContext) -> torch.Tensor:
        s_ext, target = ctx.s_ext, ctx.s_ext_mean
        s_imp = s_ext
        if self.use_vnorm:
            s_imp = s_imp + scores.intrinsic_importance(ctx.values, ctx.window, target, ctx.cand_valid)
        if not self.use_diversity:
            return s_imp
        s_div = scores.diversity_from(ctx.k_hat, ctx.key_centroid, ctx.window, target, ctx.valid)
        return scores.mix(s_imp, s_div, self.head_redundancy(ctx))

    def describe(self) -> str:
        red = "online" if not isinstance(self.redundancy, Profile) else f"profile:{self.redundancy.model}"
        return f"MixKV({self.base.describe()}, redundancy={red})"
