"""A slow, obviously-correct reference for docs/method.md (MixKV and the base methods).

Written independently of ``mixkv`` (nothing is imported from it): plain Python loops over batch,
heads and positions, Python floats in double precision (``math.fsum`` for sums), exact
``Fraction`` arithmetic for budgets. Tensors are only read (``tolist``) on the way in and built
on the way out for comparison.

Padding is handled in the most literal way possible: each sequence is first *stripped* of its
(left) padding, every score is computed on the real tokens only, and positions are shifted back
by the number of padding tokens at the end. Padding therefore cannot receive attention, enter a
min/max/mean/centroid/redundancy, or be kept, by construction.

Conventions (the library's choices where the papers leave room, as docs/method.md states them):
  * pooling: average pool, kernel 5, stride 1, zero padding 2, divide by the kernel size
    (``count_include_pad``), over the candidate positions only;
  * window query ``i`` (position ``N - W + i``) sees keys ``0 .. N - W + i``; logits times
    ``scaling``; mean over window queries and over the ``G`` query heads of a KV head
    (query head ``j`` belongs to KV head ``j // G``);
  * min-max: ``(x - min) / (max - min + 1e-6)``; rescale: ``x * mean(s_ext) / (mean(x) + 1e-6)``;
  * unit vectors ``k / max(|k|, 1e-6)``; centroid over all real prompt keys (window included);
  * redundancy: explicit mean over ordered pairs ``i != j`` of cosine similarities, clamped to
    [0, 1]; a single token has redundancy 0;
  * PyramidKV counts truncated (floor); AdaKV shares ``count (1 - a) + a base``, SparseMM shares
    ``ratio base + (1 - ratio) base L H p`` and HeadKV shares ``(base - base / beta) + p (base / beta) L H``
    (both over the whole model) turned into integers that sum to exactly the budget: largest
    remainders, ties to the lower index, capped at the candidates with the excess spread over the
    other heads in proportion to their shares;
  * HeadKV-R2 retrieval-reasoning mass: per decoding step and query head, the attention weights of the
    ``k`` strongest keys (``k`` = number of answer tokens, ties to the earlier position) that lie on the
    answer, divided by ``k``; mean over the query heads of a group, summed over counted steps;
  * a sequence whose real length ``n <= budget`` keeps all its real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Small helpers on Python lists
# ---------------------------------------------------------------------------------------------


def dot(a: list[float], b: list[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b))


def norm(a: list[float]) -> float:
    return math.sqrt(dot(a, a))


def unit(a: list[float]) -> list[float]:
    n = max(norm(a), EPS)
    return [x / n for x in a]


def mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs)


def softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = math.fsum(e)
    return [x / s for x in e]


def minmax(xs: list[float]) -> list[float]:
    """``(x - min) / (max - min + eps)``; an empty list stays empty."""
    if not xs:
        return []
    lo, hi = min(xs), max(xs)
    return [(x - lo) / (hi - lo + EPS) for x in xs]


def rescale(xs: list[float], target: float) -> list[float]:
    """``x * target / (mean(x) + eps)``."""
    if not xs:
        return []
    m = mean(xs)
    return [x * target / (m + EPS) for x in xs]


def avg_pool(xs: list[float], kernel: int) -> list[float]:
    """Stride 1, zero padding ``kernel // 2`` on both sides, always divided by ``kernel``."""
    if kernel <= 1:
        return list(xs)
    half = kernel // 2
    out = []
    for i in range(len(xs)):
        total = 0.0
        for j in range(i - half, i + half + 1):
            if 0 <= j < len(xs):
                total += xs[j]
        out.append(total / kernel)
    return out


def real_length(valid, b: int, n_total: int) -> int:
    """Number of real tokens of sequence ``b`` (left padding: they are the last ones)."""
    if valid is None:
        return n_total
    row = [bool(x) for x in valid[b].tolist()]
    n = sum(row)
    # The reference relies on left padding: the real tokens are exactly the last n.
    assert row == [False] * (n_total - n) + [True] * n, "reference expects left padding"
    return n


# ---------------------------------------------------------------------------------------------
# Per (sequence, KV head) scores on the stripped (padding-free) sequence
# ---------------------------------------------------------------------------------------------


