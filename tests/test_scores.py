"""Score functions (``mixkv.core.scores``) against the loop reference (``tests/reference.py``) and properties."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

import reference as ref  # noqa: E402

from mixkv.core import scores  # noqa: E402
from mixkv.core.layer import LayerPrefill  # noqa: E402
from mixkv.core.methods import AdaKV, MixKV, PyramidKV, SnapKV, SparseMM  # noqa: E402
from mixkv.core.profiles import Profile  # noqa: E402
from mixkv.core.selection import plan_keep  # noqa: E402

ATOL = 2e-6  # attention-sized numbers (~1/N) in fp32 vs double
PROPS = settings(max_examples=30, deadline=None)


make_inputs = ref.make_inputs


CASES = [
    # seed, B, H, G, W, N, D, pads
    (0, 1, 2, 1, 4, 24, 8, None),
    (1, 2, 3, 2, 8, 40, 16, None),
    (2, 2, 2, 3, 4, 33, 16, [0, 11]),
    (3, 2, 3, 2, 8, 57, 8, [19, 0]),
    (4, 2, 1, 3, 8, 80, 16, [5, 40]),
]


@pytest.mark.parametrize("case", CASES)
def test_window_attention_matches_reference(case):
    seed, b, h, g, w, n, d, pads = case
    q, k, _, valid = make_inputs(seed, b, h, g, w, n, d, pads)
    got = scores.window_attention(q, k, d**-0.5, valid)
    want = ref.window_attention(q, k, d**-0.5, valid)
    assert got.shape == (b, h, n)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_extrinsic_importance_matches_reference(case, kernel):
    seed, b, h, g, w, n, d, pads = case
    q, k, _, valid = make_inputs(seed, b, h, g, w, n, d, pads)
    got = scores.extrinsic_importance(q, k, 0.37, w, kernel, valid)
    want = ref.extrinsic_importance(q, k, 0.37, w, kernel, valid)
    assert got.shape == (b, h, n - w)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=1e-5)


def _cand_valid(valid, n, w):
    return None if valid is None else valid[:, None, : n - w]


@pytest.mark.parametrize("case", CASES)
def test_intrinsic_importance_matches_reference(case):
    seed, b, h, g, w, n, d, pads = case
    _, _, v, valid = make_inputs(seed, b, h, g, w, n, d, pads)
    target = torch.rand(b, h, 1, generator=torch.Generator().manual_seed(seed + 100)) / n
    got = scores.intrinsic_importance(v, w, target, _cand_valid(valid, n, w))
    want = ref.intrinsic_importance(v, w, target, valid)
    torch.testing.assert_close(got.double(), want, atol=1e-7, rtol=1e-5)
    # On the real candidates its mean is the target (up to the rescale epsilon).
    for bb in range(b):
        real = slice(pads[bb] if pads else 0, n - w)
        torch.testing.assert_close(got[bb, :, real].mean(-1), target[bb, :, 0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", CASES)
def test_diversity_matches_reference(case):
    seed, b, h, g, w, n, d, pads = case
    _, k, _, valid = make_inputs(seed, b, h, g, w, n, d, pads)
    target = torch.rand(b, h, 1, generator=torch.Generator().manual_seed(seed + 200)) / n
    got = scores.diversity(k, w, target, valid)
    want = ref.diversity(k, w, target, valid)
    torch.testing.assert_close(got.double(), want, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_redundancy_matches_pairwise_mean(case):
    """The O(N) identity ``(N |c|^2 - 1) / (N - 1)`` equals the explicit mean over pairs i != j."""
    seed, b, h, g, w, n, d, pads = case
    _, k, v, valid = make_inputs(seed, b, h, g, w, n, d, pads, offsets=(0.3, 1.0, 3.0))
    for states in (k, v):
        got = scores.redundancy(states, valid)
        want = ref.redundancy(states, valid)
        assert got.shape == (b, h)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    # The offset heads are genuinely redundant (the comparison is not trivially 0 == 0).
    assert (ref.redundancy(k, valid)[:, 1:] > 0.2).all() if h > 1 else True


def test_redundancy_clamps_negative_similarity_to_zero():
    # Keys k, -k, k, -k ...: mean pairwise cosine is negative -> clamped to 0.
    base = torch.randn(5)
    keys = torch.stack([base if i % 2 == 0 else -base for i in range(6)]).view(1, 1, 6, 5)
    assert float(scores.redundancy(keys)) == 0.0
    assert float(ref.redundancy(keys)) == 0.0


def test_minmax_rescale_mix_match_reference():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 20, generator=gen)
    mask = torch.ones(2, 1, 20, dtype=torch.bool)
    mask[1, :, :6] = False
    x[1, :, :6] = 1e4  # masked entries must not set the max
    got = scores.minmax_normalize(x, mask)
    target = torch.rand(2, 3, 1, generator=gen)
    got_r = scores.rescale_to(got, target, mask)
    r = torch.rand(2, 3, generator=gen)
    s_div = torch.rand(2, 3, 20, generator=gen)
    got_mix = scores.mix(got_r, s_div, r)
    for b, h in itertools.product(range(2), range(3)):
        real = [j for j in range(20) if mask[b, 0, j]]
        xs = [float(x[b, h, j]) for j in real]
        mm = ref.minmax(xs)
        rs = ref.rescale(mm, float(target[b, h, 0]))
        for i, j in enumerate(real):
            assert math.isclose(float(got[b, h, j]), mm[i], abs_tol=1e-6)
            assert math.isclose(float(got_r[b, h, j]), rs[i], rel_tol=1e-5, abs_tol=1e-6)
            want_mix = float(r[b, h]) * float(s_div[b, h, j]) + (1 - float(r[b, h])) * rs[i]
            assert math.isclose(float(got_mix[b, h, j]), want_mix, rel_tol=1e-5, abs_tol=1e-6)
        for j in range(20):
            if not mask[b, 0, j]:
                assert float(got[b, h, j]) == 0.0


# ---------------------------------------------------------------------------------------------
# Constant rows: an epsilon everywhere, never NaN
# ---------------------------------------------------------------------------------------------


def _all_methods(budget, window, num_layers, num_heads):
    prof = Profile("const", num_layers, num_heads, key_redundancy=torch.full((num_layers, num_heads), 0.5),
                   head_scores=torch.ones(num_layers, num_heads))
    bases = [
        SnapKV(budget=budget, window=window),
        PyramidKV(budget=budget, window=window),
        AdaKV(budget=budget, window=window),
        SparseMM(budget=budget, window=window, head_scores=prof),
    ]
    return bases + [MixKV(m) for m in bases] + [MixKV(m, redundancy=prof) for m in bases]


@pytest.mark.parametrize("kind", ["identical_keys_values", "zero_values", "zero_queries"])
def test_constant_rows_give_no_nan(kind):
    b, h, g, w, n, d = 2, 2, 2, 4, 30, 8
    q, k, v, valid = make_inputs(11, b, h, g, w, n, d, pads=[0, 7])
    if kind == "identical_keys_values":
        k = torch.randn(1, 1, 1, d).expand(b, h, n, d).clone()
        v = torch.randn(1, 1, 1, d).expand(b, h, n, d).clone()
        q = torch.randn(1, 1, 1, d).expand(b, h * g, w, d).clone()
    elif kind == "zero_values":
        v = torch.zeros(b, h, n, d)
    else:
        q = torch.zeros(b, h * g, w, d)
    cand = valid[:, None, : n - w]
    s_ext = scores.extrinsic_importance(q, k, d**-0.5, w, 5, valid)
    target = scores.masked_mean(s_ext, cand)
    s_int = scores.intrinsic_importance(v, w, target, cand)
    s_div = scores.diversity(k, w, target, valid)
    r = scores.redundancy(k, valid)
    outs = {
        "s_ext": s_ext, "s_int": s_int, "s_div": s_div, "r": r,
        "mix": scores.mix(s_ext + s_int, s_div, r),
        "minmax_const": scores.minmax_normalize(torch.full((2, 3, 9), 0.25), None),
        "minmax_const_masked": scores.minmax_normalize(torch.full((2, 3, 9), 0.25), torch.rand(2, 1, 9) > 0.5),
    }
    for name, t in outs.items():
        assert torch.isfinite(t).all(), name
    if kind == "identical_keys_values":
        assert torch.allclose(r, torch.ones_like(r), atol=1e-5)
        assert (s_div == 0).all() and (s_int == 0).all()
    if kind == "zero_values":
        assert (s_int == 0).all()
    assert (outs["minmax_const"] == 0).all()
    for li in range(3):
        ctx = LayerPrefill(li, 3, q, k, v, d**-0.5, w, valid=valid)
        for m in _all_methods(12, w, 3, h):
            plan = plan_keep(m, ctx)
            lengths = plan.lengths
            for bb, hh in itertools.product(range(b), range(h)):
                kept = plan.indices[bb, hh, : lengths[bb, hh]].tolist()
                assert len(set(kept)) == len(kept), m.describe()
                assert all(valid[bb, p] for p in kept), m.describe()
                assert set(range(n - w, n)) <= set(kept), m.describe()


# ---------------------------------------------------------------------------------------------
# Hypothesis properties
# ---------------------------------------------------------------------------------------------

shapes = st.tuples(
    st.integers(0, 2**31 - 1),  # seed
    st.integers(1, 2),  # B
    st.integers(1, 3),  # H
    st.sampled_from([1, 2, 3]),  # G
    st.sampled_from([4, 8]),  # W
    st.integers(1, 40),  # candidates (N == W, no candidate at all, is not scored: see the report)
    st.integers(2, 16),  # D
)


def _random(shape_params, pad_frac):
    seed, b, h, g, w, c, d = shape_params
    n = w + c
    pads = [int(pad_frac * c) if i % 2 else 0 for i in range(b)]
    return make_inputs(seed, b, h, g, w, n, d, pads if any(pads) else None) + (n, w, d)


@PROPS
@given(shapes, st.floats(0, 1))
def test_window_attention_is_a_causal_distribution(params, pad_frac):
    q, k, _, valid, n, w, d = _random(params, pad_frac)
    a = scores.window_attention(q, k, d**-0.5, valid)
    vm = torch.ones(a.shape[0], n, dtype=torch.bool) if valid is None else valid
    # Rows sum to 1 over the non-padding keys; padding keys get exactly 0.
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:2]), atol=1e-5, rtol=0)
    assert (a.masked_select(~vm[:, None, :].expand_as(a)) == 0).all()
    assert (a >= 0).all()
    # Causal inside the window: window key j is only seen by queries j .. W-1.
    for j in range(w):
        assert (a[..., n - w + j] <= (w - j) / w + 1e-6).all()


@PROPS
@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.floats(1e-3, 1e3), st.floats(0, 0.9))
def test_minmax_in_unit_interval(seed, c, scale, mask_frac):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, c, generator=gen) * scale
    mask = torch.rand(2, 1, c, generator=gen) >= mask_frac
    mask[..., -1] = True
    y = scores.minmax_normalize(x, mask)
    assert torch.isfinite(y).all()
    assert (y >= 0).all() and (y <= 1).all()
    assert (y.masked_select(~mask.expand_as(y)) == 0).all()
    # The largest real entry maps to ~1 unless the row is (nearly) constant.
    lo = x.masked_fill(~mask, float("inf")).amin(-1)
    hi = x.masked_fill(~mask, float("-inf")).amax(-1)
    top = y.masked_fill(~mask, -1).amax(-1)
    torch.testing.assert_close(top, (hi - lo) / (hi - lo + 1e-6), atol=1e-5, rtol=0)


@PROPS
@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.floats(1e-4, 10.0), st.floats(1e-3, 1e3))
def test_rescale_hits_target_mean(seed, c, target, scale):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 2, c, generator=gen) * scale + 1e-2 * scale
    t = torch.full((2, 2, 1), target)
    y = scores.rescale_to(x, t)
    m = x.double().mean(-1, keepdim=True)
    # Exactly the target up to the epsilon in the denominator: target * m / (m + eps).
    torch.testing.assert_close(y.double().mean(-1, keepdim=True), t * m / (m + 1e-6), rtol=1e-5, atol=0)
    if float(m.min()) > 1e-2:
        torch.testing.assert_close(y.mean(-1, keepdim=True), t, rtol=2e-4, atol=0)


@PROPS
@given(shapes, st.floats(0, 1))
def test_redundancy_in_unit_interval_and_pairwise(params, pad_frac):
    _, k, _, valid, *_ = _random(params, pad_frac)
    r = scores.redundancy(k, valid)
    assert ((r >= 0) & (r <= 1)).all()
    torch.testing.assert_close(r.double(), ref.redundancy(k, valid), atol=1e-5, rtol=0)


@PROPS
@given(st.integers(0, 2**31 - 1), st.integers(2, 50), st.integers(1, 16), st.floats(1e-3, 1e3))
def test_redundancy_of_identical_or_parallel_keys_is_one(seed, n, d, scale):
    gen = torch.Generator().manual_seed(seed)
    one = torch.randn(d, generator=gen)
    one = one / one.norm().clamp_min(1e-12)  # keys far above the unit-normalisation epsilon (1e-6)
    # Same direction, positive random lengths: cosine 1 for every pair.
    lengths = scale * (0.1 + torch.rand(n, 1, generator=gen))
    keys = (one * lengths).view(1, 1, n, d)
    torch.testing.assert_close(scores.redundancy(keys), torch.ones(1, 1), atol=1e-5, rtol=0)


@PROPS
@given(shapes, st.floats(0, 1))
def test_diversity_and_redundancy_ignore_key_lengths(params, pad_frac):
    """Both depend on directions only: rescaling each key by a positive factor changes nothing."""
    seed, b, h, *_ = params
    _, k, _, valid, n, w, d = _random(params, pad_frac)
    gen = torch.Generator().manual_seed(seed + 1)
    k2 = k * (0.1 + 10 * torch.rand(b, h, n, 1, generator=gen))
    t = torch.full((b, h, 1), 0.05)
    torch.testing.assert_close(scores.redundancy(k2, valid), scores.redundancy(k, valid), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.diversity(k2, w, t, valid), scores.diversity(k, w, t, valid),
                               atol=1e-5, rtol=1e-4)


@PROPS
@given(shapes, st.integers(1, 12))
def test_left_padding_changes_no_score(params, pad):
    """A sequence scored alone equals the same sequence left-padded in a batch (padding = garbage)."""
    seed, b, h, g, w, c, d = params
    n = w + c
    q, k, v, _ = make_inputs(seed, 1, h, g, w, n, d)
    gen = torch.Generator().manual_seed(seed + 3)
    kp = torch.cat([1e2 * torch.randn(1, h, pad, d, generator=gen), k], dim=2)
    vp = torch.cat([1e2 * torch.randn(1, h, pad, d, generator=gen), v], dim=2)
    valid = torch.ones(1, n + pad, dtype=torch.bool)
    valid[0, :pad] = False
    cand = valid[:, None, : n + pad - w]
    s = d**-0.5
    torch.testing.assert_close(scores.window_attention(q, kp, s, valid)[..., pad:], scores.window_attention(q, k, s))
    e, ep = scores.extrinsic_importance(q, k, s, w), scores.extrinsic_importance(q, kp, s, w, valid=valid)
    torch.testing.assert_close(ep[..., pad:], e)
    assert (ep[..., :pad] == 0).all()
    t = torch.full((1, h, 1), 0.03)
    torch.testing.assert_close(scores.intrinsic_importance(vp, w, t, cand)[..., pad:],
                               scores.intrinsic_importance(v, w, t), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(scores.diversity(kp, w, t, valid)[..., pad:], scores.diversity(k, w, t),
                               atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(scores.redundancy(kp, valid), scores.redundancy(k), atol=1e-5, rtol=0)


@PROPS
@given(st.integers(0, 2**31 - 1), st.integers(1, 30))
def test_mix_endpoints(seed, c):
    gen = torch.Generator().manual_seed(seed)
    s_imp, s_div = torch.rand(2, 3, c, generator=gen), torch.rand(2, 3, c, generator=gen)
    r = torch.tensor([[0.0, 1.0, 0.5]]).expand(2, 3)
    m = scores.mix(s_imp, s_div, r)
    torch.testing.assert_close(m[:, 0], s_imp[:, 0])
    torch.testing.assert_close(m[:, 1], s_div[:, 1])
    torch.testing.assert_close(m[:, 2], (s_imp[:, 2] + s_div[:, 2]) / 2)


# ---------------------------------------------------------------------------------------------
# Known gap: a padded sequence shorter than the window
# ---------------------------------------------------------------------------------------------


def test_window_attention_short_sequence_is_finite():
    """A padded sequence shorter than the window: its window queries on padding do not count."""
    q, k, _, valid = make_inputs(5, 2, 2, 2, 8, 20, 8, pads=[0, 15])  # row 1 has n = 5 < W = 8
    got = scores.window_attention(q, k, 8**-0.5, valid)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref.window_attention(q, k, 8**-0.5, valid), atol=ATOL, rtol=1e-5)
