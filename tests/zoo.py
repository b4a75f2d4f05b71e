"""A zoo of tiny random-weight Hugging Face models (transformers 5.x) for fast CPU tests.

Nothing here touches the network: every model is built from a hand-written config, every input is
synthesised (no tokenizer / processor), and every visual-token count is computed from the model's own
config with the same arithmetic as the real processor.

Typical use::

    model = make_model("qwen2_vl", tmp_path=tmp_path)
    inputs = make_inputs(model, "qwen2_vl", batch=2, left_pad=[0, 5])
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)

Conventions shared by every arch:

* vocab of 256 ids; ids ``0..7`` are reserved for special tokens (see the ``*_ID`` constants), plain
  text ids are drawn from ``[TEXT_ID_LOW, TEXT_ID_HIGH)``;
* ``hidden_size = num_heads * head_dim`` (64 by default); GQA with ``num_kv_heads`` kv heads;
* ``model.generation_config``: greedy, ``eos_token_id=None`` (generation never stops early, so
  ``generate(max_new_tokens=n)`` always returns exactly ``n`` new tokens) and ``pad_token_id=PAD_ID``.
"""

from __future__ import annotations

import torch
from transformers.image_processing_utils import select_best_resolution

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "internvl"]
TEXT_ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
VLM_ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "internvl"]
QWEN_VL_ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]

VOCAB_SIZE = 256
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
IMAGE_TOKEN_ID = 3  # config.image_token_id for every VLM
VIDEO_TOKEN_ID = 4  # Qwen-VL only (never used in inputs)
VISION_START_ID = 5  # Qwen-VL <|vision_start|>; InternVL <img>
VISION_END_ID = 6  # Qwen-VL <|vision_end|>; InternVL </img>
SPECIAL_IDS = (PAD_ID, BOS_ID, EOS_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_START_ID, VISION_END_ID)
TEXT_ID_LOW = 8
TEXT_ID_HIGH = VOCAB_SIZE

INITIALIZER_RANGE = 0.5  # large init -> peaky, varied logits (greedy output is not one repeated token)
MAX_POSITIONS = 8192

# Vision geometry (chosen so that one image gives 16..64 visual tokens).
QWEN_PATCH = 4
QWEN_TEMPORAL_PATCH = 2
QWEN_MERGE = 2
QWEN_GRID_THW = (1, 12, 16)  # patches per image -> 12*16/2**2 = 48 visual tokens
LLAVA_IMAGE_SIZE = 32
LLAVA_PATCH = 4  # (32/4)**2 = 64 visual tokens
LLAVA_NEXT_TILE = 16
LLAVA_NEXT_PATCH = 4
LLAVA_NEXT_PINPOINTS = [[16, 32], [32, 16], [32, 32]]
LLAVA_NEXT_IMAGE_HW = (10, 40)  # original (height, width): 1x2 tiles + base, unpadding removes rows
INTERNVL_IMAGE_SIZE = 32
INTERNVL_PATCH = 4
INTERNVL_TILES = 2  # tiles per image (e.g. one crop + the thumbnail): 2 * (32/4)**2 * 0.5**2 = 32 tokens


