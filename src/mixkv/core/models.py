"""Per-architecture facts: where the language model's decoder layers are, and image tokens.

Only the language model's decoder layers are compressed, never a vision tower. Image-token
positions come from ``input_ids == config.image_token_id`` (the processors of every supported
VLM expand one image placeholder into one token per visual embedding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# model_type -> human name. VLMs first; the order is the README's.
SUPPORTED: dict[str, str] = {
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "llava": "LLaVA",
    "llava_next": "LLaVA-NeXT",
    "llava_onevision": "LLaVA-OneVision",
    "internvl": "InternVL",
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
}


@dataclass
class ModelInfo:
    """What a press needs to know about a model."""

    name: str
    model_type: str
    language_model: nn.Module
    attention_modules: list[nn.Module]
    text_config: object
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    image_token_id: int | None

    @property
    def is_vlm(self) -> bool:
        return self.image_token_id is not None


def _language_model(model: nn.Module) -> nn.Module:
    """The decoder stack: ``X.model.language_model`` (VLMs), ``X.model`` (LLMs) or ``X`` itself."""
    for candidate in (model, getattr(model, "model", None)):
        if candidate is None:
            continue
        lm = getattr(candidate, "language_model", None)
        if isinstance(lm, nn.Module) and hasattr(lm, "layers"):
            return lm
        if isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            return candidate
    raise ValueError(f"could not find the decoder layers of {type(model).__name__}")


def inspect_model(model: nn.Module) -> ModelInfo:
    """Describe a supported model, or raise a clear error naming the supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        supported = ", ".join(f"{v} ({k})" for k, v in SUPPORTED.items())
        raise ValueError(
            f"unsupported model {type(model).__name__} (model_type={model_type!r}); mixkv supports: {supported}"
        )
    lm = _language_model(model)
    text_config = lm.config
    attention = []
    for i, layer in enumerate(lm.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(attn, "layer_idx", None) != i:
            raise ValueError(f"{type(model).__name__}: decoder layer {i} has no self_attn with layer_idx {i}")
        attention.append(attn)
    num_heads = text_config.num_attention_heads
    num_kv = getattr(text_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    name = getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "") or model_type
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(config, "image_token_index", None)
    return ModelInfo(
        name=str(name), model_type=model_type, language_model=lm, attention_modules=attention,
        text_config=text_config, num_layers=len(attention), num_heads=num_heads, num_kv_heads=num_kv,
        head_dim=head_dim, image_token_id=image_token_id,
    )


def image_token_mask(input_ids: torch.Tensor | None, info: ModelInfo) -> torch.Tensor | None:
    """``(B, N)`` True where the prompt holds an image token; None for text-only inputs."""
    if input_ids is None or info.image_token_id is None or input_ids.dim() != 2:
        return None
    mask = input_ids == info.image_token_id
    return mask if bool(mask.any()) else None
