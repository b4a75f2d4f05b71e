"""Stacked decoding: many methods' compressions of one prompt decoded as one batch give each method's
own tokens, kept positions and cache bytes (evaluation's fast path, ``mixkv eval --stack``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from zoo import make_inputs, make_model  # noqa: E402

import mixkv  # noqa: E402
from mixkv.core.capture import build_stacked_cache, capture_prefill, stack_plans  # noqa: E402
from mixkv.core.selection import KeepPlan  # noqa: E402
from mixkv.lab.evaluation import EvalConfig, EvalItem, evaluate  # noqa: E402
from mixkv.lab.run import run_method, run_methods_stacked  # noqa: E402

WINDOW = 8
NAMES = ("random", "snapkv", "snapkv+mixkv", "pyramidkv", "pyramidkv+mixkv", "adakv", "adakv+mixkv")


@pytest.mark.parametrize("arch", ["llama", "qwen2_vl"])
def test_stacked_runs_equal_one_at_a_time(arch):
    model = make_model(arch)
    inputs = make_inputs(model, arch)
    n = inputs["input_ids"].shape[1]
    pre = capture_prefill(model, inputs, window=WINDOW)
    # budgets below the prompt, and one above it (that method keeps every token: the keep-all entry)
    methods = [mixkv.make_method(name, budget=b, window=WINDOW) for name in NAMES for b in (12, 20)]
    methods.append(mixkv.make_method("snapkv", budget=n + 5, window=WINDOW))
    stacked = run_methods_stacked(model, pre, methods, 6)
    assert len(stacked) == len(methods)
    for method, got in zip(methods, stacked, strict=True):
        want = run_method(model, pre, method, 6)
        assert got.tokens == want.tokens, method
        assert got.kv_bytes == want.kv_bytes, method
        assert sorted(got.plans) == sorted(want.plans)
        for idx, plan in want.plans.items():
            assert torch.equal(got.plans[idx].lengths, plan.lengths)
            assert torch.equal(got.plans[idx].indices[plan.valid()], plan.indices[plan.valid()])
    full = run_method(model, pre, None, 6)
    assert stacked[-1].tokens == full.tokens  # the budget covers the prompt: exactly the full cache


def test_stacked_cache_holds_each_method_in_its_batch_entry():
    model = make_model("llama")
    pre = capture_prefill(model, make_inputs(model, "llama"), window=WINDOW)
    methods = [mixkv.make_method("snapkv", budget=12, window=WINDOW), mixkv.make_method("adakv", budget=20,
                                                                                          window=WINDOW)]
    session = mixkv.core.press.open_session(model, methods[0])
    try:
        cache, plans, seconds = build_stacked_cache(pre, methods, session)
    finally:
        session.detach()
    assert len(cache.layers) == len(pre.layers) and len(seconds) == 2
    layer = cache.layers[0]
    assert layer.batch_size == 2
    assert torch.equal(layer.kept_lengths[0], plans[0][0].lengths[0])  # 12 per head
    assert torch.equal(layer.kept_lengths[1], plans[1][0].lengths[0])  # adakv: 20 per head on average
    assert int(layer.kept_lengths[0].sum()) == 12 * layer.num_heads
    assert int(layer.kept_lengths[1].sum()) == 20 * layer.num_heads


def test_stack_plans_pads_filler_and_keeps_lengths():
    a = KeepPlan(torch.tensor([[[0, 3, 5]]]), torch.tensor([[3]]))
    b = KeepPlan(torch.tensor([[[1, 2, 7, 9, 0]]]), torch.tensor([[4]]))
    s = stack_plans([a, b])
    assert s.indices.tolist() == [[[0, 3, 5, 0, 0]], [[1, 2, 7, 9, 0]]]
    assert s.lengths.tolist() == [[3], [4]]


def test_stacking_refuses_what_it_cannot_do():
    model = make_model("llama")
    pre = capture_prefill(model, make_inputs(model, "llama", batch=2), window=WINDOW)
    session = mixkv.core.press.open_session(model, mixkv.make_method("snapkv", budget=12, window=WINDOW))
    try:
        with pytest.raises(ValueError, match="at least one method"):
            build_stacked_cache(pre, [], session)
        with pytest.raises(ValueError, match="prefill of one sequence, got batch 2"):
            build_stacked_cache(pre, [mixkv.make_method("snapkv", budget=12, window=WINDOW)], session)
    finally:
        session.detach()
    assert run_methods_stacked(model, pre, [], 4) == []
    with pytest.raises(ValueError, match="stack must be a positive int"):
        EvalConfig(methods=["snapkv"], budgets=[12], stack=0).validate()


def test_evaluate_gives_the_same_results_stacked():
    model = make_model("llama")
    items = [EvalItem(task=t, inputs=make_inputs(model, "llama", seed=s), score=lambda text: float(len(text) % 2))
             for s, t in enumerate(["a", "b", "a"])]
    out = {}
    for stack in (1, 3, 50):
        config = EvalConfig(methods=["full", "snapkv", "adakv+mixkv", "pyramidkv"], budgets=[12, 20], window=WINDOW,
                            max_new_tokens=5, stack=stack)
        res = evaluate(model, items, config, lambda ids: " ".join(map(str, ids)), progress=False)
        out[stack] = sorted((r["index"], r["method"], r["budget"] or 0, r["output"]) for r in res["samples"])
    assert out[1] == out[3] == out[50]
    assert len(out[1]) == 3 * (1 + 3 * 2)
