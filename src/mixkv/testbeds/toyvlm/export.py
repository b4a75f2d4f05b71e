"""Write a toy VLM as a standard transformers LLaVA folder that vLLM loads as it is.

:func:`load_toy_vlm` builds the toy VLM at load time (SmolLM2's GGUF + the shipped vision tower, projector and
LoRA factors). A serving engine needs the usual folder instead; :func:`export_toy_vlm` writes one:

* ``model.safetensors``: the merged float32 weights, named as llava-hf checkpoints name them
  (``language_model.model.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``; the output
  head is tied to the embeddings, as in SmolLM2, so it is not stored). transformers renames these on load
  (its LLaVA conversion mapping) and vLLM's LLaVA reads them directly;
* ``config.json``: ``llava`` with ``text_config`` (llama), ``vision_config`` (``clip_vision_model``),
  ``image_token_index`` 16 and the vision feature layer / select strategy / projector activation as
  trained; ``generation_config.json``;
* the tokenizer, with a chat template (:data:`CHAT_TEMPLATE`): SmolLM2's, whose user turn renders an
  image part as the image token followed by a newline, so ``[image, "{question} Answer in one sentence."]``
  gives exactly :class:`~.model.ToyVLMProcessor`'s prompt;
* ``preprocessor_config.json`` (a CLIP image processor: RGB, bicubic resize to 384 x 384 without a crop,
  as the toy's own processor does for any image size, scale by 1/255, mean and std 0.5) and
  ``processor_config.json`` (a ``LlavaProcessor`` whose image token is the toy VLM's, ``<empty_output>``,
  expanded to 576 copies: 24 x 24 patches + the CLS token, which the ``default`` strategy drops).

Pure I/O and model plumbing: nothing here computes anything the model does.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import model as tv

# SmolLM2's template (default system message) with image parts: an "openai"-style content list renders an
# image as the image token and a newline (vLLM detects the list loop and passes image parts this way); plain
# string content is kept as written, with ToyVLMProcessor's "<image>" placeholder turned into the image token.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | replace('" + tv.IMAGE_PLACEHOLDER + "', '" + tv.IMAGE_TOKEN + "') }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url', 'image_pil') -%}"
    "{{ '" + tv.IMAGE_TOKEN + "\\n' }}"
    "{%- elif part['type'] == 'text' -%}"
    "{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

WEIGHTS_FILE = "model.safetensors"
STAMP_FILE = "mixkv-export.json"  # what was exported, from which shipped weights (idempotence check)


@dataclass(frozen=True)
class Exported:
    """What :func:`export_toy_vlm` wrote."""

    path: Path
    tensors: int
    bytes: int
    reused: bool = False


def checkpoint_name(key: str) -> str:
    """The llava-hf checkpoint name of a ``LlavaForConditionalGeneration.state_dict()`` key.

    ``model.language_model.X`` -> ``language_model.model.X``; ``model.vision_tower.X`` ->
    ``vision_tower.vision_model.X`` (a CLIP vision checkpoint's own prefix, which transformers strips on
    load and vLLM's CLIP model keeps); ``model.multi_modal_projector.X`` -> ``multi_modal_projector.X``;
    ``lm_head.X`` -> ``language_model.lm_head.X``.
    """
    for ours, theirs in (("model.language_model.", "language_model.model."),
                         ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
                         ("model.vision_tower.", "vision_tower.vision_model."),
                         ("model.multi_modal_projector.", "multi_modal_projector."),
                         ("lm_head.", "language_model.lm_head.")):
        if key.startswith(ours):
            return theirs + key[len(ours):]
    raise ValueError(f"unexpected tensor {key!r} in the toy VLM (not language model, vision tower, projector, head)")


def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """The model's tensors under checkpoint names, float32 and contiguous; a tied output head is left out."""
    tied = bool(getattr(model.config.text_config, "tie_word_embeddings", False))
    out = {}
    for key, tensor in model.state_dict().items():
        if tied and key.startswith("lm_head."):
            continue
        out[checkpoint_name(key)] = tensor.detach().to(torch.float32).contiguous().clone()
    return out


def llava_config(model) -> dict:
    """config.json of the exported folder (the model's LlavaConfig, float32, architecture named)."""
    config = model.config.to_dict()
    config["architectures"] = ["LlavaForConditionalGeneration"]
    config["dtype"] = "float32"
    config["image_token_index"] = int(model.config.image_token_id)
    for key in ("_name_or_path", "name_or_path", "transformers_version"):
        config.pop(key, None)
    text = config["text_config"]
    for key in ("_name_or_path", "_model_name_or_path", "name_or_path"):
        text.pop(key, None)
    text["dtype"] = "float32"
    text["architectures"] = ["LlamaForCausalLM"]
    config["vision_config"]["dtype"] = "float32"
    return config


def image_processor(processor: tv.ToyVLMProcessor):
    """A CLIP image processor doing what ``ToyVLMProcessor.pixel_values`` does (RGB, bicubic to the model's
    size, x / 255, then (x - mean) / std)."""
    from transformers import CLIPImageProcessor

    size = processor.image_size
    return CLIPImageProcessor(
        do_resize=True, size={"height": size, "width": size}, resample=3,  # PIL bicubic, to a square as the toy does
        do_center_crop=False, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[processor.mean] * 3, image_std=[processor.std] * 3, do_convert_rgb=True)


def llava_processor(processor: tv.ToyVLMProcessor, vision_config, select_strategy: str):
    """The ``LlavaProcessor`` of the exported folder: the toy VLM's image token, expanded to one token per patch."""
    from transformers import LlavaProcessor

    tokenizer = copy.deepcopy(processor.tokenizer)  # the caller's processor keeps its own template
    tokenizer.chat_template = CHAT_TEMPLATE
    cls = 1  # CLIP adds a CLS token, which the 'default' strategy drops again
    return LlavaProcessor(image_processor=image_processor(processor), tokenizer=tokenizer,
                          patch_size=int(vision_config.patch_size), vision_feature_select_strategy=select_strategy,
                          chat_template=CHAT_TEMPLATE, image_token=tv.IMAGE_TOKEN, num_additional_image_tokens=cls)


def _stamp(name: str) -> dict:
    weights = tv.shipped_weights(name) / tv.WEIGHTS_FILE
    return {"name": name, "weights_bytes": weights.stat().st_size, "format": 1}


def is_exported(out_dir: str | Path, name: str = "toy-vlm-24") -> bool:
    """True when ``out_dir`` holds a finished export of ``name``'s shipped weights."""
    stamp = Path(out_dir) / STAMP_FILE
    try:
        return json.loads(stamp.read_text()) == _stamp(name)
    except (OSError, ValueError):
        return False


def export_toy_vlm(out_dir: str | Path, name: str = "toy-vlm-24", loaded=None, force: bool = False) -> Exported:
    """Write ``name`` (a shipped toy VLM) as a LLaVA folder at ``out_dir``; see the module docstring.

    ``loaded``: ``(model, processor)`` from :func:`load_toy_vlm` (loaded here when None). A folder that
    already holds this export is left as it is unless ``force``. The folder is written beside ``out_dir``
    and renamed into place, so an interrupted export leaves no half folder under the final name.
    """
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    if not force and is_exported(out, name):
        return Exported(out, 0, 0, reused=True)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / STAMP_FILE).is_file():
        raise FileExistsError(f"{out} is a non-empty directory that is not a toy VLM export; pick another --out")
    if loaded is None:
        loaded = tv.load_toy_vlm(torch.float32, tv.shipped_weights(name))
    model, processor = loaded
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = checkpoint_tensors(model)
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(llava_config(model), indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(tmp))
    llava = llava_processor(processor, model.config.vision_config, model.config.vision_feature_select_strategy)
    llava.save_pretrained(str(tmp))  # tokenizer, chat template, processor_config.json
    llava.image_processor.save_pretrained(str(tmp))  # preprocessor_config.json, the file older readers look for
    (tmp / WEIGHTS_FILE).chmod(0o644)  # save_file creates it private; the folder is meant to be served
    (tmp / STAMP_FILE).write_text(json.dumps(_stamp(name)) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return Exported(out, len(tensors), sum(t.numel() * t.element_size() for t in tensors.values()))
