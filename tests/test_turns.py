"""Compression after the first prefill (issue #13, parts 2 and 3): while decoding
(``press(decode_budget=, every=)``) and at later turns (a new prompt segment on a kept cache).

The main check is a reference run: the uncompressed model whose every query row sees exactly the
keys the press held when it ran that row (read from ``session.plans``, the logical positions each
compressed layer kept, and each layer's tail). If the press re-scored the wrong tokens, kept
different ones than it recorded, shifted positions or attended padding, the logits differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.cache_utils import DynamicCache

sys.path.insert(0, str(Path(__file__).parent))
from masked_reference import history_reference  # noqa: E402
from zoo import make_inputs, make_model  # noqa: E402

import mixkv  # noqa: E402
from mixkv import Profile, press  # noqa: E402
from mixkv.core import cache as cache_module  # noqa: E402
from mixkv.core import packing  # noqa: E402
from mixkv.core.cache import CompressedLayer  # noqa: E402
from mixkv.core.layer import LayerPrefill  # noqa: E402
from mixkv.core.methods.random import hash_uniform  # noqa: E402
from mixkv.core.selection import (
    KeepPlan,  # noqa: E402
    plan_keep,  # noqa: E402
)

WINDOW = 4
PROFILE = Profile("zoo-llama", 2, 2, head_scores=[[1.0, 3.0], [2.0, 0.5]], retrieval_scores=[[0.5, 2.0], [1.0, 1.5]])
METHODS = ["snapkv", "snapkv+mixkv", "pyramidkv", "adakv", "adakv+mixkv", "random", "sparsemm+mixkv", "headkv"]


@pytest.fixture(scope="module")
def llama():
    return make_model("llama")


@pytest.fixture(params=["inline", "regions"])
def layout(request, monkeypatch):
    """Head-adaptive layers in both packed layouts: small inline ones and chunk regions + remainder."""
    if request.param == "regions":
        monkeypatch.setattr(cache_module, "INLINE_MAX_SEGMENTS", 0)
        monkeypatch.setattr(packing, "SMALL_LAYER", 0)
        monkeypatch.setattr(packing, "CHUNK_SIZES", (8, 3))
    return request.param


def _method(name: str, budget: int):
    return mixkv.make_method(name, budget=budget, window=WINDOW, profile=PROFILE)


def _snapshot(session, cache) -> dict:
    """What each layer holds before a forward: ("full",) or (kept positions, lengths, tail start)."""
    snap = {}
    for idx, layer in enumerate(getattr(cache, "layers", [])):
        if isinstance(layer, CompressedLayer):
            plan = session.plans[idx]
            snap[idx] = (plan.indices.clone(), plan.lengths.clone(), layer.prompt_length)
        else:
            snap[idx] = ("full",)
    return snap


def run_turns(model, method, turns, *, check_bound=None, **press_kwargs):
    """Feed each turn's ``(ids, valid)`` then greedy-decode ``steps`` tokens, forward by forward.

    Returns the whole conversation (ids, mask), each forward's ``(start, end, snapshot, logits)`` and the
    session's stats. ``check_bound(cache)`` runs after every forward.
    """
    cache = DynamicCache()
    b = turns[0][0].shape[0]
    ids_all = torch.zeros(b, 0, dtype=torch.long)
    mask_all = torch.zeros(b, 0, dtype=torch.long)
    forwards = []
    with torch.no_grad(), press(model, method, record=True, **press_kwargs) as session:
        for seg_ids, seg_valid, steps in turns:
            feed, valid = seg_ids, seg_valid
            for _ in range(steps + 1):
                snap = _snapshot(session, cache)
                start = ids_all.shape[1]
                ids_all = torch.cat([ids_all, feed], 1)
                mask_all = torch.cat([mask_all, valid.long()], 1)
                out = model(input_ids=feed, attention_mask=mask_all, cache=cache, use_cache=True)
                forwards.append((start, ids_all.shape[1], snap, out.logits.float()))
                assert cache.get_seq_length() == ids_all.shape[1]  # positions stay true
                if check_bound is not None:
                    check_bound(cache)
                feed = out.logits[:, -1].argmax(-1, keepdim=True)
                valid = torch.ones(b, 1, dtype=torch.bool)
        stats = session.stats
    return ids_all, mask_all, forwards, stats


def reference_logits(model, ids, mask, forwards, num_kv_heads: int, captured: dict | None = None):
    """The uncompressed model, each row seeing what the press held when it ran that row."""
    b, n = ids.shape
    num_layers = model.config.num_hidden_layers
    allowed = {i: torch.zeros(b, num_kv_heads, n, n, dtype=torch.bool) for i in range(num_layers)}
    for start, end, snap, _ in forwards:
        for layer_idx in range(num_layers):
            held = snap.get(layer_idx, ("full",))
            for r in range(start, end):
                if held[0] == "full":
                    allowed[layer_idx][:, :, r, : r + 1] = True
                    continue
                indices, lengths, tail_start = held
                for bi in range(b):
                    for hi in range(num_kv_heads):
                        allowed[layer_idx][bi, hi, r, indices[bi, hi, : int(lengths[bi, hi])]] = True
                allowed[layer_idx][:, :, r, tail_start : r + 1] = True
    real = mask.bool()
    for layer_idx in range(num_layers):
        a = allowed[layer_idx] & real[:, None, None, :]
        allowed[layer_idx] = a | torch.eye(n, dtype=torch.bool)[None, None]  # a padding row sees itself
    with torch.no_grad(), history_reference(model, allowed, captured):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return logits


def assert_matches_reference(model, ids, mask, forwards, num_kv_heads=2):
    ref = reference_logits(model, ids, mask, forwards, num_kv_heads)
    for start, end, _, logits in forwards:
        real = mask[:, start:end].bool()
        got, want = logits[real], ref[:, start:end][real]
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def _turn(model, *, length, batch=2, pad=None, seed=0, steps=0):
    pad = [0] * batch if pad is None else list(pad)
    inputs = make_inputs(model, "llama", batch=batch, text_len=length, left_pad=pad, seed=seed, image=False)
    return inputs["input_ids"], inputs["attention_mask"].bool(), steps


def _padded_segment(length: int, pads: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A later turn's new tokens, left-padded inside the segment (padding in the middle of the sequence)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (len(pads), length), generator=gen)
    valid = torch.ones(len(pads), length, dtype=torch.bool)
    for i, p in enumerate(pads):
        ids[i, :p] = 0
        valid[i, :p] = False
    return ids, valid


# ---- compression while decoding -----------------------------------------------------------------------

def _bound(decode_budget: int, every: int):
    def check(cache):
        for layer in cache.layers:
            if isinstance(layer, CompressedLayer):
                # After every forward a layer got fewer than `every` tokens since it was built, or its
                # longest sequence holds at most the decode budget per head on average (PyramidKV's lower
                # layers and AdaKV's favoured heads may hold more than the budget: their allocation).
                assert layer.decoded < every or layer.held_mean_max() <= decode_budget
                assert layer.held_mean_max() < max(layer.kept_mean_max, decode_budget) + every
            else:
                assert layer.keys.shape[2] < decode_budget + every
    return check


@pytest.mark.parametrize("method", METHODS)
def test_decoding_compression_matches_the_reference_of_what_is_held(llama, method, layout):
    turn = _turn(llama, length=40, pad=(0, 6), steps=24)
    ids, mask, forwards, stats = run_turns(llama, _method(method, 14), [turn], decode_budget=16, every=3,
                                           check_bound=_bound(16, 3))
    assert stats.decode_compressions > 0
    assert_matches_reference(llama, ids, mask, forwards)


def test_decoding_stays_within_the_budget_and_memory_stops_growing(llama):
    turn = _turn(llama, length=60, batch=1, steps=80)
    sizes = []

    def record(cache):
        sizes.append(mixkv.cache_kv_bytes(cache))

    run_turns(llama, _method("adakv+mixkv", 20), [turn], decode_budget=24, every=8,
              check_bound=lambda c: (_bound(24, 8)(c), record(c)))
    assert max(sizes[40:]) <= max(sizes[:20])  # bounded, not growing with the answer
    _, _, _, stats = run_turns(llama, _method("adakv+mixkv", 20), [turn])
    assert stats.decode_compressions == 0  # without decode_budget nothing changes while decoding


@pytest.mark.parametrize("method", ["snapkv+mixkv", "adakv", "pyramidkv+mixkv"])
def test_decode_recompression_keeps_what_the_method_picks_from_the_held_tokens(llama, method):
    """Each re-compression while decoding equals the method run from scratch on the tokens the layer
    held, scored by the true queries of the last W tokens (taken from the reference run)."""
    turn = _turn(llama, length=30, pad=(0, 4), steps=14)
    decode_budget, every = 14, 3
    ids, mask, forwards, stats = run_turns(llama, _method(method, 12), [turn], decode_budget=decode_budget,
                                           every=every)
    captured: dict = {}
    reference_logits(llama, ids, mask, forwards, 2, captured)
    decode_method = _method(method, 12).with_budget(decode_budget)
    checked = 0
    for (_start, end, before, _), (_, _, after, _) in zip(forwards, forwards[1:], strict=False):
        for idx, held in before.items():
            now = after[idx]
            if held[0] == "full" or now[0] == "full" or now[2] == held[2]:
                continue  # not re-compressed in this forward
            q, k, v, scaling = captured[idx]
            indices, lengths, tail_start = held
            b, h = lengths.shape
            # Each head's held positions, in order, right-aligned (the left fill is not a token).
            per_head = [[torch.cat([indices[bi, hi, : int(lengths[bi, hi])], torch.arange(tail_start, end)])
                         for hi in range(h)] for bi in range(b)]
            width = max(len(p) for row in per_head for p in row)
            pos = torch.full((b, h, width), -1, dtype=torch.long)
            for bi in range(b):
                for hi in range(h):
                    pos[bi, hi, width - len(per_head[bi][hi]):] = per_head[bi][hi]
            valid = pos >= 0
            gather = pos.clamp_min(0)[..., None].expand(b, h, width, k.shape[-1])
            record = LayerPrefill(idx, 2, q[:, :, end - WINDOW : end], k.gather(2, gather), v.gather(2, gather),
                                  scaling, window=WINDOW, kernel=decode_method.kernel,
                                  valid=valid if not bool(valid.all()) else None, real_length=mask[:, :end].sum(-1))
            plan = plan_keep(decode_method, record)
            want = pos.gather(-1, plan.indices)
            got_idx, got_len = now[0], now[1]
            assert torch.equal(got_len, plan.lengths)
            for bi in range(b):
                for hi in range(h):
                    m = int(plan.lengths[bi, hi])
                    assert torch.equal(got_idx[bi, hi, :m], want[bi, hi, :m])
            checked += 1
    # Every re-compression but those of the last forward (no snapshot after it) was checked.
    assert checked >= 4 and 0 <= stats.decode_compressions - checked <= 2


def test_decode_budget_covering_everything_equals_the_full_cache(llama):
    inputs = make_inputs(llama, "llama", batch=2, text_len=30, left_pad=[0, 4], image=False)
    plain = llama.generate(**inputs, max_new_tokens=12)
    for method in ("snapkv+mixkv", "adakv"):
        with press(llama, method, budget=64, window=WINDOW, decode_budget=64, every=4):
            out = llama.generate(**inputs, max_new_tokens=12)
        assert torch.equal(out, plain)


def test_decode_budget_below_the_prompt_budget_cuts_at_the_first_step(llama):
    turn = _turn(llama, length=50, batch=1, steps=3)
    ids, mask, forwards, stats = run_turns(llama, _method("snapkv", 30), [turn], decode_budget=10, every=1)
    assert stats.decode_compressions == 2 * 3  # both layers, every step
    assert_matches_reference(llama, ids, mask, forwards)


# ---- across turns -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_second_turn_compresses_its_segment_with_what_is_kept(llama, method, layout):
    first = _turn(llama, length=36, pad=(0, 5), steps=3)
    seg, valid = _padded_segment(14, [0, 3], seed=1)
    short, short_valid = _padded_segment(3, [0, 1], seed=2)  # not longer than the window: appended
    turns = [first, (seg, valid, 3), (short, short_valid, 2)]
    ids, mask, forwards, stats = run_turns(llama, _method(method, 12), turns)
    assert stats.segments_compressed == 2  # the 14-token segment, in both layers; not the 3-token one
    assert_matches_reference(llama, ids, mask, forwards)


def test_turns_and_decoding_compression_together(llama, layout):
    first = _turn(llama, length=30, pad=(0, 3), steps=10)
    seg, valid = _padded_segment(12, [2, 0], seed=3)
    ids, mask, forwards, stats = run_turns(llama, _method("adakv+mixkv", 12), [first, (seg, valid, 10)],
                                           decode_budget=14, every=4, check_bound=_bound(14, 4))
    assert stats.segments_compressed == 2 and stats.decode_compressions > 0
    assert_matches_reference(llama, ids, mask, forwards)


def test_second_turn_without_compression_when_it_fits(llama):
    """A segment that still fits the budget leaves the cache uncompressed (and exact)."""
    first = _turn(llama, length=10, batch=1, steps=2)
    seg, valid = _padded_segment(6, [0], seed=4)
    ids, mask, forwards, stats = run_turns(llama, _method("snapkv+mixkv", 40), [first, (seg, valid, 2)])
    assert stats.layers_compressed == 0
    with torch.no_grad():
        full = llama(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(forwards[-1][3][:, -1], full[:, -1].float(), atol=1e-4, rtol=1e-4)


def test_second_generate_call_continues_the_press(llama):
    """The user's path: generate twice on one cache inside one press; the second turn is compressed."""
    inputs = make_inputs(llama, "llama", batch=1, text_len=40, image=False)
    with press(llama, "snapkv+mixkv", budget=12, window=WINDOW) as session:
        out = llama.generate(**inputs, max_new_tokens=4, return_dict_in_generate=True)
        ids = torch.cat([out.sequences, torch.arange(10, 30)[None]], 1)
        turn = llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=out.past_key_values,
                              max_new_tokens=3, return_dict_in_generate=True)
        assert session.stats.segments_compressed == 2
        cache = turn.past_key_values
        assert cache.get_seq_length() == ids.shape[1] + 2
        assert all(int(layer.kept_lengths.max()) == 12 for layer in cache.layers)


