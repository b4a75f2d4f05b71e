"""Compression methods: one small dataclass per method; MixKV wraps any base."""

from .adakv import AdaKV
from .base import BudgetedMethod, LayerContext
from .mixkv import MixKV
from .pyramidkv import PyramidKV
from .random import RandomKV
from .snapkv import SnapKV
from .sparsemm import SparseMM

__all__ = ["AdaKV", "BudgetedMethod", "LayerContext", "MixKV", "PyramidKV", "RandomKV", "SnapKV", "SparseMM"]
