"""Reliability: one press per model, true lengths with sliding windows, batch invariance, exact budgets.

Each test here failed on the code before the fix it guards (issue "Reliability").
"""

from __future__ import annotations

import itertools
import re
import sys
import threading
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

sys.path.insert(0, str(Path(__file__).parent))

from zoo import _configure_generation, make_config, make_inputs, make_model, model_class  # noqa: E402

import mixkv  # noqa: E402
from mixkv import MixKV, Profile, SnapKV, SparseMM, press  # noqa: E402
from mixkv.core import budgets  # noqa: E402
from mixkv.core.layer import LayerPrefill  # noqa: E402
from mixkv.core.selection import plan_keep  # noqa: E402

WINDOW = 4
PROPS = settings(max_examples=60, deadline=None)


@pytest.fixture(scope="module")
def llama():
    return make_model("llama")


def _registered():
    """Attention functions a press registered (``mixkv<id>_<impl>``) and did not remove."""
    return sorted(k for k in [*AttentionInterface._global_mapping, *AttentionMaskInterface._global_mapping]
                  if re.match(r"mixkv\d+_", k))


# ---- 1. one press per model ---------------------------------------------------------------------

def test_second_press_on_the_same_model_is_refused(llama):
    inputs = make_inputs(llama, "llama", text_len=40, image=False)
    impl = llama.config._attn_implementation
    with press(llama, "snapkv", budget=12, window=WINDOW):
        with pytest.raises(RuntimeError, match="already inside a mixkv press"), \
                press(llama, "adakv", budget=12, window=WINDOW):
            pass
        # The refused press left nothing behind; the first one still compresses.
        out = llama.generate(**inputs, max_new_tokens=5, return_dict_in_generate=True)
        assert out.past_key_values.get_seq_length() == 44
        assert all(layer.kept_lengths.max() == 12 for layer in out.past_key_values.layers)
    assert llama.config._attn_implementation == impl and _registered() == []


def test_presses_on_two_models_exit_in_any_order():
    a, b = make_model("llama"), make_model("qwen2")
    impl_a, impl_b = a.config._attn_implementation, b.config._attn_implementation
    inputs = make_inputs(a, "llama", image=False)
    want = a.generate(**inputs, max_new_tokens=4)
    stack_a, stack_b = ExitStack(), ExitStack()
    stack_a.enter_context(press(a, "snapkv", budget=12, window=WINDOW))
    stack_b.enter_context(press(b, "snapkv", budget=12, window=WINDOW))
    stack_a.close()  # out of order: a first, b still pressed
    assert a.config._attn_implementation == impl_a
    assert torch.equal(a.generate(**inputs, max_new_tokens=4), want)
    stack_b.close()
    assert b.config._attn_implementation == impl_b and _registered() == []
    b.generate(**make_inputs(b, "qwen2", image=False), max_new_tokens=2)  # no KeyError


