"""Let vLLM's LLaVA load in a venv without torchvision (installed there as ``_mixkv_vllm_compat``).

Why: vLLM 0.32's ``llava.py`` imports ``pixtral.py``, which imports ``_num_image_tokens`` from
``transformers.models.pixtral.image_processing_pixtral``; in transformers 5.16-5.19 that module imports
``torchvision`` at its top. ``make vllm-env`` leaves torchvision out (the registry's wheels are built against
the CUDA torch: their ``_C.so`` needs ``libtorch_cuda.so`` and ``import torchvision`` stops with
``operator torchvision::nms does not exist`` under ``torch 2.13.0+cpu``), so without this every LLaVA model
fails vLLM's model inspection ("Model architectures ['LlavaForConditionalGeneration'] failed to be inspected").

What: a finder placed first on ``sys.meta_path`` answers for that one module name only, and only while
torchvision cannot be found; it then serves transformers' PIL twin of the module
(``image_processing_pil_pixtral``, same ``_num_image_tokens``), with ``PixtralImageProcessor`` naming its PIL
class. Nothing else changes, and with torchvision installed the finder stands aside.

Loaded in every process of the venv by a ``.pth`` line (``import _mixkv_vllm_compat``) that
``scripts/vllm_env.sh`` writes next to a copy of this file: vLLM inspects models in subprocesses that load
no plugins, so the mixkv plugin's entry point would be too late and too narrow (vLLM without the plugin needs
it as well). Standard library only, and nothing imported at start-up beyond it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

TARGET = "transformers.models.pixtral.image_processing_pixtral"
FALLBACK = "transformers.models.pixtral.image_processing_pil_pixtral"


def torchvision_missing() -> bool:
    return importlib.util.find_spec("torchvision") is None


class PixtralWithoutTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves :data:`FALLBACK`'s names as :data:`TARGET` when torchvision is not installed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET or not torchvision_missing():
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module) -> None:
        fallback = importlib.import_module(FALLBACK)
        module.__dict__.update({k: v for k, v in vars(fallback).items() if not k.startswith("__")})
        if "PixtralImageProcessorPil" in module.__dict__:
            module.PixtralImageProcessor = module.PixtralImageProcessorPil
        module.__doc__ = f"{FALLBACK}, served as {TARGET} because torchvision is not installed (mixkv's vLLM venv)"


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, PixtralWithoutTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, PixtralWithoutTorchvision())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, PixtralWithoutTorchvision)]


if __name__ == "_mixkv_vllm_compat":  # the copy the venv's .pth imports installs itself
    install()
