"""Which tokens each KV head keeps: mixkv's own scoring and selection, called on one request's layer.

This is the only place the plugin touches the method, and it goes through the same
:class:`~mixkv.core.layer.LayerPrefill` record and :func:`~mixkv.core.selection.plan_layer` that
``mixkv.press`` uses, so the engine and the library cannot drift apart.
"""

from __future__ import annotations

import torch

from mixkv.core.layer import LayerPrefill
from mixkv.core.methods.base import Method
from mixkv.core.selection import plan_layer


def kept_plan(method: Method, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
              layer_idx: int, num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions of one request's layer for any allocation: ``(H, n_max)`` ascending (filler past each
    head's length) and the lengths ``(H,)``. Arguments as for :func:`kept_positions`."""
    record = LayerPrefill(
        layer_idx=layer_idx, num_layers=num_layers,
        queries=queries[None].float(), keys=keys[None].float(), values=values[None].float(),
        scaling=scaling, window=method.window, kernel=method.kernel,
    )
    plan = plan_layer(method, record)
    if plan is None:
        budget = int(method.budget_per_sequence(record)[0])
        raise RuntimeError(f"a prompt of {keys.shape[1]} tokens fits the budget ({budget}) and is not compressed; "
                           "the plugin's compression rule should not have chosen it")
    return plan.indices[0], plan.lengths[0]


def kept_positions(method: Method, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   scaling: float, layer_idx: int, num_layers: int) -> torch.Tensor:
    """Ascending kept positions ``(H, budget)`` of one request's layer.

    ``queries`` ``(Hq, W, D)``: the layer's last ``W`` prompt queries as the engine computed them
    (after RoPE); ``keys`` / ``values`` ``(H, N, D)``: the prompt's cache. Scoring runs in float32,
    whatever the cache dtype, as the press does for half-precision models.
    """
    record = LayerPrefill(
        layer_idx=layer_idx, num_layers=num_layers,
        queries=queries[None].float(), keys=keys[None].float(), values=values[None].float(),
        scaling=scaling, window=method.window, kernel=method.kernel,
    )
    plan = plan_layer(method, record)
    budget = int(method.budget_per_sequence(record)[0])
    if plan is None:
        raise RuntimeError(f"a prompt of {keys.shape[1]} tokens fits the budget ({budget}) and is not compressed; "
                           "the plugin's compression rule should not have chosen it")
    lengths = plan.lengths[0]
    if not bool((lengths == budget).all()):
        raise RuntimeError(f"{method.name} kept {lengths.tolist()} tokens per head in layer {layer_idx}; the vLLM "
                           f"plugin needs exactly the budget ({budget}) in every head")
    return plan.indices[0]
