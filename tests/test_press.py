"""End-to-end behaviour of ``press`` on tiny random models of every supported architecture."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers.modeling_utils import AttentionInterface

sys.path.insert(0, str(Path(__file__).parent))

from masked_reference import masked_reference  # noqa: E402
from zoo import ARCHS, make_inputs, make_model  # noqa: E402

import mixkv  # noqa: E402
from mixkv import MixKV, PyramidKV, SnapKV, press  # noqa: E402
from mixkv.core.budgets import pyramid_counts  # noqa: E402
from mixkv.core.cache import CompressedLayer  # noqa: E402

METHODS = ["snapkv", "pyramidkv", "snapkv+mixkv", "pyramidkv+mixkv", "adakv", "adakv+mixkv"]
WINDOW = 8


def _greedy(model, inputs, n=6, **kw):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)


@pytest.fixture(scope="module")
def models():
    cache: dict = {}

    def get(arch, **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = make_model(arch, **kw)
        return cache[key]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_budget_covering_prompt_is_token_identical(models, arch):
    model = models(arch)
    inputs = make_inputs(model, arch)
    n = inputs["input_ids"].shape[1]
    ref = _greedy(model, inputs)
    for name in METHODS:
        with press(model, name, budget=n + 5, window=WINDOW):
            out = _greedy(model, inputs)
        assert torch.equal(out, ref), f"{arch}/{name}: generation changed although the budget covers the prompt"


@pytest.mark.parametrize("arch", ["llama", "qwen2_vl"])
def test_sampling_identical_when_budget_covers_prompt(models, arch):
    model = models(arch)
    inputs = make_inputs(model, arch)
    n = inputs["input_ids"].shape[1]
    torch.manual_seed(3)
    ref = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=0, temperature=1.0)
    with press(model, "snapkv+mixkv", budget=n, window=WINDOW):
        torch.manual_seed(3)
        out = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=0, temperature=1.0)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_layer_holds_the_budget_then_grows_by_one_per_step(models, arch):
    model = models(arch)
    inputs = make_inputs(model, arch)
    n = inputs["input_ids"].shape[1]
    budget = 24
    assert n > budget
    with press(model, MixKV(SnapKV(budget=budget, window=WINDOW))) as session:
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    steps = out.sequences.shape[1] - n - 1  # the last token is sampled but not fed back
    assert session.stats.layers_compressed == len(cache.layers)
    for layer in cache.layers:
        assert isinstance(layer, CompressedLayer)
        assert torch.all(layer.kept_lengths == budget)
        assert layer.keys.shape[2] == budget + steps
        assert layer.get_seq_length() == n + steps  # logical length: positions continue at N


def test_pyramid_schedule_per_layer(models):
    model = models("llama", num_layers=4)
    inputs = make_inputs(model, "llama", text_len=120)
    n = inputs["input_ids"].shape[1]
    with press(model, PyramidKV(budget=24, window=WINDOW)) as session:
        model(**inputs, use_cache=True)
    expect = [
        int(pyramid_counts(torch.tensor([24 - WINDOW]), torch.tensor([n - WINDOW]), layer, 4, 1)[0, 0]) + WINDOW
        for layer in range(4)
    ]
    got = [int(session.stats.kept_per_layer[layer].unique()) for layer in range(4)]
    assert got == expect
    assert expect[0] > expect[-1]


def _decode_logits(model, inputs, method, steps=3):
    """Prefill under the press, then feed ``steps`` fixed tokens one at a time; return logits.

    No attention mask while decoding (batch 1, no padding): positions then come from the cache's
    reported length, which must be the logical one (prompt + decoded), not the stored one.
    """
    with press(model, method, record=True) as session:
        out = model(**inputs, use_cache=True)
        cache = out.cache
        logits = [out.logits[:, -1]]
        extra = torch.tensor([[5 + i] for i in range(steps)])
        for i in range(steps):
            step = model(input_ids=extra[i : i + 1], cache=cache, use_cache=True)
            logits.append(step.logits[:, -1])
    return torch.stack(logits, 1), session, extra


def _extend(inputs, extra):
    """The prompt followed by the decoded tokens, as one uncompressed forward's inputs."""
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], extra.T], 1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            full[key] = torch.cat([inputs[key], torch.zeros_like(extra.T)], 1)
    return full


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["snapkv+mixkv", "pyramidkv", "adakv+mixkv"])
def test_decoding_equals_masked_reference(models, arch, method):
    model = models(arch, attn_implementation="eager" if arch == "llama" else "sdpa")
    inputs = make_inputs(model, arch)
    n = inputs["input_ids"].shape[1]
    got, session, extra = _decode_logits(model, inputs, mixkv.make_method(method, budget=20, window=WINDOW))
    assert session.plans, "nothing was compressed"
    full = _extend(inputs, extra)
    with masked_reference(model, session.plans, n):
        ref = model(**full).logits[:, n - 1 :]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_window_queries_are_the_models_own(models, arch):
    """The press keeps what a selection from the model's own (M-)RoPE queries keeps."""
    model = models(arch)
    inputs = make_inputs(model, arch)
    method = SnapKV(budget=20, window=WINDOW)
    captured = {}

    def spy(module, query, key, value, attention_mask, **kw):
        captured[module.layer_idx] = (query[:, :, -WINDOW:].clone(), key.clone(), value.clone())
        return AttentionInterface._global_mapping["sdpa"](module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("mixkv_test_spy", spy)
    info = mixkv.core.models.inspect_model(model)
    saved = info.text_config._attn_implementation
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionMaskInterface.register("mixkv_test_spy", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    info.text_config._attn_implementation = "mixkv_test_spy"
    try:
        model(**inputs)
    finally:
        info.text_config._attn_implementation = saved
        AttentionInterface._global_mapping.pop("mixkv_test_spy", None)
        AttentionMaskInterface._global_mapping.pop("mixkv_test_spy", None)
    with press(model, method, record=True) as session:
        model(**inputs, use_cache=True)
    from mixkv.core.layer import LayerPrefill
    from mixkv.core.selection import plan_keep

    for idx, (q, k, v) in captured.items():
        ctx = LayerPrefill(idx, info.num_layers, q, k, v, model.config.get_text_config().head_dim**-0.5
                           if getattr(model.config.get_text_config(), "head_dim", None) else q.shape[-1] ** -0.5,
                           WINDOW)
        assert torch.equal(plan_keep(method, ctx).indices, session.plans[idx].indices)


@pytest.mark.parametrize("arch", ["llama", "qwen2_vl"])
@pytest.mark.parametrize("method", ["snapkv+mixkv", "adakv+mixkv", "pyramidkv"])
def test_sequence_alone_equals_sequence_in_padded_batch(models, arch, method):
    """Text-only prompts (the Qwen2-VL one still goes through M-RoPE position ids)."""
    model = models(arch)
    batch = make_inputs(model, arch, batch=2, left_pad=[0, 7], seed=1, image=False)
    pad = 7
    alone = {k: (v[1:2, pad:] if k in ("input_ids", "attention_mask") else v) for k, v in batch.items()}
    m = mixkv.make_method(method, budget=20, window=WINDOW)
    with press(model, m, record=True) as s_batch:
        out_b = model.generate(**batch, max_new_tokens=5, do_sample=False)
        plans_b = dict(s_batch.plans)
    with press(model, m, record=True) as s_one:
        out_1 = model.generate(**alone, max_new_tokens=5, do_sample=False)
    assert torch.equal(out_b[1, -5:], out_1[0, -5:])
    for idx, plan in plans_b.items():
        one = s_one.plans[idx]
        n_b = plan.lengths[1]
        assert torch.equal(n_b, one.lengths[0])
        for h in range(plan.indices.shape[1]):
            kept_b = plan.indices[1, h, : n_b[h]] - pad
            assert (kept_b >= 0).all(), "padding was kept"
            assert torch.equal(kept_b, one.indices[0, h, : n_b[h]])


def test_bf16_generation_runs_and_cache_is_bf16(models):
    model = models("llama", dtype=torch.bfloat16)
    inputs = make_inputs(model, "llama")
    with press(model, "adakv+mixkv", budget=20, window=WINDOW):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    layer = out.past_key_values.layers[0]
    assert layer.flat_k is None or layer.flat_k.dtype == torch.bfloat16
    assert layer.keys.dtype == torch.bfloat16


def test_bf16_decoding_close_to_masked_reference(models):
    model = models("qwen2", dtype=torch.bfloat16)
    inputs = make_inputs(model, "qwen2")
    n = inputs["input_ids"].shape[1]
    got, session, extra = _decode_logits(model, inputs, mixkv.make_method("adakv+mixkv", budget=20, window=WINDOW))
    full = _extend(inputs, extra)
    with masked_reference(model, session.plans, n):
        ref = model(**full).logits[:, n - 1 :]
    # bf16 rounds differently along the two paths; errors stay a small fraction of the logit scale.
    err = (got.float() - ref.float()).abs().max()
    assert err <= 0.02 * ref.float().abs().max(), f"bf16 error {err:.3f} vs logit scale {ref.abs().max():.1f}"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (6, 2), (8, 2)])