def test_continuing_a_cache_made_without_the_press_is_an_error(llama):
    inputs = make_inputs(llama, "llama", batch=1, text_len=20, image=False)
    with torch.no_grad():
        out = llama(**inputs, use_cache=True)
    nxt = torch.tensor([[5]])
    mask = torch.ones(1, 21, dtype=torch.long)
    with press(llama, "snapkv", budget=8, window=WINDOW), pytest.raises(RuntimeError, match="outside this mixkv"):
        llama(input_ids=nxt, attention_mask=mask, cache=out.past_key_values)
    # A cache that fitted its budget under one press is still that press's cache.
    with press(llama, "snapkv", budget=64, window=WINDOW), torch.no_grad():
        kept = llama(**inputs, use_cache=True).past_key_values
    with press(llama, "snapkv", budget=64, window=WINDOW), pytest.raises(RuntimeError, match="outside this mixkv"):
        llama(input_ids=nxt, attention_mask=mask, cache=kept)
    # Without any press the model is untouched and continues any cache.
    with torch.no_grad():
        llama(input_ids=nxt, attention_mask=mask, cache=kept)


# ---- options and errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"decode_budget": 4}, "larger than the window"),
    ({"decode_budget": 3.5}, "decode_budget must be an int"),
    ({"decode_budget": True}, "decode_budget must be an int"),
    ({"every": 4}, "only applies with decode_budget"),
    ({"decode_budget": 16, "every": 0}, "every must be a positive int"),
])
def test_bad_decode_options_are_refused(llama, kwargs, match):
    with pytest.raises(ValueError, match=match), press(llama, "snapkv", budget=12, window=WINDOW, **kwargs):
        pass
    assert llama.config._attn_implementation == "sdpa"


