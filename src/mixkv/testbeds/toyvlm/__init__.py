"""A small multimodal test bed we train ourselves: SmolLM2-135M-Instruct in a LLaVA with a tiny vision tower.

``load_toy_vlm()`` returns ``(LlavaForConditionalGeneration, ToyVLMProcessor)``; the generator makes the
seeded grid images and questions it was trained on (see ``generator`` and ``weights/MODEL_CARD.md``).
"""

from .generator import Sample, Scene, make_sample, make_samples, make_scene, score
from .model import ToyVLMProcessor, load_toy_vlm

__all__ = [
    "Sample", "Scene", "ToyVLMProcessor", "load_toy_vlm", "make_sample", "make_samples", "make_scene",
    "score",
]
