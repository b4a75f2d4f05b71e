"""HeadKV (Fu et al., ICLR 2025): allocation, retrieval-reasoning scores, the method under ``press``, calibration."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

import reference as ref  # noqa: E402
import test_selection_reference as tsr  # noqa: E402
from masked_reference import masked_reference  # noqa: E402
from zoo import make_inputs, make_model  # noqa: E402

import mixkv  # noqa: E402
from mixkv import HeadKV, MixKV, Profile, load_profile, press, save_profile  # noqa: E402
from mixkv.core import budgets, defaults  # noqa: E402
from mixkv.core.layer import LayerPrefill  # noqa: E402
from mixkv.core.profiles import FORMAT, VERSION  # noqa: E402
from mixkv.core.selection import plan_keep  # noqa: E402
from mixkv.lab import calibration as cal  # noqa: E402
from mixkv.lab.calibration import CalibrationSample, calibrate, partial_path  # noqa: E402

PROPS = settings(max_examples=40, deadline=None)
WINDOW = 8
TABLE = [[1.0, 3.0], [2.0, 0.5]]  # retrieval scores of the zoo's 2-layer, 2-KV-head llama


def T(*xs):
    return torch.tensor(list(xs), dtype=torch.long)


def headkv(table, base, n_cand, layer, beta=defaults.HEADKV_BETA):
    return budgets.headkv_counts(torch.tensor(table, dtype=torch.float32), T(base), T(n_cand), layer,
                                 beta)[0].tolist()


def both_layers(table, base, n_cand, beta=defaults.HEADKV_BETA):
    got = [headkv(table, base, n_cand, layer, beta) for layer in range(len(table))]
    want = [ref.headkv_counts(table, base, n_cand, layer, beta) for layer in range(len(table))]
    assert got == want, f"library {got} != reference {want}"
    return got


def profile(table=TABLE, **fields) -> Profile:
    return Profile("zoo-llama", len(table), len(table[0]), retrieval_scores=table, **fields)


# ---------------------------------------------------------------------------------------------------
# allocation
# ---------------------------------------------------------------------------------------------------


def test_default_beta_is_the_papers():
    assert defaults.HEADKV_BETA == 1.5
    assert HeadKV(retrieval_scores=profile()).beta == 1.5


def test_allocation_by_hand():
    # Scores [[1, 2], [3, 4]] normalise to p = [[.1, .2], [.3, .4]]. base 12, beta 2: each head keeps
    # 12 - 12/2 = 6 and pools 6, so the pool is 6 * 4 = 24: 6 + 2.4 = 8.4, 10.8, 13.2, 15.6 (sum 48).
    # Floors 8, 10, 13, 15 leave 2 tokens, to the largest remainders .8 (layer 0 head 1), .6 (layer 1 head 1).
    assert both_layers([[1, 2], [3, 4]], 12, 1000, beta=2.0) == [[8, 11], [13, 16]]
    assert both_layers([[10, 20], [30, 40]], 12, 1000, beta=2.0) == [[8, 11], [13, 16]]  # scale-free
    # The default beta 1.5, base 30: each head keeps 30 - 20 = 10, the pool is 20 * 4 = 80.
    # [[1, 1], [1, 5]] -> p = 1/8, 1/8, 1/8, 5/8 -> 10 + 10, 20, 20, 10 + 50 = 60.
    assert both_layers([[1, 1], [1, 5]], 30, 1000) == [[20, 20], [20, 60]]


def test_capped_head_passes_its_excess_on():
    # As above with 40 candidates: 60 is capped at 40 and its excess 20 goes to the three others in
    # proportion to their (equal) shares, 26.67 each. Floors 26, 26, 26, 40 = 118; the 2 leftover tokens go to
    # the lowest indices (equal remainders), so the model keeps exactly 4 x 30 = 120. The authors' code keeps
    # 20 + 20 + 20 + 40 = 100 (a capped head's excess is lost).
    assert both_layers([[1, 1], [1, 5]], 30, 40) == [[27, 27], [26, 40]]


def test_ties_and_exact_total():
    # beta 2, base 10: own 5, pool 20; [[1, 1], [1, 3]] -> 5 + 3.33 three times and 5 + 10 = 15. Floors 8, 8, 8,
    # 15 = 39: the last token goes to the lowest of the three tied heads. Rounding each head (the authors'
    # torch.round) keeps 39, one token short of 40.
    assert both_layers([[1, 1], [1, 3]], 10, 1000, beta=2.0) == [[9, 8], [8, 15]]
    # Equal scores: every head keeps base, whatever beta.
    for beta in (1.0, 1.005, 1.5, 10.0):
        assert both_layers([[2, 2], [2, 2]], 17, 1000, beta) == [[17, 17], [17, 17]]


def test_beta_extremes():
    # beta 1 pools everything: a zero-score head keeps only its window; 32 over p = 0, 1/4, 1/4, 1/2.
    assert both_layers([[0, 1], [1, 2]], 8, 1000, beta=1.0) == [[0, 8], [8, 16]]
    # A large beta pools almost nothing: nearly uniform (8 - 8e-6 of its own + up to 2 * 8e-6 from the pool).
    assert both_layers([[0, 1], [1, 2]], 8, 1000, beta=1e6) == [[8, 8], [8, 8]]
    # beta 1.005 (the smallest value the paper tries) pools all but 0.5%: close to proportional.
    assert both_layers([[0, 1], [1, 2]], 100, 1000, beta=1.005) == [[0, 100], [100, 200]]


def test_no_compression_when_prompt_fits():
    assert both_layers([[1, 1], [1, 5]], 30, 30) == [[30, 30], [30, 30]]
    assert both_layers([[1, 1], [1, 5]], 30, 7) == [[7, 7], [7, 7]]


def test_batch_rows_get_their_own_allocation():
    """Row 0 compresses, row 1 (12 real candidates <= base 16) keeps all of them, in one call."""
    table = torch.tensor([[1.0, 2.0, 0.0], [4.0, 1.0, 1.0]])
    got = budgets.headkv_counts(table, T(16, 16), T(50, 12), 1)
    assert got[1].tolist() == [12, 12, 12]
    assert got[0].tolist() == ref.headkv_counts(table.tolist(), 16, 50, 1)


def test_allocation_errors():
    with pytest.raises(ValueError, match="all zero"):
        budgets.headkv_counts(torch.zeros(2, 2), T(10), T(100), 0)
    for beta in (0.5, 0.0, -2.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="beta"):
            budgets.headkv_counts(torch.ones(2, 2), T(10), T(100), 0, beta)


@PROPS
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.integers(1, 4), st.integers(1, 80), st.integers(0, 300),
       st.sampled_from([1.0, 1.005, 1.2, 1.5, 2.0, 10.0]), st.booleans())
def test_allocation_matches_reference(seed, num_layers, num_heads, base, n_cand, beta, ties):
    gen = torch.Generator().manual_seed(seed)
    table = torch.rand(num_layers, num_heads, generator=gen)
    if ties:
        table = (table * 3).round()  # many exactly equal scores, some zero
    table[0, 0] += 0.25  # never all zero
    rows = T(n_cand, base + 1 + n_cand)  # a second sequence that always compresses
    per_layer = [budgets.headkv_counts(table, T(base, base), rows, layer, beta) for layer in range(num_layers)]
    got = torch.stack(per_layer, 1)  # (B, L, H)
    for b, nc in enumerate(rows.tolist()):
        want = [ref.headkv_counts(table.tolist(), base, nc, layer, beta) for layer in range(num_layers)]
        assert got[b].tolist() == want
        assert bool((got[b] >= 0).all()) and bool((got[b] <= nc).all())
        if nc > base:  # the whole model keeps exactly its budget
            assert int(got[b].sum()) == base * num_layers * num_heads
            flat_s, flat_c = table.flatten().tolist(), got[b].flatten().tolist()
            for i in range(len(flat_s)):  # a clearly more important head never keeps less
                for j in range(len(flat_s)):
                    if flat_s[i] > flat_s[j] * (1 + 1e-6) + 1e-9:
                        assert flat_c[i] >= flat_c[j]
        else:
            assert got[b].tolist() == [[nc] * num_heads] * num_layers


# ---------------------------------------------------------------------------------------------------
# retrieval-reasoning scores (calibration maths)
# ---------------------------------------------------------------------------------------------------


def _one_step(q, answer, scaling=1.0):
    """One KV head, one query head, one step: keys e_0 .. e_3, so the logits are the query itself."""
    queries = torch.tensor(q, dtype=torch.float64).view(1, 1, 1, 4)
    keys = torch.eye(4, dtype=torch.float64)[None, None]
    mask = torch.tensor([[i in answer for i in range(4)]])
    got = float(cal.retrieval_reasoning_hits(queries, keys, mask, scaling)[0, 0])
    want = float(ref.retrieval_reasoning_mass(queries, keys, mask, scaling)[0, 0])
    assert got == pytest.approx(want, abs=1e-7)
    return got


def test_retrieval_mass_by_hand():
    ln2, ln4 = math.log(2), math.log(4)
    # Logits [0, ln 2, ln 4, 0] -> attention [1, 2, 4, 1] / 8.
    # Answer {1, 3}: k = 2, the top 2 are positions 2 (.5) and 1 (.25); only 1 is in the answer: .25 / 2.
    assert _one_step([0, ln2, ln4, 0], {1, 3}) == pytest.approx(0.125)
    # Answer {2}: k = 1, the top 1 is position 2: .5 / 1.
    assert _one_step([0, ln2, ln4, 0], {2}) == pytest.approx(0.5)
    # Answer {0, 3}: the top 2 (positions 2 and 1) miss it entirely, although it holds 1/4 of the attention.
    assert _one_step([0, ln2, ln4, 0], {0, 3}) == 0.0
    # Ties: attention [1, 1, 4, 1] / 7; the second place is tied between 0, 1, 3 and goes to the earliest (0).
    assert _one_step([0, 0, ln4, 0], {0, 3}) == pytest.approx(1 / 14)
    assert _one_step([0, 0, ln4, 0], {1, 3}) == 0.0
    # The scale multiplies the logits: scaling 0.5 on [0, ln 4, ln 16, 0] is the first case again.
    assert _one_step([0, 2 * ln2, 2 * ln4, 0], {1, 3}, scaling=0.5) == pytest.approx(0.125)


def test_retrieval_mass_steps_are_causal_and_groups_average():
    keys = torch.eye(4)[None, None]  # (1, 1, 4, 4); M = 4: a 3-token prompt + 1 generated token fed back
    answer = torch.tensor([[True, False, False, False]])
    # Two steps: step 0 sits at position 2 and cannot see key 3 (its huge logit must not count): uniform over
    # 0..2, top 1 = position 0 (earliest of the tie) -> 1/3. Step 1 (position 3) sees all: [2, 1, 1, 1] / 5 -> .4.
    q_head0 = [[0.0, 0, 0, 100], [math.log(2), 0, 0, 0]]
    q_head1 = [[0.0, 0, 100, 0], [0.0, 0, 0, 0]]  # step 0: all on key 2 (miss); step 1: uniform, top 1 = 0 -> .25
    queries = torch.tensor([[q_head0, q_head1]])  # (1, 2, 2, 4): two query heads share the KV head
    got = cal.retrieval_reasoning_hits(queries, keys, answer, 1.0)
    assert float(got[0, 0]) == pytest.approx(((1 / 3 + 0.4) + (0.0 + 0.25)) / 2, abs=1e-6)
    only_second = cal.retrieval_reasoning_hits(queries, keys, answer, 1.0, torch.tensor([[False, True]]))
    assert float(only_second[0, 0]) == pytest.approx((0.4 + 0.25) / 2, abs=1e-6)
    # Padding on key 0 removes it from the softmax and from the ranking.
    valid = torch.tensor([[False, True, True, True]])
    assert float(cal.retrieval_reasoning_hits(queries, keys, answer & valid, 1.0, None, valid)[0, 0]) == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_retrieval_mass_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    b, h, g, t, m, d = 2, 2, 3, 3, 20, 8
    q = torch.randn(b, h * g, t, d, generator=gen) * 2
    k = torch.randn(b, h, m, d, generator=gen)
    answer = torch.zeros(b, m, dtype=torch.bool)
    answer[0, 4:7] = True
    answer[1, [2, 9, 10, 15]] = True
    valid = torch.ones(b, m, dtype=torch.bool)
    valid[1, :2] = False  # left padding on the second sequence
    steps = torch.tensor([[True, False, True], [True, True, True]])
    got = cal.retrieval_reasoning_hits(q, k, answer, d**-0.5, steps, valid)
    want = ref.retrieval_reasoning_mass(q, k, answer, d**-0.5, steps, valid)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    assert bool((got >= 0).all()) and bool((got <= steps.sum(-1)[:, None]).all())


# ---------------------------------------------------------------------------------------------------
# the method, the registry and the profile field
# ---------------------------------------------------------------------------------------------------


def test_method_errors(tmp_path):
    with pytest.raises(ValueError, match="HeadKV needs retrieval_scores"):
        HeadKV(budget=64)
    with pytest.raises(ValueError, match="HeadKV needs retrieval_scores"):
        mixkv.make_method("headkv+mixkv", budget=64)
    sparse_only = Profile("m", 2, 2, head_scores=TABLE)
    with pytest.raises(ValueError, match="no retrieval_scores"):
        HeadKV(retrieval_scores=sparse_only)
    with pytest.raises(ValueError, match="no retrieval_scores"):
        mixkv.make_method("headkv", profile=save_profile(sparse_only, tmp_path / "sparse.json"))
    with pytest.raises(ValueError, match="all zero"):
        HeadKV(retrieval_scores=profile([[0.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(FileNotFoundError):
        HeadKV(retrieval_scores=tmp_path / "missing.json")
    with pytest.raises(ValueError, match="Profile or a JSON path"):
        HeadKV(retrieval_scores=[[1.0, 2.0]])
    for beta in (0.9, float("nan"), True, "1.5"):
        with pytest.raises(ValueError, match="beta must be a number >= 1"):
            HeadKV(retrieval_scores=profile(), beta=beta)
    with pytest.raises(ValueError, match="budget"):
        HeadKV(budget=8, window=8, retrieval_scores=profile())
    with pytest.raises(ValueError, match="non-negative"):
        profile([[1.0, -0.1], [0.0, 1.0]])
    with pytest.raises(ValueError, match="shape"):
        Profile("m", 2, 2, retrieval_scores=[[1.0, 2.0, 3.0]])


def test_registry_and_profile_round_trip(tmp_path):
    assert {"headkv", "headkv+mixkv"} <= set(mixkv.available_methods())
    path = save_profile(profile(key_redundancy=[[0.2, 0.4], [0.6, 0.8]]), tmp_path / "p.json")
    m = mixkv.make_method("headkv", budget=40, window=WINDOW, profile=path, beta=2.0)
    assert isinstance(m, HeadKV) and m.beta == 2.0 and (m.budget, m.window) == (40, WINDOW)
    torch.testing.assert_close(m.retrieval_scores.retrieval_scores, torch.tensor(TABLE))
    wrapped = mixkv.make_method("headkv+mixkv", budget=40, profile=path, redundancy="profile")
    assert isinstance(wrapped, MixKV) and isinstance(wrapped.base, HeadKV) and wrapped.name == "headkv+mixkv"
    assert "beta=2.0" in m.describe()
    # A version-1 file written before the field existed (no "retrieval_scores" key) still loads.
    old = {"format": FORMAT, "version": VERSION, "model": "old", "num_layers": 2, "num_kv_heads": 2,
           "key_redundancy": [[0.1, 0.2], [0.3, 0.4]], "value_redundancy": None, "head_scores": TABLE,
           "data": {}, "library_version": "0.1.0"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = load_profile(tmp_path / "old.json")
    assert loaded.retrieval_scores is None and loaded.fields() == ["key_redundancy", "head_scores"]
    assert json.loads(path.read_text())["retrieval_scores"] == TABLE


@pytest.mark.parametrize("mix", [None, "online"])
def test_plan_keep_matches_reference(mix):
    """Kept positions against the loop reference on the shared selection cases (padding, GQA, tiny budgets)."""
    for seed, b, h, g, w, n, d, budget, pads in tsr.CASES:
        q, k, v, valid = ref.make_inputs(seed, b, h, g, w, n, d, pads)
        gen = torch.Generator().manual_seed(2000 + seed)
        table = torch.rand(tsr.NUM_LAYERS, h, generator=gen) ** 2
        table[0, 0] = 0.0
        lib = HeadKV(budget=budget, window=w, retrieval_scores=Profile("t", tsr.NUM_LAYERS, h,
                                                                       retrieval_scores=table))
        lib = lib if mix is None else MixKV(lib)
        rm = ref.RefMethod("headkv", budget, w, retrieval_scores=table.tolist(), mix=mix)
        for layer in range(tsr.NUM_LAYERS):
            plan = plan_keep(lib, LayerPrefill(layer, tsr.NUM_LAYERS, q, k, v, d**-0.5, w, valid=valid))
            want = ref.keep_plan(rm, layer, tsr.NUM_LAYERS, q, k, v, d**-0.5, valid)
            for bb in range(b):
                for hh in range(h):
                    where = f"{lib.describe()} case {seed} layer {layer} batch {bb} head {hh}"
                    got = tsr.lib_kept(plan, bb, hh)
                    assert len(got) == want[bb][hh].count + min(w, n - (pads[bb] if pads else 0)), where
                    tsr.assert_same_selection(got, want[bb][hh], where)


# ---------------------------------------------------------------------------------------------------
# under press, on a tiny model
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return make_model("llama", attn_implementation="eager")


@pytest.mark.parametrize("name", ["headkv", "headkv+mixkv"])
def test_budget_covering_prompt_is_token_identical(llama, name):
    inputs = make_inputs(llama, "llama")
    n = inputs["input_ids"].shape[1]
    ref_out = llama.generate(**inputs, max_new_tokens=6, do_sample=False)
    with press(llama, name, budget=n + 5, window=WINDOW, profile=profile()) as session:
        out = llama.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref_out)
    assert session.stats.layers_compressed == 0


def test_kept_lengths_are_the_allocation(llama):
    inputs = make_inputs(llama, "llama", text_len=120)
    n = inputs["input_ids"].shape[1]
    budget = 20
    with press(llama, "headkv", budget=budget, window=WINDOW, profile=profile()) as session:
        llama(**inputs, use_cache=True)
    kept = [session.stats.kept_per_layer[layer][0].tolist() for layer in range(2)]
    want = [[c + WINDOW for c in ref.headkv_counts(TABLE, budget - WINDOW, n - WINDOW, layer)] for layer in range(2)]
    # p = [[1, 3], [2, .5]] / 6.5; base 12, beta 1.5: own 4, pool 32: 4 + 4.92, 4 + 14.77, 4 + 9.85, 4 + 2.46.
    assert want == [[9 + WINDOW, 19 + WINDOW], [14 + WINDOW, 6 + WINDOW]]
    assert kept == want
    assert sum(map(sum, kept)) == budget * 2 * 2  # the model's total is exactly the budget


@pytest.mark.parametrize("name", ["headkv", "headkv+mixkv"])
def test_decoding_equals_masked_reference(llama, name):
    inputs = make_inputs(llama, "llama")
    n = inputs["input_ids"].shape[1]
    method = mixkv.make_method(name, budget=20, window=WINDOW, profile=profile())
    with press(llama, method, record=True) as session:
        out = llama(**inputs, use_cache=True)
        cache, logits = out.past_key_values, [out.logits[:, -1]]
        extra = torch.tensor([[5 + i] for i in range(3)])
        for i in range(3):
            logits.append(llama(input_ids=extra[i: i + 1], cache=cache, use_cache=True).logits[:, -1])
    got = torch.stack(logits, 1)
    lengths = {int(x) for plan in session.plans.values() for x in plan.lengths.flatten()}
    assert len(session.plans) == 2 and len(lengths) > 1  # compressed, with per-head lengths
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], extra.T], 1))
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    with masked_reference(llama, session.plans, n):
        want = llama(**full).logits[:, n - 1:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_alone_equals_in_padded_batch(llama):
    batch = make_inputs(llama, "llama", batch=2, left_pad=[0, 7], seed=1, image=False)
    alone = {k: v[1:2, 7:] for k, v in batch.items()}
    m = mixkv.make_method("headkv+mixkv", budget=20, window=WINDOW, profile=profile())
    with press(llama, m, record=True) as s_batch:
        out_b = llama.generate(**batch, max_new_tokens=4, do_sample=False)
        plans_b = dict(s_batch.plans)
    with press(llama, m, record=True) as s_one:
        out_1 = llama.generate(**alone, max_new_tokens=4, do_sample=False)
    assert torch.equal(out_b[1, -4:], out_1[0, -4:])
    for idx, plan in plans_b.items():
        one = s_one.plans[idx]
        assert torch.equal(plan.lengths[1], one.lengths[0])
        for h in range(plan.indices.shape[1]):
            length = int(one.lengths[0, h])
            assert torch.equal(plan.indices[1, h, :length] - 7, one.indices[0, h, :length])


def test_profile_of_another_model_raises_on_use(llama):
    other = Profile("other", 3, 2, retrieval_scores=torch.ones(3, 2))
    inputs = make_inputs(llama, "llama")
    with pytest.raises(ValueError, match="layers x"), press(llama, HeadKV(budget=16, window=4, retrieval_scores=other)):
        llama(**inputs)


# ---------------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------------


def _sample(model, seed: int, answer: list[int], pad: int = 0) -> CalibrationSample:
    inputs = make_inputs(model, "llama", text_len=40, seed=seed, left_pad=[pad])
    mask = torch.zeros(inputs["input_ids"].shape[1], dtype=torch.bool)
    mask[answer] = True
    return CalibrationSample(inputs, answer_mask=mask, name=f"s{seed}")


def test_retrieval_scores_equal_eager_attention_of_decoding_steps(llama, tmp_path):
    """The profile's retrieval_scores from the model's own attention weights, step by step (top-k, k = |answer|)."""
    answers = [[5, 6, 7, 20], [11, 30]]
    samples = [_sample(llama, 3, answers[0]), _sample(llama, 4, answers[1], pad=3)]
    steps = 4
    prof = calibrate(llama, samples, tmp_path / "p.json", max_new_tokens=steps, hits_on="all", progress=False)
    mass = torch.zeros(2, 2, dtype=torch.float64)
    for s, ans in zip(samples, answers):
        out = llama.generate(**s.inputs, max_new_tokens=steps, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True)
        for per_layer in out.attentions:  # step j: the query that produced token j, over prompt + j tokens
            for layer, attn in enumerate(per_layer):
                row = attn[0, :, -1].double()  # (Hq, n + j)
                top = row.topk(len(ans), dim=-1)
                hit = torch.tensor([[float(i in ans) for i in idx] for idx in top.indices.tolist()],
                                   dtype=torch.float64)
                per_head = (top.values * hit).sum(-1) / len(ans)
                mass[layer] += per_head.view(2, 2).mean(-1)  # 4 query heads, 2 KV heads
    assert prof.retrieval_scores is not None and prof.head_scores is not None
    torch.testing.assert_close(prof.retrieval_scores.double(), mass / (steps * len(samples)), atol=1e-6, rtol=0)
    assert float(prof.retrieval_scores.sum()) > 0
    # The profile drives HeadKV on the same model (and its saved copy loads with the field).
    saved = load_profile(tmp_path / "p.json")
    torch.testing.assert_close(saved.retrieval_scores, prof.retrieval_scores)
    with press(llama, "headkv+mixkv", budget=20, window=WINDOW, profile=saved) as session:
        llama.generate(**samples[0].inputs, max_new_tokens=2, do_sample=False)
    assert session.stats.layers_compressed == 2


def test_partial_state_carries_retrieval_sums(llama, tmp_path):
    state = cal.Accumulator(2, 2)
    m = cal.Measurement(torch.full((2, 2), 0.5), torch.full((2, 2), 0.25), torch.ones(2, 2), 3, [1, 2, 3],
                        torch.full((2, 2), 0.75))
    state.add(m, "abc")
    back = cal.Accumulator.from_json(json.loads(json.dumps(state.to_json())))
    torch.testing.assert_close(back.retrieval_sum, torch.full((2, 2), 0.75, dtype=torch.float64))
    bad = dict(state.to_json(), retrieval_sum=[[5.0, 0.0], [0.0, 0.0]])  # more than 3 counted steps can add
    with pytest.raises(ValueError, match="retrieval_sum"):
        cal.Accumulator.from_json(bad)
    old = {k: v for k, v in state.to_json().items() if k != "retrieval_sum"}
    with pytest.raises(ValueError, match="older mixkv"):
        cal.Accumulator.from_json(old)
    # Without counted steps an old state lacks nothing: its retrieval sums are zero.
    no_steps = dict(old, hits_sum=[[0.0, 0.0], [0.0, 0.0]], steps=0)
    assert float(cal.Accumulator.from_json(no_steps).retrieval_sum.abs().sum()) == 0.0
    # An interrupted run's partial file from before HeadKV is refused with a clear message, not resumed.
    samples = [_sample(llama, 7, [4, 5])]
    kw = dict(max_new_tokens=2, hits_on="all", progress=False)
    spec = {"data": {}, "max_new_tokens": 2, "hits_on": "all", "n": 1}
    out = tmp_path / "p.json"
    partial_path(out).write_text(json.dumps({"format": cal.PARTIAL_FORMAT, "model": "zoo", "spec": spec,
                                             "state": old}))
    with pytest.raises(ValueError, match="older mixkv"):
        calibrate(llama, samples, out, model_id="zoo", resume=True, **kw)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 7, **{f"w{i}": i for i in range(8, 256)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]")


def test_calibrate_command_prints_top_headkv_heads(llama, tmp_path, capsys):
    lines = [{"prompt": " ".join(f"w{8 + (i * 7) % 200}" for i in range(40)) + " w250 w251 w9", "chat": False,
              "answer_span": [0, 7], "answer": "w8 w15"}]
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    model_dir = tmp_path / "model"
    llama.save_pretrained(model_dir)
    _word_tokenizer().save_pretrained(model_dir)
    from mixkv.cli import calibrate as cmd

    parser = argparse.ArgumentParser()
    cmd.add_parser(parser.add_subparsers())
    out = tmp_path / "cli.json"
    args = parser.parse_args(["calibrate", "--model", str(model_dir), "--data", str(data), "--n", "1", "--out",
                              str(out), "--hits-on", "all", "--max-new-tokens", "3", "--threads", "1"])
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert "top HeadKV heads (layer, head, retrieval-reasoning score)" in printed
    prof = load_profile(out)
    assert prof.retrieval_scores is not None and prof.head_scores is not None
    assert "retrieval_scores" in prof.fields()
    HeadKV(budget=16, window=4, retrieval_scores=out)  # usable as is


def test_names_and_description():
    m = HeadKV(retrieval_scores=profile())
    assert m.name == "headkv" and m.describe() == "headkv(budget=64, window=32, beta=1.5)"
    assert MixKV(m).name == "headkv+mixkv" and MixKV(m).describe().startswith("MixKV(headkv(")
    assert isinstance(m, mixkv.BudgetedMethod)