def test_gqa_group_sizes_decode_like_masked_reference(heads, kv_heads):
    model = make_model("llama", num_heads=heads, num_kv_heads=kv_heads)
    inputs = make_inputs(model, "llama")
    n = inputs["input_ids"].shape[1]
    for name in ("snapkv+mixkv", "adakv+mixkv"):
        got, session, extra = _decode_logits(model, inputs, mixkv.make_method(name, budget=20, window=WINDOW))
        with masked_reference(model, session.plans, n):
            ref = model(**_extend(inputs, extra)).logits[:, n - 1 :]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["full", "snapkv", "pyramidkv", "snapkv+mixkv", "adakv", "adakv+mixkv",
                                    "random"])
def test_kv_bytes_equal_kept_tokens(models, method):
    """The cache holds exactly kept tokens x head_dim x 2 x dtype size (decoded tokens included)."""
    model = models("qwen2")
    inputs = make_inputs(model, "qwen2", text_len=120)
    with press(model, method, budget=24, window=WINDOW) as session:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    steps = out.sequences.shape[1] - inputs["input_ids"].shape[1] - 1
    info = mixkv.core.models.inspect_model(model)
    per_token = info.head_dim * 2 * 4
    if session is None:
        kept = info.num_layers * info.num_kv_heads * (inputs["input_ids"].shape[1] + steps)
    else:
        kept = sum(int(k.sum()) for k in session.stats.kept_per_layer.values())
        kept += info.num_layers * info.num_kv_heads * steps
    assert mixkv.cache_kv_bytes(cache) == kept * per_token


