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


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "scatter"])
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
    new_k = torch.empty(b, h, 0, d, dtype=dtype)
    new_v = torch.empty(b, h, 0, d, dtype=dtype)
    for step, q in enumerate([1, 1, 3, 1]):  # single-token decoding and a multi-token chunk
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


def test_tail_growth_is_amortised():
    gen = torch.Generator().manual_seed(2)
    keys, values = torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    layer = CompressedLayer(keys, values, random_plan(1, 2, 50, 4, gen), prompt_length=50)
    reallocs = 0
    last = layer._tail_k.data_ptr()
    for _ in range(200):
        layer.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
        if layer._tail_k.data_ptr() != last:
            reallocs += 1
            last = layer._tail_k.data_ptr()
    assert layer.tail_len == 200
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_and_scatter_packed_paths_agree(dtype):
    """The fused CPU kernel really runs (no silent fallback) and agrees with the portable path."""
    from mixkv.core.attention import _cpu_flash_with_lse, _packed_attention_fused, _packed_attention_scatter

    if _cpu_flash_with_lse() is None:
        pytest.skip("this torch build has no fused CPU attention with log-sum-exp")
    gen = torch.Generator().manual_seed(5)
    keys, values = torch.randn(2, 3, 64, 16, generator=gen).to(dtype), torch.randn(2, 3, 64, 16).to(dtype)
    layer = CompressedLayer(keys, values, random_plan(2, 3, 64, 4, gen), prompt_length=64)
    qs = torch.randn(6, 4, 16, generator=gen).to(dtype)
    out_f, lse_f = _packed_attention_fused(qs, layer, 0.25)
    out_s, lse_s = _packed_attention_scatter(qs, layer, 0.25)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out_f, out_s, rtol=tol, atol=tol)
    torch.testing.assert_close(lse_f, lse_s, rtol=tol, atol=tol)
