"""The compressed cache layer and attention over per-head lengths, on random tensors."""

from __future__ import annotations

import pytest
import torch

from mixkv.core.attention import varlen_attention
from mixkv.core.cache import CompressedLayer
from mixkv.core.selection import KeepPlan


def random_plan(b, h, n, window, gen, uniform=False):
    """Ascending kept positions per (sequence, head), window included; lengths may differ."""
    lengths = torch.full((b, h), window + 5) if uniform else torch.randint(window, n + 1, (b, h), generator=gen)
    lmax = int(lengths.max())
    idx = torch.zeros(b, h, lmax, dtype=torch.long)
    for bi in range(b):
        for hi in range(h):
            k = int(lengths[bi, hi]) - window
            cand = torch.randperm(n - window, generator=gen)[:k].sort().values
            idx[bi, hi, : k + window] = torch.cat([cand, torch.arange(n - window, n)])
    return KeepPlan(idx, lengths)


def dense_reference(query, keys, values, plan, new_k, new_v, scaling):
    """Plain attention over the full prompt with evicted positions masked, plus the new tokens."""
    b, hq, q, d = query.shape
    h = keys.shape[1]
    g = hq // h
    n = keys.shape[2]
    k_all = torch.cat([keys, new_k], 2).float()
    v_all = torch.cat([values, new_v], 2).float()
    keep = torch.zeros(b, h, n + new_k.shape[2], dtype=torch.bool)
    keep[:, :, n:] = True
    for bi in range(b):
        for hi in range(h):
            keep[bi, hi, plan.indices[bi, hi, : plan.lengths[bi, hi]]] = True
    total = n + new_k.shape[2]
    q_pos = torch.arange(total - q, total)
    causal = torch.arange(total)[None, :] <= q_pos[:, None]
    allowed = keep.repeat_interleave(g, 1)[:, :, None, :] & causal[None, None]
    logits = torch.matmul(query.float(), k_all.repeat_interleave(g, 1).transpose(-1, -2)) * scaling
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    return torch.matmul(probs, v_all.repeat_interleave(g, 1)).transpose(1, 2)


def decode_and_compare(layer, keys, values, plan, g, chunks, gen, fused):
    """Append ``chunks`` of new tokens one call at a time; after each, attention over the layer must
    equal plain attention over the prompt with the evicted positions masked, plus the new tokens."""
    b, h, n, d = keys.shape
    dtype = keys.dtype
    new_k = torch.empty(b, h, 0, d, dtype=dtype)
    new_v = torch.empty(b, h, 0, d, dtype=dtype)
    for step, q in enumerate(chunks):
        k_step = torch.randn(b, h, q, d, generator=gen).to(dtype)
        v_step = torch.randn(b, h, q, d, generator=gen).to(dtype)
        layer.update(k_step, v_step)
        new_k, new_v = torch.cat([new_k, k_step], 2), torch.cat([new_v, v_step], 2)
        query = torch.randn(b, h * g, q, d, generator=gen).to(dtype)
        got = varlen_attention(query, layer, d**-0.5, fused=fused)
        ref = dense_reference(query, keys, values, plan, new_k, new_v, d**-0.5)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol, msg=f"step {step}")
        assert layer.get_seq_length() == n + new_k.shape[2]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_varlen_attention_matches_masked_dense(seed, dtype, fused):
    gen = torch.Generator().manual_seed(seed)
    b = 1 + seed % 3
    h = 1 + seed % 4
    g = [1, 2, 3, 4][seed % 4]
    d = 8 * (1 + seed % 2)
    n = 30 + 7 * seed
    window = 4
    keys = torch.randn(b, h, n, d, generator=gen).to(dtype)
    values = torch.randn(b, h, n, d, generator=gen).to(dtype)
    plan = random_plan(b, h, n, window, gen)
    layer = CompressedLayer(keys, values, plan, prompt_length=n)
    assert layer.is_flat or plan.uniform
    decode_and_compare(layer, keys, values, plan, g, [1, 1, 3, 1], gen, fused)  # single tokens and a chunk


def test_uniform_plan_is_stored_dense_and_exact():
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 40, 8, generator=gen), torch.randn(2, 3, 40, 8, generator=gen)
    plan = random_plan(2, 3, 40, 4, gen, uniform=True)
    layer = CompressedLayer(keys, values, plan, prompt_length=40)
    assert not layer.is_flat
    for bi in range(2):
        for hi in range(3):
            assert torch.equal(layer.keys[bi, hi], keys[bi, hi, plan.indices[bi, hi]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kv_bytes_equal_kept_tokens(dtype):
    gen = torch.Generator().manual_seed(1)
    b, h, n, d = 2, 4, 600, 64
    keys, values = torch.randn(b, h, n, d).to(dtype), torch.randn(b, h, n, d).to(dtype)
    plan = random_plan(b, h, n, 32, gen)
    layer = CompressedLayer(keys, values, plan, prompt_length=n)
    elem = torch.tensor([], dtype=dtype).element_size()
    theory = int(plan.lengths.sum()) * d * 2 * elem
    assert layer.kv_bytes() == theory
    # Allocated memory: the packed tokens plus int32/int64 index metadata, within 2%.
    assert theory <= layer.allocated_bytes() <= 1.02 * theory + 1024


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "dense-tail"])
def test_tail_growth_is_amortised(inline, monkeypatch):
    import mixkv.core.cache as cache_module

    monkeypatch.setattr(cache_module, "INLINE_MAX_SEGMENTS", 8 if inline else 0)
    gen = torch.Generator().manual_seed(2)
    keys, values = torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    layer = CompressedLayer(keys, values, random_plan(1, 2, 50, 4, gen), prompt_length=50)
    assert layer.is_flat and layer.inline == inline
    buffer = (lambda: layer._flat_k) if inline else (lambda: layer._tail_k)
    reallocs = 0
    last = buffer().data_ptr()
    held = layer.tokens_held()
    for _ in range(200):
        layer.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
        if buffer().data_ptr() != last:
            reallocs += 1
            last = buffer().data_ptr()
    assert layer.decoded == 200 and layer.tokens_held() == held + 2 * 200
    assert reallocs <= 12  # geometric growth: O(log n) copies, not one per token


