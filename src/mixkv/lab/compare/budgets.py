"""Budget matching: both sides keep the same number of tokens per KV head (window included).

For a prompt of N tokens kvpress gets ``compression_ratio = 1 - (B + 0.5) / N``, which keeps exactly
``int(N * (1 - ratio)) = B`` tokens per head (``run_kvpress.py`` asserts it with kvpress's own
``compute_n_kept``). With a ratio (the fraction removed) instead of a budget, mixkv gets
``int(N * (1 - ratio))`` per prompt: the count kvpress keeps.
"""

from __future__ import annotations


def kvpress_n_kept(n_tokens: int, compression_ratio: float) -> int:
    """Tokens per KV head kvpress keeps (``kvpress.utils.compute_n_kept``, repeated to avoid importing it)."""
    if compression_ratio >= 1.0:
        return 0
    return max(1, int(n_tokens * (1 - compression_ratio)))


def matched_ratio(n_tokens: int, budget: int) -> float:
    """kvpress's ``compression_ratio`` keeping exactly ``budget`` tokens per head of an N-token prompt.

    The ``+ 0.5`` makes the truncation land on ``budget`` despite float rounding.
    """
    if n_tokens <= budget:
        return 0.0
    return 1.0 - (budget + 0.5) / n_tokens


def mixkv_budget(n_tokens: int, settings: dict) -> int | None:
    """mixkv's budget (per KV head, window included) for one prompt; None: no compression."""
    window = int(settings.get("window", 32))
    if settings.get("budget") is not None:
        budget = int(settings["budget"])
        return None if n_tokens <= budget else budget
    ratio = float(settings["compression_ratio"])
    if ratio <= 0:
        return None
    kept = kvpress_n_kept(n_tokens, ratio)
    if kept <= window:
        raise ValueError(f"compression ratio {ratio} keeps {kept} tokens of a {n_tokens}-token prompt, not more "
                         f"than the window ({window}); use a smaller ratio")
    return None if kept >= n_tokens else kept