def test_a_second_thread_cannot_press_a_pressed_model(llama):
    inputs = make_inputs(llama, "llama", image=False)
    with press(llama, "snapkv", budget=12, window=WINDOW):
        want = llama.generate(**inputs, max_new_tokens=5)
    inside, release = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def holder():
        with press(llama, "snapkv", budget=12, window=WINDOW):
            inside.set()
            release.wait(30)
            results["holder"] = llama.generate(**inputs, max_new_tokens=5)

    def intruder():
        inside.wait(30)
        try:
            with press(llama, "adakv", budget=12, window=WINDOW):
                results["intruder"] = "pressed"
        except RuntimeError as e:
            results["intruder"] = str(e)
        release.set()

    threads = [threading.Thread(target=holder), threading.Thread(target=intruder)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert "one press per model" in results["intruder"]
    assert torch.equal(results["holder"], want)
    assert _registered() == []


def test_threads_serialised_by_a_lock_give_sequential_outputs(llama):
    """The documented way to share one model between threads: a lock around the press."""
    prompts = [make_inputs(llama, "llama", image=False, seed=s) for s in range(4)]
    methods = ["snapkv", "adakv+mixkv", "pyramidkv", "snapkv+mixkv"]
    want = []
    for inp, name in zip(prompts, methods):
        with press(llama, name, budget=12, window=WINDOW):
            want.append(llama.generate(**inp, max_new_tokens=4))
    lock, got = threading.Lock(), [None] * 4

    def work(i):
        with lock, press(llama, methods[i], budget=12, window=WINDOW):
            got[i] = llama.generate(**prompts[i], max_new_tokens=4)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---- 2. logical length with sliding-window layers ----------------------------------------------------

def _sliding_mistral(window: int = 48):
    config = make_config("mistral")
    config.sliding_window = window
    torch.manual_seed(0)
    model = model_class("mistral")(config)
    _configure_generation(model)
    return model.eval()


def test_sliding_window_layers_report_the_prompts_length():
    model = _sliding_mistral(48)
    inputs = make_inputs(model, "mistral", text_len=120, image=False)
    plain = model.generate(**inputs, max_new_tokens=5, return_dict_in_generate=True)
    assert plain.past_key_values.layers[0].keys.shape[2] < 120  # the layer really stores only a suffix
    with press(model, "snapkv", budget=20, window=WINDOW) as session:
        out = model.generate(**inputs, max_new_tokens=5, return_dict_in_generate=True)
        cache = out.past_key_values
        assert cache.get_seq_length() == plain.past_key_values.get_seq_length() == 124
        assert all(layer.kept_lengths.max() == 20 for layer in cache.layers)
        assert session.stats.prompt_length == 120
        # A second turn feeds only its new tokens: 125 known + 6 new, then 3 generated.
        ids = torch.cat([out.sequences, torch.tensor([[9, 10, 11, 12, 13, 14]])], 1)
        turn = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=3,
                              return_dict_in_generate=True)
        assert turn.past_key_values.get_seq_length() == ids.shape[1] + 2


# ---- 3. a sequence alone == the same sequence in a left-padded batch -----------------------------------

@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "adakv", "random", "snapkv+mixkv", "adakv+mixkv",
                                    "sparsemm", "sparsemm+mixkv"])
def test_alone_equals_in_padded_batch_for_every_method(llama, method):
    """Exact score ties at the cut used to be broken differently with padding (a fifth of these cases)."""
    profile = Profile("zoo-llama", 2, 2, head_scores=[[1.0, 3.0], [2.0, 0.5]])
    mismatches = []
    for pad, budget in itertools.product([1, 5, 11, 17], [8, 12, 20, 30]):
        batch = make_inputs(llama, "llama", batch=2, left_pad=[0, pad], seed=pad, image=False)
        alone = {k: v[1:2, pad:] for k, v in batch.items()}
        m = mixkv.make_method(method, budget=budget, window=WINDOW, profile=profile)
        with press(llama, m, record=True) as s:
            out_b = llama.generate(**batch, max_new_tokens=4)
            plans_b = dict(s.plans)
        with press(llama, m, record=True) as s:
            out_1 = llama.generate(**alone, max_new_tokens=4)
            plans_1 = dict(s.plans)
        same = torch.equal(out_b[1, -4:], out_1[0, -4:])
        real = alone["input_ids"].shape[1]
        for idx, b in plans_b.items():
            one = plans_1.get(idx)
            for h in range(b.indices.shape[1]):
                kept = b.indices[1, h, : int(b.lengths[1, h])] - pad
                # Alone, a prompt that fits its budget is not compressed: in the batch it keeps all its tokens.
                want = torch.arange(real) if one is None else one.indices[0, h, : int(one.lengths[0, h])]
                same &= torch.equal(kept, want)
        if not same:
            mismatches.append((pad, budget))
    assert mismatches == []


# ---- 4. budgets are exactly what was asked ---------------------------------------------------------

def test_sparsemm_with_all_zero_head_scores_is_an_error():
    with pytest.raises(ValueError, match="all zero"):
        SparseMM(budget=40, window=WINDOW, head_scores=Profile("m", 2, 2, head_scores=[[0, 0], [0, 0]]))


@PROPS
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 8), st.integers(1, 6), st.integers(1, 60),
       st.integers(0, 300), st.sampled_from([0.0, 0.2, 0.5, 1.0]), st.booleans())