def test_decode_budget_needs_a_method(llama):
    with pytest.raises(ValueError, match="needs a compression method"), press(llama, "full", decode_budget=16):
        pass


def test_beam_search_with_decode_budget_is_refused(llama):
    inputs = make_inputs(llama, "llama", batch=1, text_len=30, image=False)
    with press(llama, "snapkv", budget=12, window=WINDOW, decode_budget=16), \
            pytest.raises(NotImplementedError, match="decode_budget"):
        llama.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
    out = llama.generate(**inputs, max_new_tokens=2)  # the model is restored
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


# ---- the pieces: held views and per-head scoring ----------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 3), st.integers(1, 12), st.integers(0, 5),
       st.sampled_from(["inline", "regions", "uniform"]))
def test_held_view_lists_each_heads_tokens_in_order(seed, batch, heads, max_kept, appended, kind):
    gen = torch.Generator().manual_seed(seed)
    n, d = 16, 4
    keys = torch.randn(batch, heads, n, d, generator=gen)
    values = torch.randn(batch, heads, n, d, generator=gen)
    if kind == "uniform":
        lengths = torch.full((batch, heads), max_kept)
    else:
        lengths = torch.randint(1, max_kept + 1, (batch, heads), generator=gen)
    indices = torch.zeros(batch, heads, max_kept, dtype=torch.long)
    for b in range(batch):
        for h in range(heads):
            pick = torch.randperm(n, generator=gen)[: int(lengths[b, h])].sort().values
            indices[b, h, : pick.shape[0]] = pick
    indices = indices[..., : int(lengths.max())]  # as plan_keep trims its plans
    saved = (cache_module.INLINE_MAX_SEGMENTS, packing.SMALL_LAYER, packing.CHUNK_SIZES)
    if kind == "regions":
        cache_module.INLINE_MAX_SEGMENTS, packing.SMALL_LAYER, packing.CHUNK_SIZES = 0, 0, (4, 2)
    try:
        layer = CompressedLayer(keys, values, KeepPlan(indices, lengths), prompt_length=n)
        new_k = torch.randn(batch, heads, appended, d, generator=gen)
        new_v = torch.randn(batch, heads, appended, d, generator=gen)
        new_valid = torch.rand(batch, appended, generator=gen) > 0.3
        for t in range(appended):
            layer.expect(None if bool(new_valid[:, t].all()) else new_valid[:, t : t + 1])
            layer.update(new_k[:, :, t : t + 1], new_v[:, :, t : t + 1])
        hk, hv, hvalid = layer.held_view()
    finally:
        cache_module.INLINE_MAX_SEGMENTS, packing.SMALL_LAYER, packing.CHUNK_SIZES = saved
    length = int(lengths.max()) + appended
    assert hk.shape == (batch, heads, length, d)
    if hvalid is None:
        hvalid = torch.ones(batch, heads, length, dtype=torch.bool)
    elif hvalid.dim() == 2:
        hvalid = hvalid[:, None].expand(batch, heads, length)
    for b in range(batch):
        for h in range(heads):
            m = int(lengths[b, h])
            want_k = torch.cat([keys[b, h, indices[b, h, :m]], new_k[b, h]])
            want_v = torch.cat([values[b, h, indices[b, h, :m]], new_v[b, h]])
            torch.testing.assert_close(hk[b, h, length - m - appended :], want_k)  # right-aligned
            torch.testing.assert_close(hv[b, h, length - m - appended :], want_v)
            want_valid = torch.cat([torch.zeros(length - m - appended, dtype=torch.bool),
                                    torch.ones(m, dtype=torch.bool), new_valid[b]])
            assert torch.equal(hvalid[b, h], want_valid)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 2), st.integers(1, 3), st.integers(1, 2), st.integers(6, 30),
       st.sampled_from(["snapkv", "snapkv+mixkv", "random"]))