# ----------------------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------------------


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) like [16, 24, 24] does for head_dim 128."""
    half = head_dim // 2
    hw = (half * 3) // 8
    return [half - 2 * hw, hw, hw]


def _text_kwargs(num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int) -> dict:
    hidden = num_heads * head_dim
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": INITIALIZER_RANGE,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "tie_word_embeddings": False,
    }


def _make_config(arch: str, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int):
    import transformers as tf

    text = _text_kwargs(num_layers, num_heads, num_kv_heads, head_dim)
    hidden = text["hidden_size"]
    qwen_vl_ids = {
        "image_token_id": IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
        "vision_start_token_id": VISION_START_ID,
        "vision_end_token_id": VISION_END_ID,
        "tie_word_embeddings": False,
        "initializer_range": INITIALIZER_RANGE,
    }

    if arch == "llama":
        return tf.LlamaConfig(**text, head_dim=head_dim)
    if arch == "mistral":
        return tf.MistralConfig(**text, head_dim=head_dim, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**text, use_sliding_window=False)
    if arch == "qwen3":
        return tf.Qwen3Config(**text, head_dim=head_dim, use_sliding_window=False)

    if arch in ("qwen2_vl", "qwen2_5_vl"):
        text_cls = tf.Qwen2VLTextConfig if arch == "qwen2_vl" else tf.Qwen2_5_VLTextConfig
        # NB: Qwen2(.5)-VL text attention always uses head_dim = hidden_size // num_heads.
        text_cfg = text_cls(
            **text,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(head_dim)},
        )
        if arch == "qwen2_vl":
            vision_cfg = tf.Qwen2VLVisionConfig(
                depth=2,
                embed_dim=32,
                hidden_size=hidden,  # merger output = text hidden size
                mlp_ratio=2,
                num_heads=2,
                patch_size=QWEN_PATCH,
                temporal_patch_size=QWEN_TEMPORAL_PATCH,
                spatial_merge_size=QWEN_MERGE,
                initializer_range=INITIALIZER_RANGE,
            )
            return tf.Qwen2VLConfig(text_config=text_cfg, vision_config=vision_cfg, **qwen_vl_ids)
        vision_cfg = tf.Qwen2_5_VLVisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=QWEN_PATCH,
            temporal_patch_size=QWEN_TEMPORAL_PATCH,
            spatial_merge_size=QWEN_MERGE,
            window_size=2 * QWEN_MERGE * QWEN_PATCH,  # windows of 2x2 merged tokens
            fullatt_block_indexes=[1],
            out_hidden_size=hidden,
            initializer_range=INITIALIZER_RANGE,
        )
        return tf.Qwen2_5_VLConfig(text_config=text_cfg, vision_config=vision_cfg, **qwen_vl_ids)

    if arch == "qwen3_vl":
        text_cfg = tf.Qwen3VLTextConfig(
            **{k: v for k, v in text.items() if k not in ("bos_token_id", "eos_token_id", "tie_word_embeddings")},
            head_dim=head_dim,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e5,
                "mrope_section": _mrope_section(head_dim),
                "mrope_interleaved": True,
            },
        )
        vision_cfg = tf.Qwen3VLVisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=QWEN_PATCH,
            temporal_patch_size=QWEN_TEMPORAL_PATCH,
            spatial_merge_size=QWEN_MERGE,
            out_hidden_size=hidden,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
            initializer_range=INITIALIZER_RANGE,
        )
        return tf.Qwen3VLConfig(text_config=text_cfg, vision_config=vision_cfg, **qwen_vl_ids)

    if arch in ("llava", "llava_next"):
        size, patch = (LLAVA_IMAGE_SIZE, LLAVA_PATCH) if arch == "llava" else (LLAVA_NEXT_TILE, LLAVA_NEXT_PATCH)
        vision_cfg = tf.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=size,
            patch_size=patch,
            projection_dim=32,
        )
        text_cfg = tf.LlamaConfig(**text, head_dim=head_dim)
        common = {
            "vision_config": vision_cfg,
            "text_config": text_cfg,
            "image_token_id": IMAGE_TOKEN_ID,
            "vision_feature_select_strategy": "default",
            "vision_feature_layer": -2,
            "image_seq_length": (size // patch) ** 2,
            "tie_word_embeddings": False,
        }
        if arch == "llava":
            return tf.LlavaConfig(**common)
        return tf.LlavaNextConfig(**common, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)

    if arch == "internvl":
        vision_cfg = tf.InternVLVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=[INTERNVL_IMAGE_SIZE, INTERNVL_IMAGE_SIZE],
            patch_size=[INTERNVL_PATCH, INTERNVL_PATCH],
            initializer_range=INITIALIZER_RANGE,
        )
        text_cfg = tf.Qwen2Config(**text, use_sliding_window=False)
        return tf.InternVLConfig(
            vision_config=vision_cfg,
            text_config=text_cfg,
            image_token_id=IMAGE_TOKEN_ID,
            image_seq_length=_internvl_tokens_per_tile(INTERNVL_IMAGE_SIZE, INTERNVL_PATCH, 0.5),
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


_MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
}


def model_class(arch: str) -> type:
    import transformers as tf

    if arch not in _MODEL_CLASSES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return getattr(tf, _MODEL_CLASSES[arch])


def make_config(arch: str, *, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16):
    """The (unsaved) config ``make_model`` builds ``arch`` from."""
    return _make_config(arch, num_layers, num_heads, num_kv_heads, head_dim)


def make_model(
    arch: str,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    tmp_path=None,
) -> torch.nn.Module:
    """A tiny random-weight ``arch`` model in eval mode.

    Weights are a deterministic function of (arch, seed, sizes): they are always initialised in float32 and then
    cast to ``dtype``. With ``tmp_path`` the float32 model is ``save_pretrained`` there and loaded back with
    ``from_pretrained(tmp_path, dtype=dtype, attn_implementation=attn_implementation)`` (the real loading path).
    """
    config = _make_config(arch, num_layers, num_heads, num_kv_heads, head_dim)
    cls = model_class(arch)
    torch.manual_seed(seed)
    model = cls(config)  # float32 init; attention implementation is set below / on load
    _configure_generation(model)
    if tmp_path is not None:
        model.save_pretrained(tmp_path)
        del model
        model = cls.from_pretrained(tmp_path, dtype=dtype, attn_implementation=attn_implementation)
        _configure_generation(model)
    else:
        _cast_parameters(model, dtype)
        model.set_attn_implementation(attn_implementation)
    return model.eval()


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters only, like ``from_pretrained(dtype=...)``: buffers (rotary ``inv_freq``...) stay float32."""
    buffers = dict(model.named_buffers(remove_duplicate=False))
    model.to(dtype)
    for name, buf in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buf


