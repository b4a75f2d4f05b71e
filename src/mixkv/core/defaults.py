"""Every default of the method spec, in one place (docs/method.md explains each one).

Methods, the registry, the press and the command line all read these names; a default is
never repeated as a literal elsewhere.
"""

from __future__ import annotations

WINDOW = 32
"""Observation window ``W``: the last prompt tokens whose queries score the rest; always kept."""

BUDGET = 64
"""Tokens kept per KV head, the window included (the paper's main setting; also 128, 256)."""

SERVING_BUDGET = 128
"""Budget of the vLLM plugin (``MIXKV_VLLM_BUDGET`` unset) and of ``mixkv compare``: serving and the
kvpress comparison are measured at 128 tokens per head, where a 135M model still answers."""

KERNEL = 5
"""SnapKV's 1-D average-pooling kernel over the window attention (stride 1, padding 2)."""

EPS = 1e-6
"""Epsilon of every min-max and rescale: a constant score row gives 0, never NaN."""

RANK_BITS = 12
"""Scores are ranked after rounding to ``RANK_BITS`` significant bits (relative 2.4e-4): float noise
(~1e-7 to 1e-6 relative: another batch shape, kernel or thread count) must not reorder tokens the
method scores the same. Grid ties go to the earlier position (AdaKV's split: the lower head)."""

PYRAMID_BETA = 20.0
"""PyramidKV: the top layer keeps ``(B - W) / beta`` candidates."""

ADAKV_FLOOR = 0.2
"""AdaKV: share of each head's budget kept uniform (``alpha``)."""

SPARSEMM_RATIO = 0.1
"""SparseMM: share of each head's budget kept uniform before the visual-head share."""

HEADKV_BETA = 1.5
"""HeadKV: each head gives ``(B - W) / beta`` of its budget to the model-wide pool shared by importance.

Fu et al. (ICLR 2025) tune ``beta`` per setting over {1.005, 1.01, 1.1, 1.2, 1.5, 2, 5, 10}; 1.5 is
the default of the authors' run scripts (``--beta``), so a third of each head's budget stays uniform.
"""

REDUNDANCY = "online"
"""MixKV's head redundancy: from the current prompt (``"online"``) unless a profile is given."""

DECODE_EVERY = 32
"""``press(decode_budget=...)``: a layer is re-compressed at most once per this many new tokens (it
grows to ``decode_budget + every`` tokens per head, then is cut back): the copy of the layer a
re-compression makes is amortised over ``every`` decoding steps."""
