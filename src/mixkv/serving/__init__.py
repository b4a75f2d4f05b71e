"""Serving with compressed caches: what freed KV is worth as concurrent requests.

* :mod:`mixkv.serving.shapes`: the numbers of a model that size its KV cache (named public
  shapes kept in ``named_shapes/``, or any Hugging Face ``config.json``);
* :mod:`mixkv.serving.capacity`: KV bytes per request and requests that fit a KV pool, full
  cache vs each method, for transformers and for paged serving.

Pure functions over integers (no torch, no model); uses only :mod:`mixkv.core`'s defaults.
The design of serving compressed caches is ``docs/serving.md``.
"""

from .capacity import Layout, Plan, Pool, Row, Workload, budget_kind, plan, plan_row, pyramid_kept
from .shapes import ModelShape, load_named, named_shapes, resolve_shape, shape_from_config

__all__ = ["Layout", "ModelShape", "Plan", "Pool", "Row", "Workload", "budget_kind", "load_named", "named_shapes",
           "plan", "plan_row", "pyramid_kept", "resolve_shape", "shape_from_config"]
