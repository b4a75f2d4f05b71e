"""Budget allocation (``mixkv.core.budgets``): hand-worked cases, invariants, and the exact reference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

import reference as ref  # noqa: E402

from mixkv.core import budgets  # noqa: E402

PROPS = settings(max_examples=40, deadline=None)


def T(*xs):
    return torch.tensor(list(xs), dtype=torch.long)


def pyramid(base, n_cand, num_layers, num_heads=1, beta=20.0):
    """Per-layer counts (head 0) of a single prompt."""
    return [
        int(budgets.pyramid_counts(T(base), T(n_cand), layer, num_layers, num_heads, beta)[0, 0])
        for layer in range(num_layers)
    ]


# ---------------------------------------------------------------------------------------------
# Uniform (SnapKV)
# ---------------------------------------------------------------------------------------------


def test_uniform_counts():
    # base 32 for every head; a prompt with only 20 real candidates keeps all 20 (no compression).
    got = budgets.uniform_counts(T(32, 32), T(1000, 20), 3)
    assert got.tolist() == [[32, 32, 32], [20, 20, 20]]


# ---------------------------------------------------------------------------------------------
# PyramidKV
# ---------------------------------------------------------------------------------------------


def test_pyramid_paper_setting():
    # budget 64, W 32 -> base 32; beta 20: min = 32/20 = 1.6, max = 64 - 1.6 = 62.4;
    # L = 4: step = (62.4 - 1.6) / 3 = 20.2667.
    # layer 0: 62.4 -> 62; layer 1: 42.133 -> 42; layer 2: 21.867 -> 21; layer 3: 1.6 -> 1.
    assert pyramid(32, 10_000, 4) == [62, 42, 21, 1]


def test_pyramid_non_integer_step():
    # base 50: min 2.5, max 97.5, L = 4: step 95/3 = 31.667.
    # 97.5 -> 97; 65.833 -> 65; 34.167 -> 34; 2.5 -> 2.
    assert pyramid(50, 10_000, 4) == [97, 65, 34, 2]


def test_pyramid_clipped_when_max_exceeds_candidates():
    # base 32, only 40 candidates: max 62.4 >= 40 -> max = 40, min = 2*32 - 40 = 24;
    # L = 4: step = 16/3 = 5.333. 40 -> 40; 34.667 -> 34; 29.333 -> 29; 24.000 -> 24
    # (exactly 24: the float 40 - 3 * 5.333.. must not truncate to 23).
    assert pyramid(32, 40, 4) == [40, 34, 29, 24]
    # Clipping case with an integer step: 41 candidates -> max 41, min 23, step 6 (L = 4).
    assert pyramid(32, 41, 4) == [41, 35, 29, 23]


def test_pyramid_clip_boundary():
    # base 20: min 1, max 39. With exactly 39 candidates max >= N - W holds (equality):
    # max = 39, min = 40 - 39 = 1: the same schedule. L = 3: step 19 -> [39, 20, 1].
    assert pyramid(20, 39, 3) == [39, 20, 1]
    assert pyramid(20, 1000, 3) == [39, 20, 1]
    # One more candidate: no clipping.
    assert pyramid(20, 40, 3) == [39, 20, 1]


def test_pyramid_no_compression_when_prompt_fits():
    # 32 real candidates, base 32: every layer keeps all 32 (not the pyramid's 62 / 1).
    assert pyramid(32, 32, 4) == [32, 32, 32, 32]
    assert pyramid(32, 5, 4) == [5, 5, 5, 5]


def test_pyramid_computed_per_prompt():
    """Two prompts of different lengths in one batch get their own schedules (not the first one's)."""
    rows = [budgets.pyramid_counts(T(32, 32), T(10_000, 40), layer, 4, 2) for layer in range(4)]
    assert [int(r[0, 0]) for r in rows] == [62, 42, 21, 1]
    assert [int(r[1, 1]) for r in rows] == [40, 34, 29, 24]


@PROPS
@given(st.integers(1, 200), st.integers(0, 500), st.integers(2, 40), st.sampled_from([2.0, 5.0, 20.0]))
def test_pyramid_matches_reference_and_keeps_mean(base, n_cand, num_layers, beta):
    got = pyramid(base, n_cand, num_layers, beta=beta)
    want = [ref.pyramid_counts(base, n_cand, layer, num_layers, 1, beta)[0] for layer in range(num_layers)]
    assert got == want
    assert all(0 <= c <= n_cand for c in got)
    assert got == sorted(got, reverse=True)
    if n_cand > base:
        # min + max = 2 base in both branches, so the exact schedule sums to L * base; each floor
        # loses less than one token.
        assert num_layers * base - num_layers < sum(got) <= num_layers * base


# ---------------------------------------------------------------------------------------------
# AdaKV
# ---------------------------------------------------------------------------------------------

# Two heads, eight candidates, base 4 (layer total 4 * 2 = 8):
#   head 0 concentrated: [0.6, 0.2, 0.1, 0.05, 0.02, 0.01, 0.01, 0.01]  (sum 1)
#   head 1 flat:         [0.125] * 8                                      (sum 1)
HEAD0 = [0.6, 0.2, 0.1, 0.05, 0.02, 0.01, 0.01, 0.01]
HEAD1 = [0.125] * 8


def adakv(rows, base, n_cand=None, floor=0.2, normalize=True, valid=None):
    s = torch.tensor([rows], dtype=torch.float32)
    c = s.shape[-1]
    cand_valid = torch.ones(1, 1, c, dtype=torch.bool) if valid is None else torch.tensor([[valid]])
    n = int(cand_valid.sum()) if n_cand is None else n_cand
    return budgets.adakv_counts(s, cand_valid, T(base), T(n), floor, normalize)[0].tolist()


def test_adakv_hand_normalized():
    # normalize: head 0 keeps 0.95 of its mass in its top 4 -> scores x 0.95:
    #   [0.57, 0.19, 0.095, 0.0475, 0.019, ...]; head 1 keeps 0.5 -> 0.0625 each.
    # Global top 8: 0.57, 0.19, 0.095 (head 0), then the eight 0.0625 beat 0.0475 -> 5 of head 1.
    # Raw counts [3, 5]. alpha 0.2: floor(3*0.8 + 0.8 + 0.5) = floor(3.7) = 3;
    # floor(5*0.8 + 0.8 + 0.5) = floor(5.3) = 5.
    assert adakv([HEAD0, HEAD1], 4) == [3, 5]
    # alpha 0: the raw counts; alpha 1: uniform.
    assert adakv([HEAD0, HEAD1], 4, floor=0.0) == [3, 5]
    assert adakv([HEAD0, HEAD1], 4, floor=1.0) == [4, 4]
    # alpha 0.5: shares 3*0.5 + 2 = 3.5 and 5*0.5 + 2 = 4.5 sum to the layer's 8; floors 3 + 4 leave one
    # token, which goes to the larger remainder, tied at 0.5, so to the lower head: [4, 4] (total exactly 8;
    # rounding each head half up would keep 9).
    assert adakv([HEAD0, HEAD1], 4, floor=0.5) == [4, 4]


def test_adakv_hand_unnormalized():
    # Without normalize: 0.6, 0.2 (head 0) > 0.125 > 0.1, so the top 8 are 0.6, 0.2 and six 0.125.
    # Raw [2, 6]; alpha 0.2: floor(1.6 + 0.8 + 0.5) = 2; floor(4.8 + 0.8 + 0.5) = 6.
    assert adakv([HEAD0, HEAD1], 4, normalize=False) == [2, 6]


def test_adakv_ignores_padding_candidates():
    # The same table behind two left-padding candidates with huge scores: nothing changes.
    padded = [[0.9, 0.9] + HEAD0, [0.9, 0.9] + HEAD1]
    valid = [False, False] + [True] * 8
    assert adakv(padded, 4, valid=valid) == [3, 5]
    assert adakv(padded, 4, valid=valid, normalize=False) == [2, 6]


def test_adakv_no_compression_when_prompt_fits():
    assert adakv([HEAD0, HEAD1], 8) == [8, 8]
    assert adakv([HEAD0, HEAD1], 20) == [8, 8]


@PROPS
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(2, 60), st.integers(1, 60),
       st.sampled_from([0.0, 0.2, 0.5, 1.0]), st.booleans(), st.floats(0.5, 20.0))