def test_update_rejects_wrong_shape():
    gen = torch.Generator().manual_seed(3)
    layer = CompressedLayer(torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8),
                            random_plan(1, 2, 20, 4, gen), prompt_length=20)
    with pytest.raises(ValueError, match="KV heads"):
        layer.update(torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))


def test_flat_layer_refuses_beam_search_and_crop():
    gen = torch.Generator().manual_seed(4)
    plan = KeepPlan(torch.tensor([[[0, 1, 5, 6], [2, 5, 6, 0]]]), torch.tensor([[4, 3]]))
    layer = CompressedLayer(torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8), plan, prompt_length=7)
    assert layer.is_flat
    with pytest.raises(NotImplementedError, match="beam search"):
        layer.reorder_cache(torch.tensor([0]))
    with pytest.raises(NotImplementedError, match="cropped"):
        layer.crop(-1)
    del gen


@pytest.fixture
def chunked(monkeypatch):
    """Force chunk regions even on small test layers (tiny chunk sizes, no small-layer shortcut)."""
    import mixkv.core.packing as packing

    monkeypatch.setattr(packing, "SMALL_LAYER", 0)
    monkeypatch.setattr(packing, "CHUNK_SIZES", (8, 3))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_chunked_layout_matches_masked_dense(chunked, seed, dtype, fused):
    """Chunk regions + remainder + tail, merged by log-sum-exp, equal plain masked attention:
    GQA 1-8, batches, multi-token continuations, heads that keep a single token."""
    gen = torch.Generator().manual_seed(100 + seed)
    b, h, g = 1 + seed % 4, 1 + seed % 5, [1, 2, 4, 8, 3][seed % 5]
    d, n, window = 8 * (1 + seed % 2), 20 + 9 * seed, 1 + seed % 3
    keys = torch.randn(b, h, n, d, generator=gen).to(dtype)
    values = torch.randn(b, h, n, d, generator=gen).to(dtype)
    plan = random_plan(b, h, n, window, gen)
    layer = CompressedLayer(keys, values, plan, prompt_length=n)
    if not layer.is_flat:
        pytest.skip("uniform draw")
    assert layer.packing.regions, "the fixture should force chunk regions"
    decode_and_compare(layer, keys, values, plan, g, [1, 4, 1, 2, 1], gen, fused)


def test_packing_places_every_token_once_in_pure_chunks():
    from mixkv.core.packing import plan_packing

    lengths = torch.tensor([0, 1, 7, 8, 9, 130, 300, 17, 16, 15])
    order, p = plan_packing(lengths, chunk_sizes=(128, 8), small_layer=0)
    total = int(lengths.sum())
    assert sorted(order.tolist()) == list(range(total))  # a permutation: nothing padded, nothing lost
    seg_of = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    start = 0
    for reg in p.regions:
        assert reg.start == start
        segs = seg_of[order[reg.start : reg.end]].view(reg.chunks, reg.size)
        assert bool((segs == reg.chunk_seg[:, None]).all())  # every chunk holds one segment's tokens
        start = reg.end
    rem = seg_of[order[p.rem_start :]]
    assert torch.equal(rem, p.rem_seg)
    per_seg = torch.bincount(rem, minlength=len(lengths))
    assert bool((per_seg < 8).all()) and torch.equal(per_seg > 0, p.has_rem)
    # Segment order inside each region and the remainder is preserved, token order inside a segment too.
    for s in range(len(lengths)):
        pos = order[seg_of[order] == s]
        assert pos.tolist() == sorted(pos.tolist())
    assert p.row_seg.shape[0] == sum(r.chunks for r in p.regions) + 2 * len(lengths)


def test_index_bytes_stay_small_next_to_the_kept_tokens():
    """Bytes held beyond the kept keys and values: the packing's indexes, under 2% for real layouts."""
    gen = torch.Generator().manual_seed(0)
    for b, h, d, mean in [(1, 8, 128, 1024), (1, 32, 128, 4096), (8, 8, 128, 1024), (1, 4, 128, 256),
                          (1, 3, 64, 128), (2, 8, 64, 128)]:
        lengths = (mean * (0.5 + torch.rand(b, h, generator=gen))).long()
        n = int(lengths.max())
        plan = KeepPlan(torch.arange(n).expand(b, h, n).clone(), lengths)
        layer = CompressedLayer(torch.randn(b, h, n, d).bfloat16(), torch.randn(b, h, n, d).bfloat16(), plan, n)
        layer.update(torch.randn(b, h, 1, d).bfloat16(), torch.randn(b, h, 1, d).bfloat16())
        varlen_attention(torch.randn(b, h * 4, 1, d).bfloat16(), layer, d**-0.5)  # builds the remainder mask
        kept = 2 * int(lengths.sum()) * d * 2
        buffers = 2 * (layer._tail_k.numel() + layer._flat_k.numel()) * 2  # kept, decoded and spare capacity
        extra = layer.allocated_bytes() - buffers
        assert 0 <= extra <= 0.02 * kept, (b, h, mean, extra / kept)