def test_every_allocation_keeps_exactly_the_budget(seed, batch, heads, layers, cand_budget, extra, alpha, normalize):
    """Sum over heads == the layer's budget (AdaKV, uniform), == the model's budget (SparseMM)."""
    gen = torch.Generator().manual_seed(seed)
    n_cand = torch.randint(cand_budget + 1, cand_budget + 2 + extra, (batch,), generator=gen)
    base = torch.full((batch,), cand_budget)
    c = int(n_cand.max())
    s = torch.rand(batch, heads, c, generator=gen) ** 3
    s[:, :, : c // 3] = s[:, :, : c // 3].round(decimals=1)  # plenty of exact ties
    cand_valid = (torch.arange(c)[None, :] >= (c - n_cand)[:, None])[:, None, :]
    s = s * cand_valid
    ada = budgets.adakv_counts(s, cand_valid, base, n_cand, alpha, normalize)
    assert torch.equal(ada.sum(-1), base * heads) and bool((ada <= n_cand[:, None]).all())
    assert torch.equal(budgets.uniform_counts(base, n_cand, heads).sum(-1), base * heads)
    table = torch.rand(layers, heads, generator=gen) * (torch.rand(layers, heads, generator=gen) > 0.3)
    table[0, 0] += 0.01  # not all zero
    sparse = torch.stack([budgets.sparsemm_counts(table, base, n_cand, li) for li in range(layers)], 1)
    assert torch.equal(sparse.sum((1, 2)), base * heads * layers)
    assert bool((sparse <= n_cand[:, None, None]).all()) and bool((sparse >= 0).all())


# ---- property test over random shapes: plan_keep ------------------------------------------------------

@PROPS
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 8), st.integers(1, 4),
       st.sampled_from([4, 8, 16]), st.integers(1, 400), st.integers(1, 16), st.integers(1, 120),
       st.sampled_from(["snapkv", "pyramidkv", "adakv", "random", "sparsemm", "snapkv+mixkv", "adakv+mixkv",
                        "pyramidkv+mixkv", "sparsemm+mixkv"]))
def test_plan_keep_on_random_shapes(seed, batch, kv_heads, group, dim, n, window, budget_extra, method):
    """No crash, no NaN, budget >= prompt keeps everything, counts == allocation, alone == in batch."""
    gen = torch.Generator().manual_seed(seed)
    num_layers = 3
    q = torch.randn(batch, kv_heads * group, window, dim, generator=gen)
    if n < window:
        n = window
    k = torch.randn(batch, kv_heads, n, dim, generator=gen) * 2
    v = torch.randn(batch, kv_heads, n, dim, generator=gen)
    k[:, :, 1::7] = k[:, :, :1]  # repeated keys: exact score ties
    pads = torch.randint(0, n, (batch,), generator=gen)
    pads[0] = 0
    valid = torch.arange(n)[None, :] >= pads[:, None]
    profile = Profile("rand", num_layers, kv_heads, key_redundancy=torch.rand(num_layers, kv_heads, generator=gen),
                      head_scores=torch.rand(num_layers, kv_heads, generator=gen) + 0.01)
    m = mixkv.make_method(method, budget=window + budget_extra, window=window, profile=profile)
    layer = 1
    full = LayerPrefill(layer, num_layers, q, k, v, dim**-0.5, window, 5, valid if bool((pads > 0).any()) else None)
    assert torch.isfinite(m.score(full).masked_fill(~full.cand_valid, 0)).all()
    plan = plan_keep(m, full)
    counts = m.allocate(full)
    window_real = valid[:, n - window:].sum(-1)
    assert torch.equal(plan.lengths, counts + window_real[:, None])
    for b in range(batch):
        p = int(pads[b])
        real = n - p
        if real <= window + budget_extra:  # fits: keeps every real token
            for h in range(kv_heads):
                assert plan.indices[b, h, : plan.lengths[b, h]].tolist() == list(range(p, n))
        if real < window:  # alone it would have fewer tokens than window queries: nothing to compare
            continue
        alone = LayerPrefill(layer, num_layers, q[b:b + 1], k[b:b + 1, :, p:], v[b:b + 1, :, p:], dim**-0.5,
                             window, 5)
        one = plan_keep(m, alone)
        assert torch.equal(one.lengths[0], plan.lengths[b])
        for h in range(kv_heads):
            length = int(one.lengths[0, h])
            assert torch.equal(plan.indices[b, h, :length] - p, one.indices[0, h, :length])


def test_mixkv_composes_without_forwarding(llama):
    """A wrapper takes budget, window, allocation and checks from its base through ScoreWrapper."""
    m = MixKV(SnapKV(budget=24, window=WINDOW))
    assert (m.budget, m.window, m.kernel, m.name) == (24, WINDOW, 5, "snapkv+mixkv")
    assert isinstance(m, mixkv.Method)