def _configure_generation(model) -> None:
    gc = model.generation_config
    gc.eos_token_id = None  # never stop early: output length == prompt + max_new_tokens
    gc.pad_token_id = PAD_ID
    gc.bos_token_id = BOS_ID
    gc.do_sample = False


# ----------------------------------------------------------------------------------------------------------------------
# visual token counts
# ----------------------------------------------------------------------------------------------------------------------


def _internvl_tokens_per_tile(image_size: int, patch: int, downsample_ratio: float) -> int:
    return int((image_size // patch) ** 2 * downsample_ratio**2)


def _llava_next_num_tokens(config, orig_hw: tuple[int, int]) -> int:
    """LlavaNextProcessor._get_number_of_features: base tile + unpadded anyres grid + one newline per row."""
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    best_h, best_w = select_best_resolution(list(orig_hw), config.image_grid_pinpoints)
    cur_h, cur_w = side * (best_h // tile), side * (best_w // tile)
    orig_h, orig_w = orig_hw
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(orig_w * (cur_h / orig_h), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    base = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
    return cur_h * cur_w + cur_h + base


def _llava_next_num_crops(config, orig_hw: tuple[int, int]) -> int:
    tile = config.vision_config.image_size
    best_h, best_w = select_best_resolution(list(orig_hw), config.image_grid_pinpoints)
    return (best_h // tile) * (best_w // tile) + 1


def num_image_tokens(model_or_config, arch: str) -> int:
    """Number of ``image_token_id`` placeholders one image from ``make_inputs`` expands to."""
    config = getattr(model_or_config, "config", model_or_config)
    if arch in QWEN_VL_ARCHS:
        t, h, w = QWEN_GRID_THW
        return t * h * w // config.vision_config.spatial_merge_size**2
    if arch == "llava":
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
    if arch == "llava_next":
        return _llava_next_num_tokens(config, LLAVA_NEXT_IMAGE_HW)
    if arch == "internvl":
        vc = config.vision_config
        per_tile = _internvl_tokens_per_tile(vc.image_size[0], vc.patch_size[0], config.downsample_ratio)
        return INTERNVL_TILES * per_tile
    raise ValueError(f"{arch!r} is not a VLM arch ({VLM_ARCHS})")


# ----------------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------------


def _image_tensors(config, arch: str, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict:
    """Pixel tensors (one image per sequence) in the layout the model's processor would produce."""
    if arch in QWEN_VL_ARCHS:
        vc = config.vision_config
        t, h, w = QWEN_GRID_THW
        dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        pixel_values = torch.randn(batch * t * h * w, dim, generator=gen)
        grid = torch.tensor([QWEN_GRID_THW] * batch, dtype=torch.long)
        return {"pixel_values": pixel_values.to(dtype), "image_grid_thw": grid}
    if arch == "llava":
        s = config.vision_config.image_size
        return {"pixel_values": torch.randn(batch, 3, s, s, generator=gen).to(dtype)}
    if arch == "llava_next":
        s = config.vision_config.image_size
        crops = _llava_next_num_crops(config, LLAVA_NEXT_IMAGE_HW)
        pixel_values = torch.randn(batch, crops, 3, s, s, generator=gen).to(dtype)
        image_sizes = torch.tensor([list(LLAVA_NEXT_IMAGE_HW)] * batch, dtype=torch.long)
        return {"pixel_values": pixel_values, "image_sizes": image_sizes}
    if arch == "internvl":
        s = config.vision_config.image_size[0]
        return {"pixel_values": torch.randn(batch * INTERNVL_TILES, 3, s, s, generator=gen).to(dtype)}
    raise ValueError(f"{arch!r} is not a VLM arch ({VLM_ARCHS})")


def _sequence(arch: str, text: list[int], n_img: int) -> list[int]:
    """One prompt: a short text prefix, the image block, then the rest of the text."""
    if n_img == 0:
        return text
    n_pre = min(4, len(text) // 4)
    if arch in QWEN_VL_ARCHS or arch == "internvl":
        image = [VISION_START_ID] + [IMAGE_TOKEN_ID] * n_img + [VISION_END_ID]
    else:  # llava / llava-next: the placeholder run sits directly in the text
        image = [IMAGE_TOKEN_ID] * n_img
    return text[:n_pre] + image + text[n_pre:]


def make_inputs(
    model,
    arch: str,
    *,
    batch: int = 1,
    text_len: int = 40,
    seed: int = 0,
    image: bool = True,
    left_pad: list[int] | None = None,
) -> dict:
    """Keyword arguments for ``model(**inputs)`` / ``model.generate(**inputs)``.

    Every sequence has the same (padded) length: ``text_len`` text tokens (+ for VLMs with ``image=True`` the
    image block). ``left_pad[i]`` positions of sequence ``i`` are left padding (``PAD_ID``, attention_mask 0),
    taken out of its text tokens, so the padded length does not depend on ``left_pad``.
    VLMs with ``image=True`` give each sequence one image (different pixels per sequence).
    """
    config = model.config
    is_vlm = arch in VLM_ARCHS
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    left_pad = [0] * batch if left_pad is None else list(left_pad)
    if len(left_pad) != batch:
        raise ValueError(f"left_pad has {len(left_pad)} entries for batch={batch}")
    if any(p < 0 or p >= text_len for p in left_pad):
        raise ValueError(f"left_pad entries must be in [0, text_len={text_len})")
    use_image = is_vlm and image
    n_img = num_image_tokens(config, arch) if use_image else 0

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for pad in left_pad:
        text = torch.randint(TEXT_ID_LOW, TEXT_ID_HIGH, (text_len - pad,), generator=gen).tolist()
        rows.append([PAD_ID] * pad + _sequence(arch, text, n_img))
    input_ids = torch.tensor(rows, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)
    for i, pad in enumerate(left_pad):
        attention_mask[i, :pad] = 0

    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if use_image:
        dtype = next(model.parameters()).dtype
        inputs.update(_image_tensors(config, arch, batch, gen, dtype))
        if arch in QWEN_VL_ARCHS:
            # 5.x M-RoPE needs the processor's modality map: 0 text, 1 image, 2 video.
            inputs["mm_token_type_ids"] = (input_ids == config.image_token_id).to(torch.int32)
    return inputs


def select_row(inputs: dict, arch: str, i: int) -> dict:
    """The unpadded batch-1 inputs of row ``i`` of a ``make_inputs`` batch (one image per row)."""
    keep = inputs["attention_mask"][i].bool()
    out = {"input_ids": inputs["input_ids"][i][keep][None]}
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][i][keep][None]
    if "pixel_values" not in inputs:
        return out
    pv = inputs["pixel_values"]
    if arch in QWEN_VL_ARCHS:
        sizes = inputs["image_grid_thw"].prod(-1).tolist()
        start = sum(sizes[:i])
        out["pixel_values"] = pv[start : start + sizes[i]]
        out["image_grid_thw"] = inputs["image_grid_thw"][i : i + 1]
    elif arch == "internvl":
        tiles = pv.shape[0] // inputs["input_ids"].shape[0]
        out["pixel_values"] = pv[i * tiles : (i + 1) * tiles]
    else:
        out["pixel_values"] = pv[i : i + 1]
        if "image_sizes" in inputs:
            out["image_sizes"] = inputs["image_sizes"][i : i + 1]
    return out
