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


def _cpu_flash_with_lse():
    """PyTorch's fused CPU attention that also returns the log-sum-exp (None if this build lacks it)."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _packed_attention_fused(qs: torch.Tensor, layer: CompressedLayer, scaling: float):
    """Attention of ``qs`` ``(S, Gq, D)`` over the packed part: one fused kernel call.

    All ``S * Gq`` query rows attend over all ``T`` packed tokens with a block mask that lets
    each row see only its own (sequence, head) segment; the kernel returns the log-sum-exp we
    need to merge with the tail.
    """
    s, gq, d = qs.shape
    t = layer.flat_k.shape[0]
    rows = torch.arange(s, device=qs.device, dtype=layer.seg_ids.dtype).repeat_interleave(gq)
    bias = torch.zeros(s * gq, t, dtype=qs.dtype, device=qs.device)
    bias.masked_fill_(rows[:, None] != layer.seg_ids[None, :], float("-inf"))
    out, lse = _cpu_flash_with_lse()(
        qs.reshape(1, 1, s * gq, d), layer.flat_k[None, None], layer.flat_v[None, None], 0.0, False,
        attn_mask=bias[None, None], scale=scaling,
    )
    return out.view(s, gq, d).float(), lse.view(s, gq).float()


def _packed_attention_scatter(qs: torch.Tensor, layer: CompressedLayer, scaling: float):
    """Portable fallback for the packed part (any device / dtype): segment softmax with scatter ops.

    Scores every token against all query groups in one matmul and keeps its own group's
    columns; per-segment max and sums via scatter/index_add. Returns ``(out, lse)``.
    """
    s, gq, d = qs.shape
    seg = layer.seg_ids.long()
    t = seg.shape[0]
    logits_all = torch.matmul(layer.flat_k, qs.reshape(s * gq, d).transpose(0, 1))  # (T, S*Gq)
    own = logits_all.view(t, s, gq).gather(1, seg.view(t, 1, 1).expand(t, 1, gq)).squeeze(1).float() * scaling
    m = torch.full((s, gq), float("-inf"), device=qs.device)
    m = m.scatter_reduce(0, seg.view(t, 1).expand(t, gq), own, reduce="amax", include_self=True)
    safe_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(own - safe_m[seg])  # (T, Gq)
    den = torch.zeros(s, gq, device=qs.device).index_add_(0, seg, e)
    spread = torch.zeros(t, s, gq, dtype=layer.flat_v.dtype, device=qs.device)
    spread.scatter_(1, seg.view(t, 1, 1).expand(t, 1, gq), e.to(spread.dtype)[:, None, :])
    num = torch.matmul(spread.view(t, s * gq).transpose(0, 1), layer.flat_v).float().view(s, gq, d)
    return num / den.clamp_min(1e-30)[..., None], safe_m + torch.log(den)


def packed_attention(qs: torch.Tensor, layer: CompressedLayer, scaling: float, fused: bool | None = None):
    """``(out, lse)`` of queries ``(S, Gq, D)`` over the packed part; fused kernel on CPU when available."""
    if fused is None:
        fused = qs.device.type == "cpu" and _cpu_flash_with_lse() is not None
    if fused:
        try:
            return _packed_attention_fused(qs, layer, scaling)
        except RuntimeError:  # a torch build whose private kernel rejects these inputs
            pass
    return _packed_attention_scatter(qs, layer, scaling)


def varlen_attention(query: torch.Tensor, layer: CompressedLayer, scaling: float,
                     fused: bool | None = None) -> torch.Tensor:
    """Exact attention of ``query`` over a compressed layer whose heads differ in length.

    ``query`` ``(B, Hq, q, D)`` (the new tokens, already appended to the layer's tail). The
    packed prompt part and the dense tail of decoded tokens are attended separately and merged
    by their log-sum-exp, so nothing is padded and nothing is copied per step.
    Returns ``(B, q, Hq, D)``, the layout transformers' attention functions return.
    """
    b, hq, q, d = query.shape
    h = layer.num_heads
    g = hq // h
    gq = g * q
    qg = query.reshape(b, h, gq, d)
    tk, tv = layer.keys, layer.values
    lt = tk.shape[2]
    logits = torch.matmul(qg, tk.transpose(-1, -2)).float() * scaling  # (B, H, Gq, Lt)
    if q > 1:
        logits = logits.masked_fill(~_tail_causal_mask(q, g, lt, query.device), float("-inf"))
    if lt > 0:
        lse = torch.logsumexp(logits, dim=-1)  # (B, H, Gq)
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        out = torch.matmul(torch.exp(logits - safe[..., None]).to(tv.dtype), tv).float()
    else:
        lse = torch.full((b, h, gq), float("-inf"), device=query.device)
        out = torch.zeros(b, h, gq, d, device=query.device)
    if layer.is_flat:
        out_p, lse_p = packed_attention(qg.reshape(b * h, gq, d), layer, scaling, fused)
        out_p, lse_p = out_p.view(b, h, gq, d), lse_p.view(b, h, gq)
        total = torch.logaddexp(lse, lse_p)
        out = out * torch.exp(lse - total)[..., None] + out_p * torch.exp(lse_p - total)[..., None]
    out = torch.nan_to_num(out)
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
