"""Why a compressed cache still trails the full one: which answer tokens each method kept, and whether
the misses are explained by them.

Pure functions over kept plans and evaluation records. A toy-VLM sample knows the prompt positions of
the visual tokens that show its answer (``EvalItem.meta["answer_positions"]``); for every run we record,
per (layer, KV head), the share of those positions the head kept. The summary then splits each
method's failures into *dropped* (some answer token survives in fewer than half of the heads) and
*kept but wrong* (every answer token is in at least half of the heads, yet the reply is wrong).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from ..core.models import inspect_model
from ..core.selection import KeepPlan

DROPPED_BELOW = 0.5  # an answer token held by fewer than this share of (layer, head) caches counts as dropped


def answer_kept(plans: dict[int, KeepPlan], num_layers: int, num_heads: int,
                positions: Sequence[int]) -> torch.Tensor:
    """``(layers, heads, len(positions))`` bool: did each KV head of each layer keep each answer position?

    A layer without a plan was not compressed and keeps everything (the full cache has no plans).
    Only the first sequence of a plan is read (evaluation decodes one prompt at a time).
    """
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    out = torch.ones(num_layers, num_heads, pos.numel(), dtype=torch.bool)
    for layer, plan in plans.items():
        idx, lengths = plan.indices[0].cpu(), plan.lengths[0].cpu()
        if idx.shape[0] != num_heads:
            raise ValueError(f"layer {layer}: plan has {idx.shape[0]} heads, expected {num_heads}")
        valid = torch.arange(idx.shape[-1])[None, :] < lengths[:, None]  # (H, L)
        hit = (idx[:, :, None] == pos[None, None, :]) & valid[:, :, None]
        out[layer] = hit.any(1)
    return out


def kept_record(kept: torch.Tensor) -> dict:
    """What one run's evaluation record keeps of :func:`answer_kept`'s tensor.

    ``answer_kept``: mean share over (layer, head, answer token); ``answer_kept_min``: the share of
    (layer, head) caches holding the least-kept answer token (a code is lost if any glyph is);
    ``answer_kept_heads``: per (layer, head) share over answer tokens, row-major, for the heat maps.
    """
    if kept.shape[-1] == 0:
        return {"answer_kept": 1.0, "answer_kept_min": 1.0, "answer_kept_heads": []}
    f = kept.float()
    return {
        "answer_kept": round(float(f.mean()), 4),
        "answer_kept_min": round(float(f.mean((0, 1)).min()), 4),
        "answer_kept_heads": [round(float(x), 3) for x in f.mean(-1).flatten()],
    }


def _key(r: dict) -> tuple[str, int | None]:
    return r["method"], r["budget"]


def gap_summary(samples: Sequence[dict]) -> list[dict]:
    """Per (method, budget): accuracy, answer tokens kept and the split of failures.

    Rows: ``method, budget, n, accuracy, answer_kept`` (mean share), ``failures``, ``dropped`` and
    ``kept_but_wrong`` (failures by :data:`DROPPED_BELOW`), ``accuracy_when_kept`` (accuracy over the
    samples whose least-kept answer token is held by at least that share). Records without
    ``answer_kept`` are skipped.
    """
    groups: dict[tuple[str, int | None], list[dict]] = defaultdict(list)
    for r in samples:
        if "answer_kept" in r:
            groups[_key(r)].append(r)
    rows = []
    for (method, budget), rs in groups.items():
        fails = [r for r in rs if r["score"] < 1]
        dropped = [r for r in fails if r["answer_kept_min"] < DROPPED_BELOW]
        kept = [r for r in rs if r["answer_kept_min"] >= DROPPED_BELOW]
        rows.append({
            "method": method, "budget": budget, "n": len(rs),
            "accuracy": sum(r["score"] for r in rs) / len(rs),
            "answer_kept": sum(r["answer_kept"] for r in rs) / len(rs),
            "failures": len(fails), "dropped": len(dropped), "kept_but_wrong": len(fails) - len(dropped),
            "accuracy_when_kept": sum(r["score"] for r in kept) / len(kept) if kept else None,
        })
    return rows


def heads_map(samples: Sequence[dict], method: str, budget: int | None, num_layers: int,
              task: str | None = None) -> torch.Tensor:
    """``(layers, heads)``: mean share of answer tokens each head kept, over one configuration's records."""
    rows = [r["answer_kept_heads"] for r in samples
            if _key(r) == (method, budget) and r.get("answer_kept_heads") and (task is None or r["task"] == task)]
    if not rows:
        raise ValueError(f"no answer-kept records for {method}@{budget}" + (f" on {task}" if task else ""))
    t = torch.tensor(rows, dtype=torch.float32).mean(0)
    return t.reshape(num_layers, -1)


def gap_closed(results: Sequence[dict], base: str, budget: int, task: str = "mean") -> float | None:
    """Share of ``base``'s gap to the full cache that ``base+mixkv`` closes at ``budget`` (None if no gap)."""
    acc = {(r["method"], r["budget"]): r["accuracy"] for r in results if r["task"] == task}
    full, b, m = acc.get(("full", None)), acc.get((base, budget)), acc.get((f"{base}+mixkv", budget))
    if full is None or b is None or m is None or full - b <= 0:
        return None
    return (m - b) / (full - b)


def answer_observer(model):
    """``observe`` for :func:`mixkv.lab.evaluation.evaluate`: :func:`kept_record` of each run's plans on
    the item's ``meta["answer_positions"]``."""
    info = inspect_model(model)

    def observe(item, run) -> dict:
        return kept_record(answer_kept(run.plans, info.num_layers, info.num_kv_heads, item.meta["answer_positions"]))

    return observe


def gap_payload(samples: list[dict], num_layers: int) -> dict:
    """What a results file keeps: summary rows and per-(method, budget) head maps (``"method@budget"``).

    The per-run head lists are dropped from ``samples`` (in place): the maps hold what the figures need.
    """
    summary = gap_summary(samples)
    heads = {f"{r['method']}@{r['budget']}": heads_map(samples, r["method"], r["budget"], num_layers).tolist()
             for r in summary if r["budget"] is not None}
    for s in samples:
        s.pop("answer_kept_heads", None)
    return {"summary": summary, "heads": heads,
            "note": f"answer_kept: share of (layer, KV head, answer token) kept; dropped: a failure whose least-kept "
                    f"answer token is held by < {DROPPED_BELOW:.0%} of the (layer, head) caches"}
