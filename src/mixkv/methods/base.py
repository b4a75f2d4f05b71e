"""What every compression method shares: the per-layer inputs and budget resolution.

A method answers two questions for one layer: how many candidates each head keeps
(``allocate``) and which ones (``score``: higher is kept). The window is always kept on
top. Methods never touch the model or the cache; ``selection.plan_keep`` turns their answers
into kept positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from .. import scores


@dataclass
class LayerContext:
    """Everything one layer's compression needs, with shared scores computed once, lazily.

    ``queries`` ``(B, Hq, W, D)`` are the model's own last ``W`` prompt queries (after RoPE,
    M-RoPE included); ``keys``/``values`` ``(B, H, N, D)`` the layer's cache after prefill;
    ``valid`` ``(B, N)`` False on (left) padding; ``image_mask`` ``(B, N)`` True on image tokens.
    """

    layer_idx: int
    num_layers: int
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scaling: float
    window: int
    kernel: int = 5
    valid: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def num_candidates(self) -> int:
        return self.keys.shape[-2] - self.window

    @cached_property
    def valid_mask(self) -> torch.Tensor:
        if self.valid is not None:
            return self.valid
        b, _, n, _ = self.keys.shape
        return torch.ones(b, n, dtype=torch.bool, device=self.keys.device)

    @cached_property
    def cand_valid(self) -> torch.Tensor:
        """``(B, 1, C)``: real candidates (not padding)."""
        return self.valid_mask[:, None, : self.num_candidates]

    @cached_property
    def n_valid(self) -> torch.Tensor:
        """Real prompt length of each sequence, ``(B,)``."""
        return self.valid_mask.sum(dim=-1)

    @cached_property
    def n_cand(self) -> torch.Tensor:
        return (self.n_valid - self.window).clamp_min(0)

    @cached_property
    def s_ext(self) -> torch.Tensor:
        """SnapKV's pooled window attention on the candidates, ``(B, H, C)``."""
        return scores.extrinsic_importance(
            self.queries, self.keys, self.scaling, self.window, self.kernel, self.valid
        )

    @cached_property
    def k_hat(self) -> torch.Tensor:
        """Unit-normalised keys, shared by diversity and redundancy."""
        return scores.unit(self.keys)

    @cached_property
    def key_centroid(self) -> torch.Tensor:
        return scores.centroid_of(self.k_hat, self.valid)

    @cached_property
    def key_redundancy(self) -> torch.Tensor:
        """Online head redundancy ``(B, H)`` from this prompt's keys."""
        return scores.redundancy_from(self.key_centroid, scores.token_count(self.keys, self.valid))

    @cached_property
    def s_ext_mean(self) -> torch.Tensor:
        return scores.masked_mean(self.s_ext, self.cand_valid)


def resolve_budget(n_valid: torch.Tensor, budget: int | None, ratio: float | None, window: int) -> torch.Tensor:
    """Tokens kept per KV head (window included) for each sequence, ``(B,)``.

    With ``ratio``, a sequence keeps ``round(ratio * n)`` tokens but never fewer than the window.
    """
    if budget is not None:
        return torch.full_like(n_valid, budget)
    return torch.clamp(torch.round(n_valid.double() * ratio).long(), min=window)


@dataclass
class BudgetedMethod:
    """Budget, window and pooling shared by the base methods; validates them up front.

    ``budget`` is tokens kept per KV head *including* the window; ``ratio`` (fraction of the
    prompt kept) replaces it when given. Subclasses define ``allocate`` and ``score``.
    """

    budget: int | None = 64
    ratio: float | None = None
    window: int = 32
    kernel: int = 5

    name = "base"

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"{type(self).__name__}: window must be a positive int, got {self.window!r}")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"{type(self).__name__}: kernel must be an odd positive int, got {self.kernel!r}")
        if self.ratio is not None:
            if not isinstance(self.ratio, (int, float)) or not 0.0 < float(self.ratio) <= 1.0:
                raise ValueError(
                    f"{type(self).__name__}: ratio must be a fraction of the prompt in (0, 1], got {self.ratio!r}"
                )
            self.budget = None
            return
        if isinstance(self.budget, bool) or not isinstance(self.budget, int):
            raise ValueError(
                f"{type(self).__name__}: budget must be an int (tokens kept per KV head, window included) "
                f"or pass ratio=..., got {self.budget!r}"
            )
        if self.budget <= self.window:
            raise ValueError(
                f"{type(self).__name__}: budget ({self.budget}) must be larger than the window ({self.window}); "
                f"the budget counts the window, so use budget >= {self.window + 1} or a smaller window"
            )

    def budget_per_sequence(self, ctx: LayerContext) -> torch.Tensor:
        return resolve_budget(ctx.n_valid, self.budget, self.ratio, self.window)

    def base_per_sequence(self, ctx: LayerContext) -> torch.Tensor:
        """Candidates kept per head on average (``budget - W``), ``(B,)``."""
        return (self.budget_per_sequence(ctx) - self.window).clamp_min(0)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        """Selection score inside a head: SnapKV's ``s_ext`` unless a subclass says otherwise."""
        return ctx.s_ext

    def validate_for(self, info) -> None:  # noqa: B027 - optional hook
        """Check model-specific settings (profiles) against the model; raise a clear error."""

    def describe(self) -> str:
        size = f"budget={self.budget}" if self.budget is not None else f"ratio={self.ratio}"
        return f"{self.name}({size}, window={self.window})"
