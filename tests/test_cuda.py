"""CUDA paths (bf16, the portable varlen path, flash-attn varlen when installed). Skipped without a GPU;
``scripts/gpu_check.sh`` runs them on a machine that has one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_cache_attention import dense_reference, random_plan  # noqa: E402
from zoo import make_inputs, make_model  # noqa: E402

import mixkv  # noqa: E402
from mixkv.core.attention import flash_varlen_attention, varlen_attention  # noqa: E402
from mixkv.core.cache import CompressedLayer  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("force_chunks", [False, True])
def test_varlen_on_cuda_matches_masked_dense(seed, force_chunks, monkeypatch):
    import mixkv.core.packing as packing

    if force_chunks:
        monkeypatch.setattr(packing, "SMALL_LAYER", 0)
        monkeypatch.setattr(packing, "CHUNK_SIZES", (8, 3))
    gen = torch.Generator().manual_seed(seed)
    b, h, g, d, n = 1 + seed % 3, 2 + seed % 3, [1, 2, 4][seed % 3], 64, 40 + 13 * seed
    keys = torch.randn(b, h, n, d, generator=gen)
    values = torch.randn(b, h, n, d, generator=gen)
    plan = random_plan(b, h, n, 4, gen)
    on_gpu = type(plan)(plan.indices.cuda(), plan.lengths.cuda())
    layer = CompressedLayer(keys.cuda().bfloat16(), values.cuda().bfloat16(), on_gpu, prompt_length=n)
    new_k, new_v = torch.randn(b, h, 1, d, generator=gen), torch.randn(b, h, 1, d, generator=gen)
    layer.update(new_k.cuda().bfloat16(), new_v.cuda().bfloat16())
    query = torch.randn(b, h * g, 1, d, generator=gen)
    ref = dense_reference(query.bfloat16().float(), keys.bfloat16().float(), values.bfloat16().float(), plan,
                          new_k.bfloat16().float(), new_v.bfloat16().float(), d**-0.5)
    got = varlen_attention(query.cuda().bfloat16(), layer, d**-0.5)
    torch.testing.assert_close(got.float().cpu(), ref, rtol=3e-2, atol=3e-2)
    if layer.is_flat:
        flash = flash_varlen_attention(query.cuda().bfloat16(), layer, d**-0.5)
        if flash is not None:  # flash-attn installed
            torch.testing.assert_close(flash.float().cpu(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("method", ["snapkv+mixkv", "adakv+mixkv"])
def test_generation_on_cuda_bf16(method):
    model = make_model("llama", dtype=torch.bfloat16).cuda()
    inputs = {k: v.cuda() for k, v in make_inputs(model, "llama", text_len=60).items()}
    plain = model.generate(**inputs, max_new_tokens=6)
    with mixkv.press(model, method, budget=200, window=8):  # covers the prompt: identical
        assert torch.equal(model.generate(**inputs, max_new_tokens=6), plain)
    with mixkv.press(model, method, budget=24, window=8) as session:
        out = model.generate(**inputs, max_new_tokens=6, return_dict_in_generate=True)
    assert out.past_key_values.get_seq_length() == inputs["input_ids"].shape[1] + 5
    assert session.stats.layers_compressed == 2


@pytest.mark.parametrize("method", ["snapkv+mixkv", "adakv+mixkv"])
def test_turns_and_decode_budget_on_cuda_bf16(method):
    """Compression after the first prefill on CUDA in bf16: a second turn longer than the window is
    compressed, decoding stays within decode_budget + every, and nothing leaves the device."""
    model = make_model("llama", dtype=torch.bfloat16).cuda()
    inputs = {k: v.cuda() for k, v in make_inputs(model, "llama", batch=2, text_len=60, left_pad=[0, 7]).items()}
    with mixkv.press(model, method, budget=24, window=8, decode_budget=32, every=4) as session:
        out = model.generate(**inputs, max_new_tokens=20, return_dict_in_generate=True)
        extra = torch.arange(20, 40, device="cuda")[None].expand(2, -1)
        ids = torch.cat([out.sequences, extra], 1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, ids.shape[1] - inputs["attention_mask"].shape[1],
                                                               dtype=torch.long, device="cuda")], 1)
        turn = model.generate(input_ids=ids, attention_mask=mask, cache=out.past_key_values, max_new_tokens=20,
                              return_dict_in_generate=True)
        assert session.stats.segments_compressed == 2 and session.stats.decode_compressions > 0
    for layer in turn.past_key_values.layers:
        assert isinstance(layer, CompressedLayer) and layer.keys.is_cuda
        assert layer.held_mean_max() < max(layer.kept_mean_max, 32) + 4
    assert turn.past_key_values.get_seq_length() == ids.shape[1] + 19
