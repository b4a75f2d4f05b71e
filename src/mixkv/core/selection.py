"""Turn a method's per-head counts and scores into kept positions: one batched selection per layer.

Selection is deterministic and padding-invariant: exact score ties are broken by position
(earlier first), through a stable sort, so a sequence keeps the same tokens alone and inside a
left-padded batch, and the same tokens on every run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .layer import LayerPrefill
from .scores import rank_grid


@dataclass
class KeepPlan:
    """Kept positions of one layer.

    ``indices`` ``(B, H, L)`` ascending positions into the prompt; entries past ``lengths``
    ``(B, H)`` are filler (set to 0) and must be ignored. The window is included.
    """

    indices: torch.Tensor
    lengths: torch.Tensor

    @property
    def uniform(self) -> bool:
        """True when every (sequence, head) keeps the same number of tokens."""
        return bool((self.lengths == self.lengths.flatten()[0]).all()) if self.lengths.numel() else True

    def valid(self) -> torch.Tensor:
        """``(B, H, L)`` True on real entries of ``indices``."""
        steps = torch.arange(self.indices.shape[-1], device=self.indices.device)
        return steps < self.lengths[..., None]


def select_topk(
    score: torch.Tensor, counts: torch.Tensor, cand_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``counts[b, h]`` candidates of each head by ``score``; padding is never picked.

    Returns ascending positions ``(B, H, K)`` (filler past the count) and the valid mask.
    """
    b, h, c = score.shape
    counts = torch.minimum(counts, cand_valid.sum(-1).expand(b, h))
    kmax = int(counts.max().item()) if counts.numel() else 0
    if kmax == 0:
        empty = torch.zeros(b, h, 0, dtype=torch.long, device=score.device)
        return empty, empty.bool()
    valid = cand_valid.expand(b, h, c)
    # Float noise must not reorder equal scores (see rank_grid); NaN would make the order undefined: lowest.
    s = rank_grid(score.float()).masked_fill(~valid, float("-inf"))
    s = torch.nan_to_num(s, nan=float("-inf"))
    # A stable descending sort breaks exact ties by position; top-k's tie order is unspecified.
    idx = s.sort(dim=-1, descending=True, stable=True).indices[..., :kmax]
    keep = torch.arange(kmax, device=score.device) < counts[..., None]
    # Sort the chosen positions ascending; filler goes to the end.
    big = torch.iinfo(torch.long).max
    idx = torch.where(keep, idx, torch.full_like(idx, big)).sort(dim=-1).values
    return torch.where(keep, idx, torch.zeros_like(idx)), keep


def plan_keep(method, layer: LayerPrefill) -> KeepPlan:
    """Positions one layer keeps under ``method``: top candidates per head plus the window."""
    b, h, n, _ = layer.keys.shape
    w = layer.window
    counts = method.allocate(layer)
    _check_counts(method, counts, (b, h))
    score = method.score(layer)
    if tuple(score.shape) != (b, h, layer.num_candidates):
        raise ValueError(f"{method.name}: score must have shape (B, H, C) = {(b, h, layer.num_candidates)}, "
                         f"got {tuple(score.shape)}")
    idx, keep = select_topk(score, counts, layer.cand_valid)
    counts = keep.sum(-1)
    window_pos = torch.arange(n - w, n, device=layer.keys.device).expand(b, h, w)
    # Short sequences in a padded batch: window positions that are padding are not kept.
    window_ok = layer.token_mask[..., n - w:].expand(b, h, w)
    k = idx.shape[-1]
    total = counts + window_ok.sum(-1)
    lmax = k + w
    # Place the window right after each head's own candidates.
    slots = torch.arange(lmax, device=layer.keys.device)
    indices = torch.zeros(b, h, lmax, dtype=torch.long, device=layer.keys.device)
    indices[..., :k] = idx
    # Window token j of head (b, h) goes to slot counts[b, h] + (j - n_pad_in_window).
    pad_in_window = (~window_ok).sum(-1, keepdim=True)
    dest = counts[..., None] + torch.arange(w, device=layer.keys.device) - pad_in_window
    dest = torch.where(window_ok, dest, torch.full_like(dest, lmax))  # out of range -> dropped below
    scratch = torch.zeros(b, h, lmax + 1, dtype=torch.long, device=layer.keys.device)
    scratch[..., :lmax] = indices
    scratch.scatter_(-1, dest, window_pos)
    indices = scratch[..., :lmax]
    indices = torch.where(slots < total[..., None], indices, torch.zeros_like(indices))
    trim = int(total.max().item()) if total.numel() else 0
    return KeepPlan(indices=indices[..., :trim], lengths=total)