def test_adakv_matches_reference_and_invariants(seed, num_heads, c, base, alpha, normalize, temp):
    gen = torch.Generator().manual_seed(seed)
    pad = int(torch.randint(0, c, (1,), generator=gen))
    s = torch.softmax(temp * torch.randn(2, num_heads, c, generator=gen), dim=-1)
    cand_valid = torch.ones(2, 1, c, dtype=torch.bool)
    cand_valid[1, :, :pad] = False
    n_cand = cand_valid.sum(-1)[:, 0]
    got = budgets.adakv_counts(s, cand_valid, T(base, base), n_cand, alpha, normalize)
    for b in range(2):
        real = [[float(x) for x in s[b, h, cand_valid[b, 0]]] for h in range(num_heads)]
        want = ref.adakv_counts(real, base, int(n_cand[b]), alpha, normalize)
        assert got[b].tolist() == want
        counts = got[b]
        assert (counts <= n_cand[b]).all()
        if int(n_cand[b]) > base:
            # Raw counts sum to base*H; the mix with the uniform share rounds each head by <= 1/2.
            assert abs(int(counts.sum()) - base * num_heads) <= num_heads / 2
            # Each head's share is at least alpha * base; apportionment never rounds below its floor.
            assert (counts >= int(alpha * base)).all()
        else:
            assert (counts == n_cand[b]).all()


