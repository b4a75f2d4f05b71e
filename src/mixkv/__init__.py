"""mixkv: KV-cache compression for Hugging Face VLMs and LLMs (MixKV and its base methods).

The package is laid out in three layers, with imports only pointing down:

* :mod:`mixkv.core`: the compression itself (scores, budgets, methods, cache, attention, press);
* :mod:`mixkv.lab`: experiments on top of it (evaluation, benchmarks, calibration, analysis,
  the kvpress comparison, figures and tables);
* :mod:`mixkv.cli`: the ``mixkv`` command, argument parsing only.

:mod:`mixkv.testbeds` provides models and data for the lab (SmolLM2 from a PyPI wheel, the
generated text suite, the toy VLM); it uses the core, never the lab. The method spec is
``docs/method.md``.
"""

from .core.versions import check_versions

check_versions()

from .core.capture import Prefill, build_cache, capture_prefill  # noqa: E402
from .core.layer import LayerPrefill  # noqa: E402
from .core.methods import (  # noqa: E402
    AdaKV,
    BudgetedMethod,
    HeadKV,
    Method,
    MixKV,
    PyramidKV,
    RandomKV,
    ScoreWrapper,
    SnapKV,
    SparseMM,
)
from .core.press import PressSession, cache_kv_bytes, press  # noqa: E402
from .core.profiles import Profile, load_profile, save_profile  # noqa: E402
from .core.registry import available_methods, make_method, register_base, register_wrapper  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "AdaKV", "BudgetedMethod", "HeadKV", "LayerPrefill", "Method", "MixKV", "Prefill", "PressSession", "Profile",
    "PyramidKV", "RandomKV", "ScoreWrapper", "SnapKV", "SparseMM", "available_methods", "build_cache",
    "cache_kv_bytes", "capture_prefill", "load_profile", "make_method", "press", "register_base",
    "register_wrapper", "save_profile",
]