def _check_counts(method, counts: torch.Tensor, shape: tuple[int, int]) -> None:
    """A method's allocation must be ``(B, H)`` non-negative integers: say which method broke it."""
    if tuple(counts.shape) != shape or counts.dtype.is_floating_point or bool((counts < 0).any()):
        raise ValueError(f"{method.name}: allocate must return (B, H) = {shape} non-negative integer counts, "
                         f"got {tuple(counts.shape)} {counts.dtype}")


def plan_layer(method, record: LayerPrefill, rows: list[int] | None = None, own_record: bool = True) -> KeepPlan | None:
    """The positions ``method`` keeps of one layer's record; None when every sequence fits its budget.

    The one entry point for "plan a layer": the press, the shared capture and the vLLM plugin all call it.
    ``rows``: compress only these sequences (the others keep every real token they hold); None: all.
    ``own_record=False``: ``record`` is already for this method's window and kernel, shared among
    methods (their scores are computed once; see :func:`mixkv.core.capture.build_stacked_cache`).
    """
    if rows is not None and len(rows) < record.keys.shape[0]:
        part = plan_layer(method, select_rows(record, rows), own_record=own_record)
        return None if part is None else merge_rows(keep_all_plan(record), rows, part)
    if own_record:
        record = record.for_method(method.window, method.kernel)
    elif (record.window, record.kernel) != (method.window, method.kernel):
        raise ValueError(f"record for window {record.window} / kernel {record.kernel}, method needs "
                         f"{method.window} / {method.kernel}")
    if not bool((record.n_valid > method.budget_per_sequence(record)).any()):
        return None
    return plan_keep(method, record)


def select_rows(record: LayerPrefill, rows: list[int]) -> LayerPrefill:
    """The record of ``rows`` only (every batched field sliced; scores are computed per row anyway)."""
    index = torch.tensor(rows, device=record.keys.device, dtype=torch.long)

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, index.to(t.device))

    return dataclasses.replace(
        record, queries=take(record.queries), keys=take(record.keys), values=take(record.values),
        valid=take(record.valid), image_mask=take(record.image_mask), real_length=take(record.real_length),
    )


def keep_all_plan(record: LayerPrefill) -> KeepPlan:
    """Every real token of every sequence and head, in order: what a sequence that is not compressed keeps."""
    b, h, n, _ = record.keys.shape
    keep = record.token_mask.expand(b, h, n)
    lengths = keep.sum(-1)
    positions = torch.arange(n, device=keep.device).expand(b, h, n)
    order = torch.where(keep, positions, torch.full_like(positions, n)).sort(-1).values
    order = order[..., : int(lengths.max()) if lengths.numel() else 0]
    return KeepPlan(torch.where(order < n, order, torch.zeros_like(order)), lengths)


def stack_plans(plans: list[KeepPlan]) -> KeepPlan:
    """One plan whose batch entries are ``plans``' entries in turn, filler padded to the longest."""
    width = max(p.indices.shape[-1] for p in plans)
    return KeepPlan(torch.cat([_widen(p.indices, width) for p in plans]), torch.cat([p.lengths for p in plans]))


def merge_rows(base: KeepPlan, rows: list[int], part: KeepPlan) -> KeepPlan:
    """``base`` with the plans of ``rows`` replaced by ``part`` (one row of ``part`` per entry of ``rows``)."""
    width = max(base.indices.shape[-1], part.indices.shape[-1])
    indices = _widen(base.indices, width).clone()
    lengths = base.lengths.clone()
    index = torch.tensor(rows, device=indices.device, dtype=torch.long)
    indices[index] = _widen(part.indices, width)
    lengths[index] = part.lengths
    # As wide as the longest kept row, no more: a uniform plan's layer stores every column as a token.
    return KeepPlan(indices[..., : int(lengths.max()) if lengths.numel() else 0], lengths)


def _widen(indices: torch.Tensor, width: int) -> torch.Tensor:
    pad = width - indices.shape[-1]
    return indices if pad == 0 else torch.nn.functional.pad(indices, (0, pad))
