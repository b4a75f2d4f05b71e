"""The functions the toy-VLM task YAMLs name: image, prompt and the scorer of ``mixkv eval``.

Imported by lmms-eval by module path (``!function mixkv.integrations.lmms_eval.tasks.toyvlm.utils...``), so
the YAMLs work wherever the exporter copied them. Needs only mixkv and PIL (no lmms-eval), so the unit tests
check scorer equality without lmms-eval installed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from PIL import Image

from mixkv.testbeds.toyvlm import generator as gen


def toyvlm_doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The exported PNG, as the RGB image the generator drew (PNG is lossless)."""
    with Image.open(doc["image"]) as img:
        return [img.convert("RGB")]


def toyvlm_doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The bare question: the toy model's processor adds the chat template and " Answer in one sentence."
    exactly as ``mixkv eval`` does; pre/post prompts stay empty unless a model's YAML entry sets them."""
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


@lru_cache(maxsize=4096)
def _sample(seed: int, task: str) -> gen.Sample:
    return gen.make_sample(seed, task=task)


def sample_of(doc: dict[str, Any]) -> gen.Sample:
    """The generator's sample for an exported row; refuses a row whose answer the generator disagrees with."""
    sample = _sample(int(doc["seed"]), str(doc["task"]))
    if sample.answer != doc["answer"] or sample.question != doc["question"]:
        raise ValueError(f"exported row (seed {doc['seed']}, task {doc['task']}) does not match the generator "
                         f"({doc['question']!r} -> {doc['answer']!r} vs {sample.question!r} -> {sample.answer!r}); "
                         "export the data again with this mixkv version")
    return sample


def toyvlm_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``{"accuracy": 1.0 or 0.0}`` by :func:`mixkv.testbeds.toyvlm.generator.score`, the scorer of ``mixkv eval``."""
    text = results[0] if results else ""
    if not isinstance(text, str):
        text = str(text)
    return {"accuracy": gen.score(sample_of(doc), text)}
