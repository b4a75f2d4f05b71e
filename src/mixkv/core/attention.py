"""Attention under a press: window-query capture at prefill, attention over compressed layers.

The press registers one attention function (``mixkv_<original>``) in transformers'
``AttentionInterface`` that wraps the model's own choice (sdpa, eager, flash...). It

* hands every call's queries to the press (:meth:`PressSession.capture`), which keeps the last ``W``
  exactly as the model computed them (after its own rotary embedding, M-RoPE included) for the
  layers it will compress; prefill runs the original kernel and stays exact;
* on a compressed layer, runs the original kernel on the dense view when every head has the
  same length, and otherwise attends over per-head lengths (``varlen_attention``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from .cache import CompressedLayer

logger = logging.getLogger("mixkv")


@functools.cache
def _flash_varlen():
    """flash-attn's varlen kernel when installed (CUDA only), else None. Looked up once: a failed
    import is not cached by Python, and retrying it on every attention call cost ~8% of a CPU decode step."""
    try:  # pragma: no cover - needs CUDA and flash-attn
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func
    except Exception:
        return None


def _cpu_flash_with_lse():
    """PyTorch's fused CPU attention that also returns the log-sum-exp (None if this build lacks it)."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _tail_causal_mask(q: int, g: int, length: int, device) -> torch.Tensor:
    """``(G*q, L)``: query ``i`` (last ``q`` tail entries are the new tokens) sees tail ``<= L - q + i``."""
    i = torch.arange(q, device=device).repeat(g)
    return torch.arange(length, device=device)[None, :] <= (length - q + i)[:, None]


