"""Smoke tests for the tiny-model zoo in tests/zoo.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from zoo import (  # noqa: E402
    ARCHS,
    IMAGE_TOKEN_ID,
    QWEN_VL_ARCHS,
    SPECIAL_IDS,
    VLM_ARCHS,
    make_inputs,
    make_model,
    num_image_tokens,
    select_row,
)

NEW_TOKENS = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: OpenMP fan-out only costs time (and is catastrophic on a loaded 2-core box).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _visual_feature_count(model, inputs) -> int:
    """Number of visual embeddings the vision tower + projector produce for ``inputs``."""
    image_kwargs = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "image_sizes") if k in inputs}
    with torch.no_grad():
        pooled = model.get_image_features(**image_kwargs).pooler_output
    if isinstance(pooled, torch.Tensor):  # InternVL: (tiles, tokens_per_tile, hidden)
        return pooled.shape[:-1].numel()
    return sum(p.shape[0] for p in pooled)  # one (tokens, hidden) tensor per image


def test_arch_lists():
    assert set(VLM_ARCHS) <= set(ARCHS) and len(ARCHS) == 10 and len(VLM_ARCHS) == 6


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_after_save_load(arch, tmp_path):
    model = make_model(arch, tmp_path=tmp_path)
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    inputs = make_inputs(model, arch)
    ids = inputs["input_ids"]
    text = ids[~torch.isin(ids, torch.tensor(SPECIAL_IDS))]
    assert text.numel() == 40  # text_len tokens, none of them special

    if arch in VLM_ARCHS:
        n_img = int((ids == model.config.image_token_id).sum())
        assert model.config.image_token_id == IMAGE_TOKEN_ID
        assert n_img == num_image_tokens(model, arch) == _visual_feature_count(model, inputs)
        assert 16 <= n_img <= 64
        assert 60 <= ids.shape[1] <= 120

    with torch.no_grad():
        logits = model(**inputs).logits  # raises on an image-token / feature mismatch
    assert logits.shape == (*ids.shape, model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()

    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.shape == (1, ids.shape[1] + NEW_TOKENS)
    assert torch.equal(out[:, : ids.shape[1]], ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_matches_single(arch):
    model = make_model(arch, seed=1)
    inputs = make_inputs(model, arch, batch=2, left_pad=[0, 5], seed=1)
    ids = inputs["input_ids"]
    assert ids.shape[0] == 2
    assert inputs["attention_mask"].sum(1).tolist() == [ids.shape[1], ids.shape[1] - 5]
    assert (ids[1, :5] == 0).all() and (inputs["attention_mask"][1, :5] == 0).all()
    if arch in VLM_ARCHS:  # one image per sequence
        per_image = num_image_tokens(model, arch)
        assert (ids == IMAGE_TOKEN_ID).sum(1).tolist() == [per_image, per_image]
        assert _visual_feature_count(model, inputs) == 2 * per_image

    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.shape == (2, ids.shape[1] + NEW_TOKENS)
    for i in range(2):  # left padding is handled exactly: each row equals its unpadded batch-1 run
        row = select_row(inputs, arch, i)
        single = model.generate(**row, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert single[0, row["input_ids"].shape[1] :].tolist() == out[i, ids.shape[1] :].tolist()


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_vlm_text_only(arch):
    model = make_model(arch)
    inputs = make_inputs(model, arch, image=False)
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert not (inputs["input_ids"] == IMAGE_TOKEN_ID).any()
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.shape == (1, 40 + NEW_TOKENS)


@pytest.mark.parametrize("arch", QWEN_VL_ARCHS)
def test_qwen_vl_mrope_layout(arch):
    model = make_model(arch)
    inputs = make_inputs(model, arch)
    ids = inputs["input_ids"][0]
    img = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    assert ids[img[0] - 1] == model.config.vision_start_token_id
    assert ids[img[-1] + 1] == model.config.vision_end_token_id
    assert torch.equal(inputs["mm_token_type_ids"][0].bool(), ids == IMAGE_TOKEN_ID)
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert inputs["pixel_values"].shape[0] == t * h * w


@pytest.mark.parametrize("arch", ["llama", "qwen2_vl"])
def test_weights_deterministic_per_seed(arch):
    a, b, c = make_model(arch, seed=3), make_model(arch, seed=3), make_model(arch, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "llava_next"])
def test_greedy_output_is_varied(arch):
    for seed in range(3):
        model = make_model(arch, seed=seed)
        inputs = make_inputs(model, arch, seed=seed)
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        assert len(set(out[0, -10:].tolist())) > 2


@pytest.mark.parametrize("arch", ["qwen3", "qwen2_5_vl", "internvl"])
def test_dtype_and_attn_implementation(arch, tmp_path):
    built = make_model(arch, dtype=torch.bfloat16, attn_implementation="eager")
    loaded = make_model(arch, dtype=torch.bfloat16, attn_implementation="eager", tmp_path=tmp_path)
    for model in (built, loaded):
        assert model.config._attn_implementation == "eager"
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    inputs = make_inputs(built, arch)
    if "pixel_values" in inputs:
        assert inputs["pixel_values"].dtype == torch.bfloat16
    outs = [m.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False) for m in (built, loaded)]
    assert torch.equal(outs[0], outs[1])  # building directly == the save/load path
