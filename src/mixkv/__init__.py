"""mixkv: KV-cache compression for Hugging Face VLMs and LLMs (MixKV and its base methods)."""

from ._versions import check_versions

check_versions()

from .methods import AdaKV, MixKV, PyramidKV, RandomKV, SnapKV, SparseMM  # noqa: E402
from .press import PressSession, cache_kv_bytes, press  # noqa: E402
from .profiles import Profile, load_profile, save_profile  # noqa: E402
from .registry import available_methods, make_method  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "AdaKV", "MixKV", "PressSession", "Profile", "PyramidKV", "RandomKV", "SnapKV", "SparseMM",
    "available_methods", "cache_kv_bytes", "load_profile", "make_method", "press", "save_profile",
]