def test_per_head_masks_score_each_head_as_if_alone(seed, batch, heads, group, longest, method):
    """Scoring a right-aligned per-head view equals scoring each head on its own tokens, unpadded."""
    gen = torch.Generator().manual_seed(seed)
    w, d = 3, 8
    m = mixkv.make_method(method, budget=5, window=w, kernel=3)
    keys = torch.randn(batch, heads, longest, d, generator=gen)
    values = torch.randn(batch, heads, longest, d, generator=gen)
    queries = torch.randn(batch, heads * group, w, d, generator=gen)
    counts = torch.randint(w, longest + 1, (batch, heads), generator=gen)
    valid = torch.arange(longest)[None, None, :] >= (longest - counts)[..., None]
    layer = LayerPrefill(0, 1, queries, keys, values, d**-0.5, window=w, kernel=m.kernel, valid=valid)
    got = m.score(layer)
    for b in range(batch):
        for h in range(heads):
            c = int(counts[b, h])
            alone = LayerPrefill(0, 1, queries[b : b + 1, h * group : (h + 1) * group], keys[b : b + 1, h : h + 1, -c:],
                                 values[b : b + 1, h : h + 1, -c:], d**-0.5, window=w, kernel=m.kernel)
            want = m.score(alone)[0, 0] if method != "random" else None
            real = got[b, h, longest - c :]
            if method == "random":  # the draw depends on the head index: compare with the same head
                draw = hash_uniform(m.seed, 0, torch.tensor(h), torch.arange(c - w))
                torch.testing.assert_close(real, draw)
            else:
                torch.testing.assert_close(real, want, atol=1e-5, rtol=1e-5)


