"""Kept positions from ``selection.plan_keep`` against the loop reference, for every method."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import reference as ref  # noqa: E402

from mixkv.core import defaults  # noqa: E402
from mixkv.core.layer import LayerPrefill  # noqa: E402
from mixkv.core.methods import AdaKV, MixKV, PyramidKV, SnapKV, SparseMM  # noqa: E402
from mixkv.core.profiles import Profile  # noqa: E402
from mixkv.core.selection import plan_keep  # noqa: E402

NUM_LAYERS = 3

CASES = [
    # seed, B, H, G, W, N, D, budget, pads (None: no padding)
    (0, 1, 2, 1, 4, 30, 8, 12, None),
    (1, 2, 3, 2, 8, 60, 16, 20, [0, 13]),
    (2, 2, 2, 3, 4, 80, 16, 16, [25, 0]),
    # row 0: n = 50 > 40 (PyramidKV clips: max 62.4 >= 42 candidates); row 1: n = 33 <= 40 keeps all.
    (3, 2, 3, 1, 8, 50, 8, 40, [0, 17]),
    # row 1: n = 10 <= 24, keeps everything.
    (4, 2, 2, 2, 8, 40, 16, 24, [3, 30]),
    # row 0: n = 10 == budget, keeps everything; row 1 compresses hard.
    (5, 2, 1, 2, 4, 70, 16, 10, [60, 0]),
    (6, 2, 3, 3, 8, 64, 12, 14, [7, 2]),
]

METHODS = [
    # (kind, mix): mix None = the base alone; "online"; "profile" = offline key redundancy.
    (kind, mix)
    for mix in (None, "online", "profile")
    for kind in ("snapkv", "pyramidkv", "adakv", "sparsemm")
]


def make_profile(seed, num_heads):
    gen = torch.Generator().manual_seed(1000 + seed)
    # Redundancy outside [0, 1] on purpose: it must be clamped.
    red = torch.rand(NUM_LAYERS, num_heads, generator=gen)
    hs = torch.rand(NUM_LAYERS, num_heads, generator=gen)
    hs[0, 0] = 0.0
    return Profile("test-model", NUM_LAYERS, num_heads, key_redundancy=red, head_scores=hs)


def build(kind, mix, budget, window, prof):
    """The library's method object and the reference's description of the same method."""
    if kind == "snapkv":
        lib = SnapKV(budget=budget, window=window)
    elif kind == "pyramidkv":
        lib = PyramidKV(budget=budget, window=window)
    elif kind == "adakv":
        lib = AdaKV(budget=budget, window=window)
    else:
        lib = SparseMM(budget=budget, window=window, head_scores=prof)
    rmix = None
    if mix == "online":
        lib, rmix = MixKV(lib), "online"
    elif mix == "profile":
        lib, rmix = MixKV(lib, redundancy=prof), prof.key_redundancy.tolist()
    rm = ref.RefMethod(kind, budget, window, head_scores=prof.head_scores.tolist(), mix=rmix)
    return lib, rm


def lib_kept(plan, b, h):
    return plan.indices[b, h, : int(plan.lengths[b, h])].tolist()


def assert_same_selection(got, want: ref.RefHeadPlan, where):
    """Same positions; a swap is tolerated only between candidates tied (up to fp32) in the reference."""
    assert len(got) == len(want.positions), f"{where}: length {len(got)} != {len(want.positions)}"
    if set(got) == set(want.positions):
        return
    scores = want.scores
    only_lib = set(got) - set(want.positions)
    only_ref = set(want.positions) - set(got)
    assert only_lib <= set(scores) and only_ref <= set(scores), f"{where}: non-candidate differs {only_lib} {only_ref}"
    scale = max(abs(s) for s in scores.values())
    # Scores one rank-grid step apart are ties broken by position (mixkv.core.scores.rank_grid).
    tol = (2.0**-defaults.RANK_BITS + 1e-5) * scale + 1e-9
    worst = max(abs(scores[i] - scores[j]) for i in only_lib for j in only_ref)
    assert worst <= tol, f"{where}: lib keeps {sorted(only_lib)}, reference keeps {sorted(only_ref)} (gap {worst})"


@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
@pytest.mark.parametrize("kind,mix", METHODS, ids=[f"{k}+{m}" if m else k for k, m in METHODS])
def test_plan_keep_matches_reference(case, kind, mix):
    seed, b, h, g, w, n, d, budget, pads = case
    q, k, v, valid = ref.make_inputs(seed, b, h, g, w, n, d, pads)
    prof = make_profile(seed, h)
    lib, rm = build(kind, mix, budget, w, prof)
    scaling = d**-0.5
    for layer in range(NUM_LAYERS):
        ctx = LayerPrefill(layer, NUM_LAYERS, q, k, v, scaling, w, valid=valid)
        plan = plan_keep(lib, ctx)
        want = ref.keep_plan(rm, layer, NUM_LAYERS, q, k, v, scaling, valid)
        assert plan.lengths.shape == (b, h)
        for bb in range(b):
            n_real = n - (pads[bb] if pads else 0)
            real = set(range(n - n_real, n))
            for hh in range(h):
                where = f"{lib.describe()} layer {layer} batch {bb} head {hh}"
                got = lib_kept(plan, bb, hh)
                assert got == sorted(got) and len(set(got)) == len(got), f"{where}: not ascending/unique {got}"
                assert set(got) <= real, f"{where}: keeps padding {sorted(set(got) - real)}"
                assert set(range(n - w, n)) <= set(got), f"{where}: window not kept"
                if n_real <= budget:
                    assert set(got) == real, f"{where}: a prompt that fits its budget must keep everything"
                elif kind == "snapkv":
                    assert len(got) == budget, f"{where}: SnapKV keeps exactly the budget"
                assert len(got) == want[bb][hh].count + w, f"{where}: count differs from the reference schedule"
                assert_same_selection(got, want[bb][hh], where)


def test_mixkv_changes_selection_and_reference_sees_it():
    """Guard against a vacuous comparison: on redundant heads MixKV keeps other tokens than SnapKV."""
    seed, b, h, g, w, n, d, budget, pads = CASES[1]
    q, k, v, valid = ref.make_inputs(seed, b, h, g, w, n, d, pads)
    ctx = LayerPrefill(0, NUM_LAYERS, q, k, v, d**-0.5, w, valid=valid)
    snap = plan_keep(SnapKV(budget=budget, window=w), ctx)
    mixed = plan_keep(MixKV(SnapKV(budget=budget, window=w)), ctx)
    differ = sum(lib_kept(snap, bb, hh) != lib_kept(mixed, bb, hh) for bb in range(b) for hh in range(h))
    assert differ >= 2
    # ... and the online redundancies are spread out, so the mix is exercised at several weights.
    r = ref.redundancy(k, valid)
    assert float(r.min()) < 0.2 and float(r.max()) > 0.5


@pytest.mark.parametrize("kind,mix", METHODS, ids=[f"{k}+{m}" if m else k for k, m in METHODS])
def test_left_padding_is_invisible_to_plan_keep(kind, mix):
    """A padded batch keeps, per sequence, exactly what each sequence keeps on its own (shifted)."""
    seed, b, h, g, w, n, d, budget, pads = 9, 2, 2, 2, 4, 48, 8, 14, [0, 9]
    q, k, v, valid = ref.make_inputs(seed, b, h, g, w, n, d, pads)
    prof = make_profile(seed, h)
    lib, _ = build(kind, mix, budget, w, prof)
    for layer in range(NUM_LAYERS):
        batch = plan_keep(lib, LayerPrefill(layer, NUM_LAYERS, q, k, v, d**-0.5, w, valid=valid))
        for bb in range(b):
            p = pads[bb]
            sl = slice(bb, bb + 1)
            alone = plan_keep(lib, LayerPrefill(layer, NUM_LAYERS, q[sl], k[sl, :, p:], v[sl, :, p:], d**-0.5, w))
            for hh in range(h):
                assert lib_kept(batch, bb, hh) == [p + i for i in lib_kept(alone, 0, hh)]


@pytest.mark.parametrize("kind,mix", METHODS, ids=[f"{k}+{m}" if m else k for k, m in METHODS])
def test_sequence_shorter_than_window_keeps_its_tokens(kind, mix):
    """Row 1 has 3 real tokens (< W = 8): it keeps exactly those, and row 0 is unaffected."""
    seed, b, h, g, w, n, d, budget, pads = 12, 2, 2, 2, 8, 40, 8, 16, [0, 37]
    q, k, v, valid = ref.make_inputs(seed, b, h, g, w, n, d, pads)
    prof = make_profile(seed, h)
    lib, rm = build(kind, mix, budget, w, prof)
    ctx = LayerPrefill(1, NUM_LAYERS, q, k, v, d**-0.5, w, valid=valid)
    plan = plan_keep(lib, ctx)
    want = ref.keep_plan(rm, 1, NUM_LAYERS, q, k, v, d**-0.5, valid)
    for hh in range(h):
        assert lib_kept(plan, 1, hh) == [37, 38, 39]
        assert_same_selection(lib_kept(plan, 0, hh), want[0][hh], f"{lib.describe()} head {hh}")


def test_prompt_no_longer_than_the_window_has_no_candidates():
    """N == W: nothing to choose from; the method keeps the window and does not crash."""
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    plan = plan_keep(SnapKV(budget=8, window=4), LayerPrefill(0, 2, q, k, v, 1.0, 4))
    assert plan.lengths.tolist() == [[4, 4]]
    assert plan.indices[0, 0].tolist() == [0, 1, 2, 3]
