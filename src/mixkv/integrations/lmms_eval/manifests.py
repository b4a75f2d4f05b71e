"""The models mixkv registers in lmms-eval (entry-point group ``lmms_eval.models``).

Each supported lmms-eval model id ``X`` gets a mixkv twin ``mixkv_X`` that takes ``X``'s usual
``--model_args`` plus mixkv's (``method``, ``budget`` / ``ratio``, ``window``, ``profile``, ``redundancy``);
``toy_vlm`` is our toy VLM as a plain lmms-eval model and ``mixkv_toy_vlm`` its mixkv twin.

Decisions:

* one id per family rather than one ``mixkv`` id with a ``base=`` argument: lmms-eval resolves a name to a
  class *before* it parses ``--model_args`` and checks the class's ``is_simple`` against the manifest, so the
  class (simple or chat) must follow from the name alone;
* a twin offers exactly the implementations (simple / chat) lmms-eval 0.7.3 offers for its base, so
  ``--model mixkv_qwen2_5_vl`` picks the chat class as ``--model qwen2_5_vl`` does (lmms-eval prefers chat);
* classes are built on first use (:mod:`.wrapped`), so registering imports neither lmms-eval's model code
  nor torch: ``lmms-eval --help`` stays fast;
* listed are the families of the issue whose lmms-eval class loads a Hugging Face model of a type mixkv
  supports (``mixkv.core.models.SUPPORTED``). LLaVA-OneVision: the HF OneVision checkpoints go through
  ``mixkv_llava_hf`` (``model_type="llava_onevision"``, supported by the core; tested there on a tiny model,
  not through lmms-eval here); lmms-eval's own ``llava_onevision`` id loads the original LLaVA repository's
  model (not a transformers class) and is not wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass

WRAPPED_MODULE = "mixkv.integrations.lmms_eval.wrapped"
TOY_MODULE = "mixkv.integrations.lmms_eval.toyvlm_model"


@dataclass(frozen=True)
class Family:
    """An lmms-eval model id mixkv wraps, and which implementations lmms-eval 0.7.3 has for it."""

    base_id: str
    simple: bool
    chat: bool
    note: str


FAMILIES: tuple[Family, ...] = (
    Family("qwen2_vl", simple=True, chat=False, note="Qwen2-VL"),
    Family("qwen2_5_vl", simple=True, chat=True, note="Qwen2.5-VL"),
    Family("qwen3_vl", simple=True, chat=True, note="Qwen3-VL"),
    Family("llava_hf", simple=True, chat=True, note="LLaVA-1.5 / LLaVA-NeXT (transformers checkpoints)"),
    Family("internvl_hf", simple=False, chat=True, note="InternVL (transformers checkpoints, e.g. InternVL3-*-hf)"),
    Family("toy_vlm", simple=True, chat=False, note="mixkv's toy VLM (offline, CPU)"),
)


def class_name(base_id: str, kind: str) -> str:
    """The generated class's name in :mod:`.wrapped`: ``MixKV_qwen2_5_vl__chat``."""
    return f"MixKV_{base_id}__{kind}"


def parse_class_name(name: str) -> tuple[str, str] | None:
    """Inverse of :func:`class_name`: ``(base_id, kind)`` or None."""
    if not name.startswith("MixKV_") or "__" not in name:
        return None
    base_id, _, kind = name[len("MixKV_"):].rpartition("__")
    if kind not in ("simple", "chat") or not any(f.base_id == base_id for f in FAMILIES):
        return None
    return base_id, kind


def manifests() -> list:
    """Entry-point payload: one ``ModelManifest`` per twin, plus ``toy_vlm`` itself."""
    from lmms_eval.models.registry_v2 import ModelManifest

    out = [ModelManifest(model_id="toy_vlm", simple_class_path=f"{TOY_MODULE}.ToyVLM", aliases=("toyvlm",))]
    for f in FAMILIES:
        out.append(ModelManifest(
            model_id=f"mixkv_{f.base_id}",
            simple_class_path=f"{WRAPPED_MODULE}.{class_name(f.base_id, 'simple')}" if f.simple else None,
            chat_class_path=f"{WRAPPED_MODULE}.{class_name(f.base_id, 'chat')}" if f.chat else None,
        ))
    return out