def head_window_attention(qs: list[list[list[float]]], keys: list[list[float]], n_pad_queries: int,
                          scaling: float) -> list[float]:
    """Attention over the ``n`` real keys of one KV head.

    ``qs[g][i]`` is window query ``i`` of query head ``g`` of the group (all ``W`` of them, in
    padded order); the first ``n_pad_queries`` sit on padding (only when ``n < W``) and are
    skipped. Query ``i`` sits at stripped position ``n - W + i`` and sees keys ``0 .. n - W + i``.
    """
    n = len(keys)
    w = len(qs[0])
    acc = [0.0] * n
    rows = 0
    for g in range(len(qs)):
        for i in range(n_pad_queries, w):
            pos = n - w + i
            logits = [dot(qs[g][i], keys[j]) * scaling for j in range(pos + 1)]
            probs = softmax(logits)
            for j in range(pos + 1):
                acc[j] += probs[j]
            rows += 1
    return [a / rows for a in acc] if rows else acc


@dataclass
class HeadScores:
    """All scores of one (sequence, KV head), on the stripped sequence (positions 0 .. n-1)."""

    attn: list[float]  # (n,) window attention
    s_ext: list[float]  # (c,) pooled, c = n - W real candidates
    target: float  # mean(s_ext)
    s_int: list[float]  # (c,) VNorm, min-max, rescaled
    s_div: list[float]  # (c,) diversity, min-max, rescaled
    r: float  # online key redundancy

    @property
    def s_imp(self) -> list[float]:
        return [a + b for a, b in zip(self.s_ext, self.s_int)]

    def mixed(self, r: float) -> list[float]:
        return [r * d + (1 - r) * i for d, i in zip(self.s_div, self.s_imp)]


def head_pairwise_redundancy(keys: list[list[float]]) -> float:
    """Mean over ordered pairs ``i != j`` of ``cos(k_i, k_j)``, clamped to [0, 1]."""
    n = len(keys)
    if n < 2:
        return 0.0
    hats = [unit(k) for k in keys]
    total = []
    for i in range(n):
        for j in range(n):
            if i != j:
                total.append(dot(hats[i], hats[j]))
    return min(1.0, max(0.0, math.fsum(total) / (n * (n - 1))))


def head_diversity(keys: list[list[float]], n_cand: int, target: float) -> list[float]:
    hats = [unit(k) for k in keys]
    d = len(keys[0])
    centroid = [math.fsum(h[t] for h in hats) / len(hats) for t in range(d)]
    raw = [-dot(hats[i], centroid) for i in range(n_cand)]
    return rescale(minmax(raw), target)


def head_intrinsic(values: list[list[float]], n_cand: int, target: float) -> list[float]:
    return rescale(minmax([norm(values[i]) for i in range(n_cand)]), target)


def head_scores(qs, keys, values, n_pad_queries: int, scaling: float, window: int, kernel: int,
                with_redundancy: bool = True) -> HeadScores:
    n = len(keys)
    n_cand = max(n - window, 0)
    attn = head_window_attention(qs, keys, n_pad_queries, scaling)
    s_ext = avg_pool(attn[:n_cand], kernel)
    target = mean(s_ext) if s_ext else 0.0
    return HeadScores(
        attn=attn,
        s_ext=s_ext,
        target=target,
        s_int=head_intrinsic(values, n_cand, target),
        s_div=head_diversity(keys, n_cand, target),
        r=head_pairwise_redundancy(keys) if with_redundancy else float("nan"),
    )


# ---------------------------------------------------------------------------------------------
# Batched wrappers with the library's shapes (padded layout, zeros on padding)
# ---------------------------------------------------------------------------------------------


def _strip(t: torch.Tensor, b: int, h: int, n: int) -> list[list[float]]:
    """Real rows (the last ``n`` positions) of ``t[b, h]`` as lists of doubles."""
    return t[b, h].double().tolist()[t.shape[-2] - n:]


def _group_queries(queries: torch.Tensor, b: int, h: int, g: int) -> list[list[list[float]]]:
    return [queries[b, h * g + gg].double().tolist() for gg in range(g)]


def window_attention(queries, keys, scaling, valid=None) -> torch.Tensor:
    bsz, hq, w, _ = queries.shape
    _, nh, n_total, _ = keys.shape
    g = hq // nh
    out = torch.zeros(bsz, nh, n_total, dtype=torch.float64)
    for b in range(bsz):
        n = real_length(valid, b, n_total)
        off = n_total - n
        for h in range(nh):
            attn = head_window_attention(_group_queries(queries, b, h, g), _strip(keys, b, h, n),
                                         max(w - n, 0), scaling)
            for j in range(n):
                out[b, h, off + j] = attn[j]
    return out


