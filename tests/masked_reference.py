"""A dense reference for decoding on a compressed cache: the uncompressed model whose
attention masks out exactly the evicted positions (per layer, sequence and KV head) for
queries after the prompt. If the press decodes with wrong positions (shortened cache length)
or kept the wrong tokens, its logits differ from this reference.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from mixkv.core.models import inspect_model


def _masked_eager(state):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, hq, q, d = query.shape
        h = key.shape[1]
        g = hq // h
        n_kv = key.shape[2]
        scaling = scaling if scaling is not None else d**-0.5
        kk = key.repeat_interleave(g, dim=1).float()
        vv = value.repeat_interleave(g, dim=1).float()
        logits = torch.matmul(query.float(), kk.transpose(-1, -2)) * scaling  # (B, Hq, q, kv)
        q_pos = torch.arange(n_kv - q, n_kv)
        k_pos = torch.arange(n_kv)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None].expand(b, hq, q, n_kv).clone()
        if state["valid"] is not None:
            allowed &= state["valid"][:, None, None, :n_kv]
        plan = state["plans"].get(module.layer_idx)
        n = state["prompt_length"]
        if plan is not None:
            kept = torch.zeros(b, h, n_kv, dtype=torch.bool)
            kept[:, :, n:] = True
            valid_idx = plan.valid()
            for bi in range(b):
                for hi in range(h):
                    kept[bi, hi, plan.indices[bi, hi][valid_idx[bi, hi]]] = True
            kept_q = kept.repeat_interleave(g, dim=1)  # (B, Hq, kv)
            after_prompt = (q_pos >= n)[None, None, :, None]
            allowed &= ~after_prompt | kept_q[:, :, None, :]
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        probs = torch.nan_to_num(probs)
        out = torch.matmul(probs, vv).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None

    return attention


@contextmanager
def masked_reference(model, plans: dict, prompt_length: int, valid: torch.Tensor | None = None):
    """Run ``model`` with the per-head eviction masks of ``plans`` (from ``press(record=True)``)."""
    info = inspect_model(model)
    state = {"plans": plans, "prompt_length": prompt_length, "valid": valid}
    name = "mixkv_test_masked_reference"
    AttentionInterface.register(name, _masked_eager(state))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    saved = info.text_config._attn_implementation
    info.text_config._attn_implementation = name
    try:
        yield state
    finally:
        info.text_config._attn_implementation = saved
        AttentionInterface._global_mapping.pop(name, None)  # leave the registries as we found them
        AttentionMaskInterface._global_mapping.pop(name, None)


def _history_eager(allowed_by_layer: dict, captured: dict | None):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if captured is not None:
            captured[module.layer_idx] = (query.detach(), key.detach(), value.detach(), scaling)
        b, hq, q, d = query.shape
        h = key.shape[1]
        g = hq // h
        scaling = scaling if scaling is not None else d**-0.5
        kk = key.repeat_interleave(g, dim=1).float()
        vv = value.repeat_interleave(g, dim=1).float()
        logits = torch.matmul(query.float(), kk.transpose(-1, -2)) * scaling  # (B, Hq, q, N)
        allowed = allowed_by_layer[module.layer_idx].repeat_interleave(g, dim=1)  # (B, Hq, N, N)
        logits = logits.masked_fill(~allowed[:, :, -q:, : key.shape[2]], float("-inf"))
        probs = torch.nan_to_num(torch.softmax(logits, dim=-1))
        out = torch.matmul(probs, vv).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None

    return attention


@contextmanager
def history_reference(model, allowed_by_layer: dict, captured: dict | None = None):
    """Run ``model`` uncompressed where query row ``r`` of layer ``l``, KV head ``h`` sees exactly the keys
    ``allowed_by_layer[l][b, h, r]`` (``(B, H, N, N)`` bool): what the press held when it ran that row.
    ``captured`` receives each layer's ``(query, key, value, scaling)`` (after RoPE)."""
    info = inspect_model(model)
    name = "mixkv_test_history_reference"
    AttentionInterface.register(name, _history_eager(allowed_by_layer, captured))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    saved = info.text_config._attn_implementation
    info.text_config._attn_implementation = name
    try:
        yield
    finally:
        info.text_config._attn_implementation = saved
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)
