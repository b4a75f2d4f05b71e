"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, a Qwen2 language model behind a SigLIP
tower with anyres tiles): a tiny random-weight model, image inputs, generation under a press."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent))
from zoo import _configure_generation  # noqa: E402

import mixkv  # noqa: E402
from mixkv.core.models import inspect_model  # noqa: E402

IMAGE_ID, VIDEO_ID = 250, 251


@pytest.fixture(scope="module")
def onevision():
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=16, patch_size=8)
    text = tf.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config = tf.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                                     video_token_id=VIDEO_ID, vision_feature_select_strategy="full",
                                     vision_feature_layer=-1, tie_word_embeddings=False,
                                     image_grid_pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32]])
    torch.manual_seed(0)
    model = tf.LlavaOnevisionForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    _configure_generation(model)
    return model


def _inputs(model, batch: int = 1, text_len: int = 40):
    gen = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(batch, 5, 3, 16, 16, generator=gen)  # base tile + a 2 x 2 anyres grid
    image_sizes = torch.tensor([[32, 32]] * batch)
    with torch.no_grad():  # as many placeholders as the model makes features (its processor's count)
        feats = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes,
                                               vision_feature_layer=-1, vision_feature_select_strategy="full")
    n_img = feats.pooler_output[0].shape[0]
    text = torch.randint(3, 200, (batch, text_len), generator=gen)
    ids = torch.cat([text[:, :4], torch.full((batch, n_img), IMAGE_ID), text[:, 4:]], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values,
            "image_sizes": image_sizes}, n_img


def test_onevision_is_supported(onevision):
    info = inspect_model(onevision)
    assert info.is_vlm and info.image_token_id == IMAGE_ID and info.num_layers == 2 and info.num_kv_heads == 2


def test_onevision_generates_under_a_press(onevision):
    inputs, n_img = _inputs(onevision)
    n = inputs["input_ids"].shape[1]
    plain = onevision.generate(**inputs, max_new_tokens=6)
    with mixkv.press(onevision, "snapkv+mixkv", budget=n + 8, window=8):  # covers the prompt: identical
        assert torch.equal(onevision.generate(**inputs, max_new_tokens=6), plain)
    with mixkv.press(onevision, "adakv+mixkv", budget=16, window=8, record=True) as session:
        out = onevision.generate(**inputs, max_new_tokens=6, return_dict_in_generate=True)
        assert int(session.image_mask.sum()) == n_img and session.stats.layers_compressed == 2
    assert out.sequences.shape == plain.shape
    # exactly the budget: 2 layers x 2 KV heads x (16 kept + 5 decoded) x K,V x 16 dims x 4 bytes
    assert mixkv.cache_kv_bytes(out.past_key_values) == 2 * 2 * (16 + 5) * 2 * 16 * 4
