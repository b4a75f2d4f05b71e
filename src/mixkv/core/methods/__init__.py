"""Compression methods: one small dataclass per method; MixKV wraps any base.

The interface every method satisfies is :class:`~mixkv.core.methods.base.Method`.
"""

from .adakv import AdaKV
from .base import Allocation, BudgetedMethod, Method, ScoreWrapper
from .headkv import HeadKV
from .mixkv import MixKV, MixKVModality
from .pyramidkv import PyramidKV, PyramidKVAuthors
from .random import RandomKV
from .snapkv import SnapKV
from .sparsemm import SparseMM

__all__ = ["AdaKV", "Allocation", "BudgetedMethod", "HeadKV", "Method", "MixKV", "MixKVModality",
           "PyramidKV", "PyramidKVAuthors", "RandomKV", "ScoreWrapper", "SnapKV", "SparseMM"]