def _per_head(fn, keys_like, window, valid):
    """Loop helper: ``fn(b, h, n) -> list over real candidates``; returns (B, H, C) padded."""
    bsz, nh, n_total, _ = keys_like.shape
    c_total = n_total - window
    out = torch.zeros(bsz, nh, c_total, dtype=torch.float64)
    for b in range(bsz):
        n = real_length(valid, b, n_total)
        off = n_total - n
        for h in range(nh):
            xs = fn(b, h, n)
            for j, x in enumerate(xs):
                out[b, h, off + j] = x
    return out


def extrinsic_importance(queries, keys, scaling, window, kernel=5, valid=None) -> torch.Tensor:
    g = queries.shape[1] // keys.shape[1]
    w = queries.shape[2]

    def fn(b, h, n):
        attn = head_window_attention(_group_queries(queries, b, h, g), _strip(keys, b, h, n), max(w - n, 0), scaling)
        return avg_pool(attn[: max(n - window, 0)], kernel)

    return _per_head(fn, keys, window, valid)


def intrinsic_importance(values, window, target_mean, valid=None) -> torch.Tensor:
    """``target_mean`` ``(B, H, 1)``; ``valid`` ``(B, N)`` (not the candidate mask)."""
    return _per_head(
        lambda b, h, n: head_intrinsic(_strip(values, b, h, n), max(n - window, 0), float(target_mean[b, h, 0])),
        values, window, valid,
    )


def diversity(keys, window, target_mean, valid=None) -> torch.Tensor:
    return _per_head(
        lambda b, h, n: head_diversity(_strip(keys, b, h, n), max(n - window, 0), float(target_mean[b, h, 0])),
        keys, window, valid,
    )


def redundancy(states, valid=None) -> torch.Tensor:
    bsz, nh, n_total, _ = states.shape
    out = torch.zeros(bsz, nh, dtype=torch.float64)
    for b in range(bsz):
        n = real_length(valid, b, n_total)
        for h in range(nh):
            out[b, h] = head_pairwise_redundancy(_strip(states, b, h, n))
    return out


# ---------------------------------------------------------------------------------------------
# Budgets (candidates per head, window excluded), exact arithmetic
# ---------------------------------------------------------------------------------------------



def uniform_counts(base: int, n_cand: int, num_heads: int) -> list[int]:
    if n_cand <= base:
        return [n_cand] * num_heads
    return [base] * num_heads


def pyramid_counts(base: int, n_cand: int, layer_idx: int, num_layers: int, num_heads: int,
                   beta: float = 20.0) -> list[int]:
    if n_cand <= base:
        return [n_cand] * num_heads
    base_q = Fraction(base)
    lo = base_q / Fraction(str(beta))
    hi = 2 * base_q - lo
    if hi >= n_cand:
        hi = Fraction(n_cand)
        lo = 2 * base_q - hi
    if num_layers == 1:  # a one-level pyramid keeps the average
        hi = lo = base_q
    step = (hi - lo) / (num_layers - 1) if num_layers > 1 else Fraction(0)
    count = math.floor(hi - layer_idx * step)
    return [min(max(count, 0), n_cand)] * num_heads


def apportion(shares: list[Fraction], total: int, cap: int) -> list[int]:
    """Integers summing to ``total``, each ``<= cap``, close to ``shares`` (written as loops, exactly)."""
    x = [min(sh, Fraction(cap)) for sh in shares]
    while True:
        deficit = total - sum(x)
        free = [i for i in range(len(x)) if x[i] < cap]
        if deficit <= 0 or not free:
            break
        weights = {i: shares[i] for i in free}
        if sum(weights.values()) == 0:
            weights = {i: Fraction(1) for i in free}
        wsum = sum(weights.values())
        for i in free:
            x[i] = min(x[i] + deficit * weights[i] / wsum, Fraction(cap))
    counts = [math.floor(v) for v in x]
    need = total - sum(counts)
    order = sorted((i for i in range(len(x)) if counts[i] < cap), key=lambda i: (-(x[i] - counts[i]), i))
    for i in order[:need]:
        counts[i] += 1
    return counts


