"""Measuring one prompt (model plumbing): exact prefill, greedy decode, and the decode steps' own queries.

What is measured is described in :mod:`mixkv.lab.calibration`; the maths is in :mod:`.maths`. Named
``measuring`` rather than ``measure`` so the module never shadows the :func:`measure` function that the
package re-exports.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ...core import scores
from ...core.capture import build_cache, capture_prefill
from ..run import greedy_decode
from .maths import counted_steps, region_argmax_hits, retrieval_reasoning_hits
from .sample import CalibrationSample


@dataclass
class Measurement:
    key_redundancy: torch.Tensor  # (L, H)
    value_redundancy: torch.Tensor  # (L, H)
    hits: torch.Tensor | None = None  # (L, H) summed over counted steps; None without an answer region
    steps: int = 0
    tokens: list[int] = field(default_factory=list)
    retrieval: torch.Tensor | None = None  # (L, H) HeadKV-R2 mass summed over counted steps (with ``hits``)


def extend_inputs(inputs: dict, tokens: Sequence[int]) -> dict:
    """``inputs`` with ``tokens`` appended (ids; 1 in the attention mask; 0 in other per-token maps)."""
    ids = inputs["input_ids"]
    if not tokens:
        return dict(inputs)
    new = torch.tensor([list(tokens)], dtype=ids.dtype, device=ids.device)
    out = dict(inputs)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == ids.shape:
            fill = new if key == "input_ids" else (torch.ones_like(new) if key == "attention_mask"
                                                   else torch.zeros_like(new))
            out[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
    return out


@torch.no_grad()
def measure(model, sample: CalibrationSample, decode: Callable[[list[int]], str] | None = None,
            max_new_tokens: int = 16, eos_token_ids: set[int] | None = None, hits_on: str = "answer") -> Measurement:
    """Redundancies of one prompt and, with an answer region, its SparseMM hits and HeadKV-R2 retrieval mass
    (what they mean: :mod:`mixkv.lab.calibration`).

    ``decode`` turns token ids into text (needed to match decoded tokens to ``answer_text`` when
    ``hits_on="answer"``); ``hits_on="all"`` counts every decoded step.
    """
    if hits_on not in ("answer", "all"):
        raise ValueError(f"hits_on must be 'answer' or 'all', got {hits_on!r}")
    inputs = sample.inputs
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("calibration samples are single prompts (batch 1)")
    n = sample.length
    pre = capture_prefill(model, inputs, window=1)
    key_r = torch.stack([scores.redundancy(c.keys, c.valid)[0] for c in pre.layers]).cpu()
    value_r = torch.stack([scores.redundancy(c.values, c.valid)[0] for c in pre.layers]).cpu()
    if sample.answer_mask is None:
        return Measurement(key_r, value_r)
    valid = pre.layers[0].valid
    device = pre.layers[0].keys.device
    region = sample.region_mask
    if region is None:
        region = pre.image_mask[0] if pre.image_mask is not None else torch.ones(n, dtype=torch.bool)
    region = region.to(device).bool()
    if valid is not None:
        region = region & valid[0]
    if tuple(sample.answer_mask.shape) != (n,) or tuple(region.shape) != (n,):
        raise ValueError(f"answer/region masks must have shape ({n},), got {tuple(sample.answer_mask.shape)} "
                         f"and {tuple(region.shape)}")
    answer = sample.answer_mask.to(device).bool() & region
    if not bool(answer.any()):
        warnings.warn(f"calibration sample {sample.name!r}: the answer region holds no region token; "
                      "it counts for the redundancies only", stacklevel=2)
        return Measurement(key_r, value_r)
    cache, _, _ = build_cache(pre, None, None)
    tokens = greedy_decode(model, cache, int(pre.logits[0].argmax()), max_new_tokens, eos_token_ids)
    del cache
    if hits_on == "all" or sample.answer_text is None:
        counts = [True] * len(tokens)
    else:
        if decode is None:
            raise ValueError("hits_on='answer' needs decode= to read the generated tokens")
        counts = counted_steps([decode([t]) for t in tokens], sample.answer_text)
    hits = torch.zeros_like(key_r)
    retrieval = torch.zeros_like(key_r)
    if not any(counts):
        return Measurement(key_r, value_r, hits, 0, tokens, retrieval)
    last = max(i for i, c in enumerate(counts) if c)
    if last > 0:  # queries of steps 1..last: exact prefill of prompt + generated tokens
        del pre
        pre = capture_prefill(model, extend_inputs(inputs, tokens[:last]), window=last + 1)
    steps = torch.tensor([counts[: last + 1]], device=device)
    total = n + last  # prompt + generated tokens fed back
    answer_all = torch.cat([answer, answer.new_zeros(last)])
    for layer, cap in enumerate(pre.layers):
        q = cap.queries[:, :, -(last + 1):]
        hits[layer] = region_argmax_hits(q, cap.keys[:, :, :n], region[None], answer[None], steps)[0].cpu()
        stored = cap.keys.shape[2]  # a sliding-window layer stores only the last tokens
        retrieval[layer] = retrieval_reasoning_hits(q, cap.keys, answer_all[total - stored:][None], cap.scaling,
                                                    steps, cap.valid)[0].cpu()
    return Measurement(key_r, value_r, hits, int(sum(counts)), tokens, retrieval)