# ---------------------------------------------------------------------------------------------
# SparseMM
# ---------------------------------------------------------------------------------------------


def sparsemm(table, base, n_cand, layer, ratio=0.1):
    return budgets.sparsemm_counts(torch.tensor(table, dtype=torch.float32), T(base), T(n_cand), layer,
                                   ratio)[0].tolist()


def test_sparsemm_hand():
    # Scores [[1, 2], [3, 4]] (L = 2, H = 2) normalise to p = [[.1, .2], [.3, .4]].
    # base 10: every head 0.1*10 = 1, plus 0.9*10*4 = 36 shared: 3.6, 7.2, 10.8, 14.4.
    # 1 + 3.6 = 4.6 -> 5; 8.2 -> 8; 11.8 -> 12; 15.4 -> 15 (sum 40 = 10 * 4).
    table = [[1, 2], [3, 4]]
    assert sparsemm(table, 10, 1000, 0) == [5, 8]
    assert sparsemm(table, 10, 1000, 1) == [12, 15]
    # The scale of the raw scores does not matter.
    assert sparsemm([[7, 14], [21, 28]], 10, 1000, 1) == [12, 15]


def test_sparsemm_clip_and_zero_head():
    # Scores [[1, 1], [1, 5]] -> p = [[1/8, 1/8], [1/8, 5/8]]; base 40: 4 + 144 p -> 22, 22, 22, 94.
    table = [[1, 1], [1, 5]]
    assert sparsemm(table, 40, 1000, 0) == [22, 22]
    assert sparsemm(table, 40, 1000, 1) == [22, 94]
    # Only 50 candidates: 94 is capped at 50 and its excess 44 goes to the other three heads in proportion
    # to their shares (+14.67 each -> 36.67); the model still keeps exactly 4 x 40 = 160, the two leftover
    # tokens going to the lowest indices (equal remainders).
    assert sparsemm(table, 40, 50, 1) == [36, 50]
    assert sparsemm(table, 40, 50, 0) == [37, 37]
    # A head with score 0 still gets ratio * base = 4 (0.1 * 40).
    assert sparsemm([[0, 1], [1, 2]], 40, 1000, 0) == [4, 40]  # 4 + 144/4 = 40
    # Equal scores: every head gets exactly base.
    assert sparsemm([[3, 3], [3, 3]], 40, 1000, 1) == [40, 40]