def adakv_counts(s_ext: list[list[float]], base: int, n_cand: int, alpha: float = 0.2,
                 normalize: bool = True) -> list[int]:
    """``s_ext[h]``: the head's scores on its ``n_cand`` real candidates."""
    num_heads = len(s_ext)
    if n_cand <= base:
        return [n_cand] * num_heads
    pool = []
    for h in range(num_heads):
        ranked = sorted(s_ext[h], reverse=True)
        if normalize:
            frac = math.fsum(ranked[:base]) / math.fsum(ranked)
            ranked = [x * frac for x in ranked]
        pool.extend((x, h, r) for r, x in enumerate(ranked))
    pool.sort(key=lambda t: (-t[0], t[1], t[2]))
    raw = [0] * num_heads
    for _, h, _ in pool[: base * num_heads]:
        raw[h] += 1
    a = Fraction(str(alpha))
    return apportion([c * (1 - a) + a * base for c in raw], base * num_heads, n_cand)


def sparsemm_counts(head_scores: list[list[float]], base: int, n_cand: int, layer_idx: int,
                    ratio: float = 0.1) -> list[int]:
    num_layers, num_heads = len(head_scores), len(head_scores[0])
    if n_cand <= base:
        return [n_cand] * num_heads
    exact = [Fraction(max(float(x), 0.0)) for row in head_scores for x in row]
    total = sum(exact)
    rq = Fraction(str(ratio))
    shares = [rq * base + (1 - rq) * base * num_layers * num_heads * (p / total) for p in exact]
    counts = apportion(shares, base * num_layers * num_heads, n_cand)
    return counts[layer_idx * num_heads: (layer_idx + 1) * num_heads]


def headkv_counts(retrieval_scores: list[list[float]], base: int, n_cand: int, layer_idx: int,
                  beta: float = 1.5) -> list[int]:
    """Fu et al.: every head keeps ``base - base / beta``; the pool ``base / beta`` per head, over all
    layers and heads, is shared in proportion to the normalised importance scores."""
    num_layers, num_heads = len(retrieval_scores), len(retrieval_scores[0])
    if n_cand <= base:
        return [n_cand] * num_heads
    scores = [Fraction(max(float(x), 0.0)) for row in retrieval_scores for x in row]
    total = sum(scores)
    b = Fraction(str(beta))
    own = base - Fraction(base) / b
    pool = Fraction(base) / b * num_layers * num_heads
    shares = [own + pool * (s / total) for s in scores]
    counts = apportion(shares, base * num_layers * num_heads, n_cand)
    return counts[layer_idx * num_heads: (layer_idx + 1) * num_heads]


# ---------------------------------------------------------------------------------------------
# HeadKV-R2 retrieval-reasoning scores (calibration), one decoding step at a time
# ---------------------------------------------------------------------------------------------


def retrieval_reasoning_mass(queries, keys, answer, scaling: float, steps=None, valid=None) -> torch.Tensor:
    """``(B, H)``: see the module docstring. ``queries`` ``(B, Hq, T, D)``, ``keys`` ``(B, H, M, D)``,
    ``answer`` ``(B, M)`` bool; step ``t`` sits at position ``M - T + t`` and sees keys up to there."""
    bsz, hq, t_steps, _ = queries.shape
    _, nh, m, _ = keys.shape
    g = hq // nh
    out = torch.zeros(bsz, nh, dtype=torch.float64)
    for b in range(bsz):
        ans = [bool(x) for x in answer[b].tolist()]
        real = [True] * m if valid is None else [bool(x) for x in valid[b].tolist()]
        k = sum(ans)
        for h in range(nh):
            key_rows = keys[b, h].double().tolist()
            total = 0.0
            for t in range(t_steps):
                if steps is not None and not bool(steps[b, t]):
                    continue
                pos = m - t_steps + t
                seen = [j for j in range(pos + 1) if real[j]]
                per_head = []
                for gg in range(g):
                    q = queries[b, h * g + gg, t].double().tolist()
                    probs = softmax([dot(q, key_rows[j]) * scaling for j in seen])
                    ranked = sorted(zip(probs, seen), key=lambda pj: (-pj[0], pj[1]))
                    per_head.append(math.fsum(p for p, j in ranked[:k] if ans[j]) / max(k, 1))
                total += mean(per_head)
            out[b, h] = total
    return out


# ---------------------------------------------------------------------------------------------
# Methods: which positions a layer keeps
# ---------------------------------------------------------------------------------------------