def _tail_mask(layer: CompressedLayer, q: int, g: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Additive mask over the dense tail: causal among the ``q`` new tokens, and blind to padding of a
    later padded turn (``layer.tail_valid``); a padding query still sees its own key (no empty row)."""
    lt = layer.keys.shape[2]
    tail_valid = layer.tail_valid
    if q == 1 and tail_valid is None:
        return None
    allowed = _tail_causal_mask(q, g, lt, device)[None, None]  # (1, 1, G*q, L)
    if tail_valid is not None:
        i = torch.arange(q, device=device).repeat(g)
        own = torch.arange(lt, device=device)[None, :] == (lt - q + i)[:, None]
        seen = tail_valid.repeat_interleave(layer.num_heads, dim=0)[:, None, None, :] | own[None, None]
        allowed = allowed & seen  # (S, 1, G*q, L)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, float("-inf"))


def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                    fused: bool | None = None, blind: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` ``(N, 1, M, D)`` over ``k``/``v`` ``(N, 1, L, D)`` with its log-sum-exp.

    ``mask``: additive, broadcastable to ``(N, 1, M, L)``, in ``q``'s dtype. Returns ``out``
    ``(N, M, D)`` and ``lse`` ``(N, M)`` in float32; rows that see no key must be named in
    ``blind`` ``(N, M)`` and get ``lse = -inf``, ``out = 0``. On CPU the fused kernel runs (one
    call for all ``N``); elsewhere, or with ``fused=False``, a float32 reference in plain matmuls.
    """
    if fused is None:
        fused = q.device.type == "cpu" and _cpu_flash_with_lse() is not None
    if fused:
        try:
            out, lse = _cpu_flash_with_lse()(q, k, v, 0.0, False, attn_mask=mask, scale=scaling)
            out, lse = out[:, 0].float(), lse[:, 0].float()
            if blind is not None:  # the kernel reports a fully masked row as lse 0
                lse = lse.masked_fill(blind, float("-inf"))
            return out, lse
        except RuntimeError:  # a torch build whose private kernel rejects these inputs
            pass
    logits = torch.matmul(q[:, 0].float(), k[:, 0].float().transpose(-1, -2)) * scaling
    if mask is not None:
        logits = logits + mask[:, 0].float()
    lse = torch.logsumexp(logits, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.matmul(torch.exp(logits - safe[..., None]), v[:, 0].float())
    return out, lse


def _packed_parts(qs: torch.Tensor, layer: CompressedLayer, scaling: float, fused: bool | None):
    """Per-row ``(out, lse)`` of the packed prompt tokens: one row per chunk of each region, then
    one per segment for the remainder (rows' segments: ``layer.packing.row_seg``)."""
    s, gq, d = qs.shape
    p = layer.packing
    outs, lses = [], []
    for reg in p.regions:
        q = qs.index_select(0, reg.chunk_seg)[:, None]
        k = layer.flat_k[reg.start : reg.end].view(reg.chunks, 1, reg.size, d)
        v = layer.flat_v[reg.start : reg.end].view(reg.chunks, 1, reg.size, d)
        out, lse = attend_with_lse(q, k, v, None, scaling, fused)
        outs.append(out)
        lses.append(lse)
    r = p.rem_seg.shape[0]
    if r:
        mask, blind = layer.remainder_mask(gq, qs.dtype)
        out, lse = attend_with_lse(qs.reshape(1, 1, s * gq, d), layer.flat_k[p.rem_start :][None, None],
                                   layer.flat_v[p.rem_start :][None, None], mask, scaling, fused, blind)
        outs.append(out.view(s, gq, d))
        lses.append(lse.view(s, gq))
    else:
        outs.append(qs.new_zeros(s, gq, d, dtype=torch.float32))
        lses.append(torch.full((s, gq), float("-inf"), device=qs.device))
    return outs, lses


def merge_by_lse(outs: list[torch.Tensor], lses: list[torch.Tensor], row_seg: torch.Tensor, num_segments: int):
    """Merge partial attention results ``(rows, M, D)`` / ``(rows, M)`` into one per segment, exactly.

    Each row is a softmax over a disjoint part of its segment's keys; weighting the rows by
    ``exp(lse - max)`` recovers the softmax over the union (as flash-decoding merges splits).
    Every segment needs one row with a finite ``lse`` (the decoded tail always has one).
    """
    lse = torch.cat(lses)
    out = torch.cat(outs)
    m = torch.full((num_segments, lse.shape[1]), float("-inf"), device=lse.device)
    m = m.scatter_reduce(0, row_seg[:, None].expand_as(lse), lse, reduce="amax")
    w = torch.exp(lse - m.index_select(0, row_seg))
    den = torch.zeros_like(m).index_add_(0, row_seg, w)
    num = torch.zeros(num_segments, *out.shape[1:], device=out.device).index_add_(0, row_seg, out * w[..., None])
    return num / den[..., None]


def varlen_attention(query: torch.Tensor, layer: CompressedLayer, scaling: float,
                     fused: bool | None = None) -> torch.Tensor:
    """Exact attention of ``query`` over a compressed layer whose heads differ in length.

    ``query`` ``(B, Hq, q, D)`` (the new tokens, already appended to the layer's tail). The
    packed prompt part (chunk regions and remainder) and the dense tail of decoded tokens are
    attended separately and merged by their log-sum-exp: nothing is padded, nothing copied per
    step, and the work is proportional to the tokens each head holds.
    Returns ``(B, q, Hq, D)``, the layout transformers' attention functions return.
    """
    b, hq, q, d = query.shape
    h = layer.num_heads
    g = hq // h
    gq = g * q
    s = b * h
    if layer.inline:
        return _inline_attention(query, layer, scaling)
    qs = query.reshape(b, h, gq, d).reshape(s, gq, d)
    lt = layer.keys.shape[2]
    tail_mask = _tail_mask(layer, q, g, query.dtype, query.device)
    out_t, lse_t = attend_with_lse(qs[:, None], layer.keys.reshape(s, 1, lt, d), layer.values.reshape(s, 1, lt, d),
                                   tail_mask, scaling, fused)
    if layer.is_flat:
        outs, lses = _packed_parts(qs, layer, scaling, fused)
        out = merge_by_lse([*outs, out_t], [*lses, lse_t], layer.packing.row_seg, s)
    else:
        out = out_t
    return out.view(b, h, g, q, d).reshape(b, hq, q, d).transpose(1, 2).to(query.dtype).contiguous()


def _inline_attention(query: torch.Tensor, layer: CompressedLayer, scaling: float) -> torch.Tensor:
    """A small layer that packs its decoded tokens too: one attention call with a segment mask.

    Each query row sees the packed tokens of its own (sequence, head) segment; the last ``q`` tokens
    of every segment are this call's new tokens, causal among themselves.
    """
    b, hq, q, d = query.shape
    h = layer.num_heads
    g = hq // h
    s = b * h
    allowed = layer.inline_rows(g * q)[:, None] == layer.col_seg[None, :]
    if q > 1:  # new tokens (segment-major, then position) are causal among themselves
        new = s * q
        later = torch.arange(q, device=query.device).repeat(s)[None, :] > torch.arange(q, device=query.device).repeat(
            s * g)[:, None]
        allowed[:, -new:] &= ~later
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(1, 1, s * g * q, d), layer.flat_k[None, None], layer.flat_v[None, None],
        attn_mask=allowed[None, None], scale=scaling)
    return out.view(b, h, g, q, d).reshape(b, hq, q, d).transpose(1, 2).contiguous()


def flash_varlen_attention(query: torch.Tensor, layer: CompressedLayer, scaling: float):  # pragma: no cover
    """CUDA fast path for single-token decoding: flash-attn varlen over each packed region (every
    segment's part of a region is contiguous, as ``cu_seqlens`` describes), merged by log-sum-exp
    with the dense tail. Returns None when not usable. Not run on this project's CPU machines.
    """
    fn = _flash_varlen()
    if fn is None or not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or query.shape[2] != 1 \
            or layer.inline:
        return None
    b, hq, _, d = query.shape
    h = layer.num_heads
    g = hq // h
    s = b * h
    p = layer.packing
    qs = query.reshape(b, h, g, d).reshape(s, g, d)
    cu_q = torch.arange(s + 1, device=query.device, dtype=torch.int32)
    spans = [(r.start, r.end, r.cu, r.max_len) for r in p.regions]
    spans.append((p.rem_start, layer.flat_k.shape[0], p.rem_cu, p.rem_max))
    outs, lses = [], []
    for start, end, cu, max_len in spans:
        if max_len == 0:
            continue
        out, lse, _ = fn(qs, layer.flat_k[start:end, None], layer.flat_v[start:end, None], cu_q, cu.to(torch.int32),
                         1, max_len, softmax_scale=scaling, causal=False, return_attn_probs=True)
        lse = lse.view(g, s).transpose(0, 1).float()  # flash-attn 2.x varlen: (heads, total_q)
        empty = (cu[1:] == cu[:-1])[:, None]
        outs.append(out.float())
        lses.append(lse.masked_fill(empty, float("-inf")))
    out_t, lse_t = attend_with_lse(qs[:, None], layer.keys.reshape(s, 1, -1, d), layer.values.reshape(s, 1, -1, d),
                                   None, scaling)
    rows = torch.arange(s, device=query.device).repeat(len(outs) + 1)
    out = merge_by_lse([*outs, out_t], [*lses, lse_t], rows, s)
    return out.view(b, hq, 1, d).transpose(1, 2).to(query.dtype).contiguous()


def held_attention_weights(query: torch.Tensor, layer: CompressedLayer, scaling: float) -> torch.Tensor:
    """``output_attentions`` over a compressed layer: ``(B, Hq, q, L)`` softmax weights over the tokens
    each head holds, right-aligned as :meth:`CompressedLayer.held_view` lays them out (the new tokens
    last; slots a head does not hold, and padding, get 0). Built only when asked for: it copies the layer.
    """
    keys, _, valid = layer.held_view()
    b, hq, q, _ = query.shape
    g = hq // layer.num_heads
    n = keys.shape[2]
    logits = torch.matmul(query.float(), keys.float().repeat_interleave(g, dim=1).transpose(-1, -2)) * scaling
    seen = torch.arange(n, device=query.device)[None, :] <= (n - q + torch.arange(q, device=query.device))[:, None]
    seen = seen[None, None]
    if valid is not None:
        valid = valid[:, None] if valid.dim() == 2 else valid.repeat_interleave(g, dim=1)  # (B, 1 or Hq, L)
        seen = seen & valid[:, :, None, :]
    probs = torch.softmax(logits.masked_fill(~seen, float("-inf")), dim=-1)
    return torch.nan_to_num(probs, nan=0.0).to(query.dtype)  # a padding query sees nothing


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
        session.capture(module, query, scaling)
        if isinstance(layer, CompressedLayer):
            if not layer.is_flat and query.shape[2] == 1 and layer.tail_valid is None:
                # Uniform lengths: the stored tokens are a plain dense cache; the logical-length mask
                # transformers built no longer lines up, and a single query needs none.
                announce(f"dense:{getattr(original, '__name__', 'original')}")
                return original(module, query, key, value, None, scaling=scaling, dropout=dropout, **kwargs)
            # Eager attention returns its weights; under a press they are over the tokens each head holds.
            weights = held_attention_weights(query, layer, scaling) if session.want_attentions and session.eager \
                else None
            out = flash_varlen_attention(query, layer, scaling) if layer.is_flat else None
            if out is not None:  # pragma: no cover - CUDA only
                announce("flash_attn_varlen")
                return out, weights
            kind = "dense" if not layer.is_flat else ("inline" if layer.inline else "regions")
            announce(f"torch_varlen:{kind}")
            return varlen_attention(query, layer, scaling), weights
        return original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    return mixkv_attention
