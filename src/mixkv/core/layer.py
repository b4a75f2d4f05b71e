"""One record of a layer's prefill: what a method sees when it compresses that layer.

The press fills a :class:`LayerPrefill` right after a decoder layer's prefill (or the shared
capture in :mod:`mixkv.core.capture` keeps one per layer); methods read it and never touch the
model or the cache. Scores that several methods or terms share (``s_ext``, unit keys, centroid,
online redundancy) are computed lazily, once per record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

import torch

from . import defaults, scores


@dataclass
class LayerPrefill:
    """A decoder layer's prefill as the model computed it.

    ``queries`` ``(B, Hq, W, D)``: the model's own last ``W`` prompt queries (after its rotary
    embedding, Qwen-VL's M-RoPE included). ``keys`` / ``values`` ``(B, H, N, D)``: the layer's
    cache after prefill (keys after RoPE). ``scaling``: the attention's softmax scale.
    ``valid`` ``(B, N)``: False on padding, None when the batch has none; or ``(B, H, N)`` when the
    heads of a sequence hold different tokens (re-compressing a compressed layer: each head's held
    tokens right-aligned, so the last ``W`` slots are the same, most recent tokens in every head).
    ``image_mask`` ``(B, N)``: True on image tokens (``input_ids == image_token_id``), None for
    text prompts and at re-compressions (later turns, decoding: which held token came from an
    image is not tracked). No built-in method reads it; it is the hook for modality-aware methods (a
    method that treats visual and text tokens differently reads it from here).
    ``window`` / ``kernel``: the method's observation window and pooling kernel.
    ``real_length`` ``(B,)``: real tokens of each whole sequence so far when the record holds only
    part of it (a re-compression); a ``ratio`` budget is a share of it. None: ``n_valid``.
    """

    layer_idx: int
    num_layers: int
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scaling: float
    window: int = defaults.WINDOW
    kernel: int = defaults.KERNEL
    valid: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None
    real_length: torch.Tensor | None = None

    def for_method(self, window: int, kernel: int) -> LayerPrefill:
        """A fresh record for a method with ``window <= self.window`` (no lazily computed scores shared).

        A shared capture keeps the largest window any method needs; each method sees its own last
        ``window`` queries, and its scores are computed (and freed) with its own record.
        """
        if window > self.window:
            raise ValueError(f"method window {window} exceeds the captured window {self.window}")
        return dataclasses.replace(self, queries=self.queries[:, :, -window:], window=window, kernel=kernel)

    # ---- shape facts ------------------------------------------------------------------------
    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def num_candidates(self) -> int:
        """Candidate positions ``C = N - W`` (padded batch: counts padding too)."""
        return self.keys.shape[-2] - self.window

    @cached_property
    def token_mask(self) -> torch.Tensor:
        """``(B, 1, N)`` (or ``(B, H, N)`` with per-head ``valid``): True on real tokens."""
        if self.valid is not None:
            return scores.head_mask(self.valid)
        b, _, n, _ = self.keys.shape
        return torch.ones(b, 1, n, dtype=torch.bool, device=self.keys.device)

    @cached_property
    def cand_valid(self) -> torch.Tensor:
        """``(B, 1, C)`` (or ``(B, H, C)``): real candidates (not padding)."""
        return self.token_mask[..., : self.num_candidates]

    @cached_property
    def n_valid(self) -> torch.Tensor:
        """Real tokens of each sequence, ``(B,)`` (per-head ``valid``: its longest head)."""
        return self.token_mask.sum(dim=-1).amax(dim=-1)

    @cached_property
    def n_cand(self) -> torch.Tensor:
        """Real candidates of each sequence (``n_valid - W``, at least 0), ``(B,)``."""
        return (self.n_valid - self.window).clamp_min(0)

    @cached_property
    def head_cand(self) -> torch.Tensor:
        """Real candidates of each (sequence, head), ``(B, H)``: the most a head can keep."""
        per = (self.token_mask[..., : self.num_candidates].sum(dim=-1))
        return per.expand(self.keys.shape[0], self.num_kv_heads)

    # ---- shared scores --------------------------------------------------------------------------
    @cached_property
    def s_ext(self) -> torch.Tensor:
        """SnapKV's pooled window attention on the candidates, ``(B, H, C)``."""
        return scores.extrinsic_importance(
            self.queries, self.keys, self.scaling, self.window, self.kernel, self.valid
        )

    @cached_property
    def s_ext_mean(self) -> torch.Tensor:
        """Mean of ``s_ext`` over each head's real candidates, ``(B, H, 1)``: the scale of added terms."""
        return scores.masked_mean(self.s_ext, self.cand_valid)

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
