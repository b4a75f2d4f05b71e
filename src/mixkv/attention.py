"""Attention under a press: window-query capture at prefill, attention over compressed layers.

The press registers one attention function (``mixkv_<original>``) in transformers'
``AttentionInterface`` that wraps the model's own choice (sdpa, eager, flash...). It

* at prefill, stores the last ``W`` queries exactly as the model computed them (after its own
  rotary embedding, M-RoPE included) and then runs the original kernel: prefill stays exact;
* on a compressed layer, runs the original kernel on the dense view when every head has the
  same length, and otherwise attends over per-head lengths (``varlen_attention``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .cache import CompressedLayer

logger = logging.getLogger("mixkv")


def _flash_varlen():
    """flash-attn's varlen kernel when installed (CUDA only), else None."""
    try:  # pragma: no cover - needs CUDA and flash-attn
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func
    except Exception:
        return None


def _tail_causal_mask(q: int, g: int, length: int, device) -> torch.Tensor:
    """``(G*q, L)``: query ``i`` (last ``q`` tail entries are the new tokens) sees tail ``<= L - q + i``."""
    i = torch.arange(q, device=device).repeat(g)
    return torch.arange(length, device=device)[None, :] <= (length - q + i)[:, None]


def varlen_attention(query: torch.Tensor, layer: CompressedLayer, scaling: float) -> torch.Tensor:
    """Exact attention of ``query`` over a compressed layer whose heads differ in length.

    ``query`` ``(B, Hq, q, D)`` (the new tokens, already appended to the layer's tail).
    Pure PyTorch, runs on CPU and CUDA. The packed part is scored with one matmul against
    all query groups and each token keeps its own group's column; softmax statistics are
    merged with the dense tail's, so nothing is padded and nothing is copied per step.
    Returns ``(B, q, Hq, D)``, the layout transformers' attention functions return.
    """
    b, hq, q, d = query.shape
    h = layer.num_heads
    g = hq // h
    gq = g * q
    qg = query.reshape(b, h, gq, d)
    tk, tv = layer.keys, layer.values
    lt = tk.shape[2]
    logits_tail = torch.matmul(qg, tk.transpose(-1, -2)).float() * scaling  # (B, H, Gq, Lt)
    if q > 1:
        logits_tail = logits_tail.masked_fill(~_tail_causal_mask(q, g, lt, query.device), float("-inf"))
    m = logits_tail.amax(dim=-1) if lt > 0 else torch.full((b, h, gq), float("-inf"), device=query.device)

    if layer.is_flat:
        s = b * h
        seg = layer.seg_ids.long()
        t = seg.shape[0]
        logits_all = torch.matmul(layer.flat_k, qg.reshape(s * gq, d).transpose(0, 1))  # (T, S*Gq)
        own = logits_all.view(t, s, gq).gather(1, seg.view(t, 1, 1).expand(t, 1, gq)).squeeze(1)
        own = own.float() * scaling  # (T, Gq)
        m_flat = torch.full((s, gq), float("-inf"), device=query.device)
        m_flat = m_flat.scatter_reduce(0, seg.view(t, 1).expand(t, gq), own, reduce="amax", include_self=True)
        m = torch.maximum(m, m_flat.view(b, h, gq))
    safe_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))

    e_tail = torch.exp(logits_tail - safe_m[..., None])
    den = e_tail.sum(dim=-1)  # (B, H, Gq)
    num = torch.matmul(e_tail.to(tv.dtype), tv).float()  # (B, H, Gq, D)

    if layer.is_flat:
        e_flat = torch.exp(own - safe_m.view(s, gq)[seg])  # (T, Gq)
        den = den + torch.zeros(s, gq, device=query.device).index_add_(0, seg, e_flat).view(b, h, gq)
        # Scatter each token's weights into its own group's columns, then one matmul with V.
        spread = torch.zeros(t, s, gq, dtype=layer.flat_v.dtype, device=query.device)
        spread.scatter_(1, seg.view(t, 1, 1).expand(t, 1, gq), e_flat.to(spread.dtype)[:, None, :])
        num = num + torch.matmul(spread.view(t, s * gq).transpose(0, 1), layer.flat_v).float().view(b, h, gq, d)

    out = num / den.clamp_min(1e-30)[..., None]
    return out.view(b, h, g, q, d).reshape(b, hq, q, d).transpose(1, 2).to(query.dtype).contiguous()


def flash_varlen_attention(query: torch.Tensor, layer: CompressedLayer, scaling: float):  # pragma: no cover
    """CUDA fast path for single-token decoding: flash-attn varlen over the packed part, merged
    by log-sum-exp with the dense tail. Each (sequence, KV head) is one varlen "sequence" with
    ``G`` query heads and one KV head, as ``cu_seqlens`` describes. Returns None when not usable.
    """
    fn = _flash_varlen()
    if fn is None or not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or query.shape[2] != 1:
        return None
    b, hq, _, d = query.shape
    h = layer.num_heads
    g = hq // h
    s = b * h
    q_packed = query.reshape(b, h, g, d).reshape(s, g, d)
    cu_q = torch.arange(s + 1, device=query.device, dtype=torch.int32)
    cu_k = layer.seg_offsets.to(torch.int32)
    max_k = int(layer.seg_lengths.max().item())
    out_flat, lse_flat, _ = fn(
        q_packed, layer.flat_k[:, None, :], layer.flat_v[:, None, :], cu_q, cu_k, 1, max_k,
        softmax_scale=scaling, causal=False, return_attn_probs=True,
    )
    # lse_flat: (G, S) for varlen in flash-attn 2.x
    lse_flat = lse_flat.view(g, s).transpose(0, 1).reshape(b, h, g).float()
    out_flat = out_flat.view(b, h, g, d).float()
    qg = query.reshape(b, h, g, d)
    logits = torch.matmul(qg, layer.keys.transpose(-1, -2)).float() * scaling  # (B, H, G, Lt)
    lse_tail = torch.logsumexp(logits, dim=-1)
    out_tail = torch.matmul(torch.softmax(logits, dim=-1).to(layer.values.dtype), layer.values).float()
    lse = torch.logaddexp(lse_flat, lse_tail)
    out = out_flat * torch.exp(lse_flat - lse)[..., None] + out_tail * torch.exp(lse_tail - lse)[..., None]
    return out.view(b, hq, 1, d).transpose(1, 2).to(query.dtype).contiguous()


def make_attention_function(original: Callable, session) -> Callable:
    """The function registered under ``mixkv_<name>``; ``session`` is the active press."""
    announced: set[str] = set()

    def announce(path: str) -> None:
        if path not in announced:
            announced.add(path)
            logger.debug("mixkv decode attention path: %s", path)
            session.attention_paths.add(path)

    def mixkv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = session.layer_for(module)
        if scaling is None:
            scaling = module.scaling if hasattr(module, "scaling") else query.shape[-1] ** -0.5
        if isinstance(layer, CompressedLayer):
            if not layer.is_flat and query.shape[2] == 1:
                # Uniform lengths: the stored tokens are a plain dense cache; the logical-length mask
                # transformers built no longer lines up, and a single query needs none.
                announce(f"dense:{getattr(original, '__name__', 'original')}")
                return original(module, query, key, value, None, scaling=scaling, dropout=dropout, **kwargs)
            out = flash_varlen_attention(query, layer, scaling) if layer.is_flat else None
            if out is not None:  # pragma: no cover - CUDA only
                announce("flash_attn_varlen")
                return out, None
            announce("torch_varlen")
            return varlen_attention(query, layer, scaling), None
        session.capture(module, query, scaling)
        return original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    return mixkv_attention