def test_ratio_budget_keeps_that_fraction(models):
    model = models("llama")
    inputs = make_inputs(model, "llama", text_len=200)
    n = inputs["input_ids"].shape[1]
    with press(model, "snapkv", ratio=0.25, window=WINDOW) as session:
        model(**inputs, use_cache=True)
    assert all(int(k.unique()) == round(0.25 * n) for k in session.stats.kept_per_layer.values())


def test_offline_profile_redundancy_is_used(models, tmp_path):
    """An offline profile changes the mix: r = 0 keeps by importance alone, r = 1 by diversity alone."""
    model = models("llama")
    inputs = make_inputs(model, "llama", text_len=120)
    info = mixkv.core.models.inspect_model(model)
    plans = {}
    for r in (0.0, 1.0):
        prof = mixkv.Profile(model="tiny", num_layers=info.num_layers, num_kv_heads=info.num_kv_heads,
                             key_redundancy=torch.full((info.num_layers, info.num_kv_heads), r))
        path = mixkv.save_profile(prof, tmp_path / f"r{r}.json")
        with press(model, "snapkv+mixkv", budget=24, window=WINDOW, redundancy="profile", profile=path,
                   record=True) as session:
            model(**inputs, use_cache=True)
        plans[r] = session.plans
    importance_only = MixKV(SnapKV(budget=24, window=WINDOW), use_diversity=False)
    with press(model, importance_only, record=True) as session:
        model(**inputs, use_cache=True)
    for idx, plan in session.plans.items():
        assert torch.equal(plan.indices, plans[0.0][idx].indices)
    assert any(not torch.equal(plans[0.0][i].indices, plans[1.0][i].indices) for i in plans[0.0])


@pytest.mark.parametrize("arch", ["llama", "qwen2_vl"])
def test_shared_prefill_decodes_like_generate(models, arch):
    """One captured prefill feeding a method's cache gives generate's tokens under that press."""
    from mixkv.core.capture import build_cache, capture_prefill
    from mixkv.lab.run import greedy_decode

    model = models(arch)
    inputs = make_inputs(model, arch)
    n = inputs["input_ids"].shape[1]
    pre = capture_prefill(model, inputs, window=WINDOW)
    for name in ("full", "snapkv+mixkv", "adakv+mixkv"):
        method = mixkv.make_method(name, budget=20, window=WINDOW)
        with press(model, method) as session:
            expected = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, n:].tolist()
            cache, plans, _ = build_cache(pre, method, session)
            got = greedy_decode(model, cache, int(pre.logits[0].argmax()), 5)
        assert got == expected, name
        assert (method is None) == (not plans)


def test_image_positions_are_known_per_layer(models):
    model = models("qwen2_vl")
    inputs = make_inputs(model, "qwen2_vl")
    seen = []

    class Spy(SnapKV):
        def score(self, ctx):
            seen.append(ctx.image_mask)
            return super().score(ctx)

    with press(model, Spy(budget=20, window=WINDOW)) as session:
        model(**inputs, use_cache=True)
    expected = inputs["input_ids"] == model.config.image_token_id
    assert len(seen) == mixkv.core.models.inspect_model(model).num_layers
    assert all(torch.equal(m, expected) for m in seen)
    assert torch.equal(session.image_mask, expected)