@dataclass
class RefMethod:
    """A method in plain terms.

    ``kind``: "snapkv" | "pyramidkv" | "adakv" | "sparsemm" | "headkv". ``mix``: None (base selection by
    ``s_ext``), "online" (MixKV, redundancy from the keys) or an ``L x H`` list (offline profile).
    """

    kind: str
    budget: int
    window: int
    kernel: int = 5
    beta: float = 20.0
    alpha: float = 0.2
    normalize: bool = True
    head_scores: list[list[float]] | None = None
    ratio: float = 0.1
    retrieval_scores: list[list[float]] | None = None
    head_beta: float = 1.5
    mix: str | list[list[float]] | None = None


@dataclass
class RefHeadPlan:
    positions: list[int]  # ascending, padded coordinates, window included
    count: int  # candidates kept (window excluded)
    scores: dict[int, float]  # selection score of every real candidate, by padded position


def keep_plan(method: RefMethod, layer_idx: int, num_layers: int, queries, keys, values, scaling: float,
              valid=None) -> list[list[RefHeadPlan]]:
    """``plan[b][h]``: what head ``h`` of sequence ``b`` keeps."""
    bsz, hq, w, _ = queries.shape
    _, nh, n_total, _ = keys.shape
    assert w == method.window
    g = hq // nh
    base = method.budget - method.window
    plans = []
    for b in range(bsz):
        n = real_length(valid, b, n_total)
        off = n_total - n
        n_cand = max(n - w, 0)
        heads = [
            head_scores(_group_queries(queries, b, h, g), _strip(keys, b, h, n), _strip(values, b, h, n),
                        max(w - n, 0), scaling, w, method.kernel, with_redundancy=method.mix == "online")
            for h in range(nh)
        ]
        if n <= method.budget:  # fits its budget: nothing is compressed
            counts = [n_cand] * nh
        elif method.kind == "snapkv":
            counts = uniform_counts(base, n_cand, nh)
        elif method.kind == "pyramidkv":
            counts = pyramid_counts(base, n_cand, layer_idx, num_layers, nh, method.beta)
        elif method.kind == "adakv":
            counts = adakv_counts([hs.s_ext for hs in heads], base, n_cand, method.alpha, method.normalize)
        elif method.kind == "sparsemm":
            counts = sparsemm_counts(method.head_scores, base, n_cand, layer_idx, method.ratio)
        elif method.kind == "headkv":
            counts = headkv_counts(method.retrieval_scores, base, n_cand, layer_idx, method.head_beta)
        else:
            raise ValueError(method.kind)
        row = []
        for h in range(nh):
            hs = heads[h]
            if method.mix is None:
                sel = hs.s_ext
            elif method.mix == "online":
                sel = hs.mixed(hs.r)
            else:
                sel = hs.mixed(min(1.0, max(0.0, float(method.mix[layer_idx][h]))))
            order = sorted(range(n_cand), key=lambda i, s=sel: (-s[i], i))
            kept = sorted(order[: counts[h]])
            window_pos = list(range(max(n - w, 0), n))
            row.append(RefHeadPlan(
                positions=[off + i for i in kept] + [off + j for j in window_pos],
                count=counts[h],
                scores={off + i: sel[i] for i in range(n_cand)},
            ))
        plans.append(row)
    return plans


# ---------------------------------------------------------------------------------------------
# Test inputs (shared by the test modules)
# ---------------------------------------------------------------------------------------------


def make_inputs(seed, b, h, g, w, n, d, pads=None, garbage=100.0, offsets=(0.0, 1.0, 3.0)):
    """Random q/k/v; per-head key offsets so heads range from diverse to redundant.

    Padding positions (``pads[b]`` leftmost tokens) hold large garbage: any leak shows.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h * g, w, d, generator=gen) * (1 + 2 * torch.rand(b, h * g, 1, 1, generator=gen))
    strength = torch.tensor([offsets[i % len(offsets)] for i in range(h)]).view(1, h, 1, 1)
    k = torch.randn(b, h, n, d, generator=gen) + strength * torch.randn(b, h, 1, d, generator=gen)
    v = torch.randn(b, h, n, d, generator=gen) * (0.5 + torch.rand(b, h, n, 1, generator=gen))
    valid = None
    if pads is not None:
        valid = torch.ones(b, n, dtype=torch.bool)
        for i, p in enumerate(pads):
            valid[i, :p] = False
            k[i, :, :p] = garbage * torch.randn(h, p, d, generator=gen)
            v[i, :, :p] = garbage * torch.randn(h, p, d, generator=gen)
    return q, k, v, valid