# ---- every supported architecture --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava",
                                  "llava_next", "internvl"])
def test_a_second_turn_on_every_architecture(arch):
    """Turn 1 with an image (VLMs), turn 2 a text segment longer than the window on the same cache: with a
    budget that covers everything the answers equal the model's without a press; with a small one the
    segment is compressed and the cache keeps its logical length."""
    from zoo import make_inputs as zoo_inputs
    from zoo import make_model as zoo_model

    model = zoo_model(arch)
    inputs = zoo_inputs(model, arch, text_len=24, seed=3)
    n = inputs["input_ids"].shape[1]
    extra = torch.arange(20, 40)[None]

    def two_turns(budget):
        out = model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True)
        ids = torch.cat([out.sequences, extra], 1)
        turn = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=out.past_key_values,
                              max_new_tokens=4, return_dict_in_generate=True)
        return turn.sequences, turn.past_key_values

    plain, _ = two_turns(None)
    with press(model, "snapkv+mixkv", budget=n + 64, window=WINDOW) as session:
        same, _ = two_turns(n + 64)
        assert session.stats.layers_compressed == 0
    assert torch.equal(same, plain)
    with press(model, "adakv+mixkv", budget=12, window=WINDOW) as session:
        seqs, cache = two_turns(12)
        assert session.stats.segments_compressed == model.config.get_text_config().num_hidden_layers
    assert seqs.shape == plain.shape and cache.get_seq_length() == plain.shape[1] - 1