def test_sparsemm_no_compression_when_prompt_fits():
    assert sparsemm([[1, 1], [1, 5]], 40, 40, 1) == [40, 40]
    assert sparsemm([[1, 1], [1, 5]], 40, 7, 1) == [7, 7]


@PROPS
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.integers(1, 4), st.integers(1, 100),
       st.integers(0, 400), st.sampled_from([0.0, 0.1, 0.5]))
def test_sparsemm_matches_reference(seed, num_layers, num_heads, base, n_cand, ratio):
    gen = torch.Generator().manual_seed(seed)
    table = torch.rand(num_layers, num_heads, generator=gen)
    if table.numel() > 1:  # a zero-score head (an all-zero table is undefined)
        table[0, 0] = 0.0
    total = 0
    for layer in range(num_layers):
        got = budgets.sparsemm_counts(table, T(base), T(n_cand), layer, ratio)[0].tolist()
        want = ref.sparsemm_counts(table.tolist(), base, n_cand, layer, ratio)
        assert got == want
        assert all(0 <= c <= n_cand for c in got)
        total += sum(got)
    if n_cand >= 2 * base * num_layers * num_heads:  # nothing clipped: shares add up (+- rounding)
        assert abs(total - base * num_layers * num_heads) <= num_layers * num_heads / 2


@pytest.mark.parametrize("fn", ["uniform", "pyramid", "adakv", "sparsemm"])
def test_batch_rows_fitting_their_budget_keep_everything(fn):
    """Row 0 compresses, row 1 (12 real candidates <= base 16) keeps all of them, in one call."""
    base, n_cand, h = T(16, 16), T(50, 12), 3
    if fn == "uniform":
        got = budgets.uniform_counts(base, n_cand, h)
    elif fn == "pyramid":
        got = budgets.pyramid_counts(base, n_cand, 0, 4, h)
    elif fn == "adakv":
        s = torch.rand(2, h, 50)
        valid = torch.ones(2, 1, 50, dtype=torch.bool)
        valid[1, :, :38] = False
        got = budgets.adakv_counts(s, valid, base, n_cand)
    else:
        got = budgets.sparsemm_counts(torch.rand(4, h) + 0.1, base, n_cand, 2)
    assert got.shape == (2, h)
    assert got[1].tolist() == [12] * h
    assert (got[0] <= 50).all() and (got[0] > 0).all()


def test_pyramid_schedule_exact_vs_the_authors_integer_steps():
    """30 layers, base 32 (B=64, W=32): ours floors an exact schedule (62..1, mean 31.5, within the budget);
    the authors floor min and the step first (63..5, mean 34: the overspend measured in their code)."""
    def schedule(integer_steps):
        return [int(budgets.pyramid_counts(T(32), T(1000), layer, 30, 1, 20.0, integer_steps)[0, 0])
                for layer in range(30)]

    ours, theirs = schedule(False), schedule(True)
    assert ours[:2] == [62, 60] and ours[-6:] == [12, 9, 7, 5, 3, 1] and sum(ours) == 945
    assert theirs[:2] == [63, 61] and theirs[-6:] == [15, 13, 11, 9, 7, 5] and sum(theirs) == 1020


def test_pyramidkv_authors_schedule_by_name_and_bad_schedule():
    import mixkv

    exact = mixkv.make_method("pyramidkv+mixkv", budget=64)
    authors = mixkv.make_method("pyramidkv+mixkv", budget=64, schedule="authors")
    assert exact.base.schedule == "exact" and authors.base.schedule == "authors"
    with pytest.raises(ValueError, match="schedule must be 'exact'"):
        mixkv.make_method("pyramidkv", budget=64, schedule="paper")
