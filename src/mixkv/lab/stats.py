"""Intervals for the accuracies we report: pure functions, no I/O.

Why Wilson and not the normal approximation: our n per cell is 20-200 and accuracies sit near 0 or 1
(a full cache answers 95-100% of toy-VLM questions), where the normal interval leaves [0, 1] and is too
narrow. Wilson's score interval stays inside [0, 1] and keeps close to its nominal coverage there.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (both bounds in [0, 1]).

    ``successes`` may be fractional (a mean of per-sample scores in [0, 1] times n); ``n`` must be positive.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n] = [0, {n}], got {successes}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test_p(b: int, c: int) -> float:
    """Exact two-sided sign-test (McNemar) p-value of ``b`` vs ``c`` discordant pairs.

    Paired prompts: ``b`` answered right only by the first method, ``c`` only by the second. Under "no
    difference" each discordant pair goes either way with probability 1/2.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got {b}, {c}")
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2**m
    return min(1.0, 2 * tail)


def scores_by_prompt(samples: Iterable[dict]) -> dict[tuple[str, str, int | None], dict[int, float]]:
    """``(task, method, budget) -> {prompt index: score}`` from an eval's per-sample records: the pairing
    every paired test needs (a method's answer and another's on the same prompt)."""
    out: dict[tuple[str, str, int | None], dict[int, float]] = defaultdict(dict)
    for s in samples:
        out[(s["task"], s["method"], s["budget"])][s["index"]] = float(s["score"])
    return out
