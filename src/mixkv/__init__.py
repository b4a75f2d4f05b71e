"""mixkv: KV-cache compression for Hugging Face VLMs and LLMs (MixKV and its base methods).

The package has six subpackages; imports point one way, and :mod:`mixkv.core` imports none of the
others:

* :mod:`mixkv.core`: the compression itself (scores, budgets, methods, cache, attention, press);
  the classes and functions exported here come from it;
* :mod:`mixkv.lab`: experiments on top of the core (evaluation, benchmarks, calibration, analysis,
  the kvpress comparison, figures and tables); uses the core and the testbeds;
* :mod:`mixkv.testbeds`: models and data for the lab, offline (SmolLM2 from a PyPI wheel, the
  generated text suite, the toy VLMs); imports no other subpackage;
* :mod:`mixkv.cli`: the ``mixkv`` command, argument parsing and early checks; uses the core,
  the lab, the testbeds and serving;
* :mod:`mixkv.integrations`: plugins of other programs (vLLM, lmms-eval), each run in that program's
  own environment; use the core and the testbeds, never the lab or the command line;
* :mod:`mixkv.serving`: serving maths without torch (model shapes, requests per KV pool); uses only
  the core.

``tests/test_layout.py`` checks what each must not import. The method spec is ``docs/method.md``.
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
    MixKVModality,
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
    "AdaKV", "BudgetedMethod", "HeadKV", "LayerPrefill", "Method", "MixKV", "MixKVModality", "Prefill",
    "PressSession", "Profile", "PyramidKV", "RandomKV", "ScoreWrapper", "SnapKV", "SparseMM", "available_methods",
    "build_cache", "cache_kv_bytes", "capture_prefill", "load_profile", "make_method", "press", "register_base",
    "register_wrapper", "save_profile",
]
