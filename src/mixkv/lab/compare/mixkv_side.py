"""The mixkv side: every exported prompt under every method, measured as ``run_kvpress.py`` measures kvpress.

One run: reset the peak RSS, one prefill under :func:`mixkv.core.press.press` (``logits_to_keep=1``,
compression included in its time), then greedy decoding of a fixed number of tokens with every step
timed (past EOS too, so every run times as many steps); the answer is the prefix up to the first EOS
within ``max_new_tokens``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ...core.methods import AdaKV, Method
from ...core.press import cache_kv_bytes, press
from ...core.registry import make_method
from ..machine import peak_rss_mib, reset_peak_rss, status_mib
from ..run import greedy_decode
from .budgets import mixkv_budget
from .protocol import ADAKV_AS_KVPRESS, METHODS


def _plans_to_lists(plans: dict) -> list | None:
    """``[layer][kv_head] -> kept positions`` (batch 0), the shape ``run_kvpress.py`` writes."""
    if not plans:
        return None
    out = []
    for idx in sorted(plans):
        plan = plans[idx]
        out.append([plan.indices[0, h, : int(plan.lengths[0, h])].tolist() for h in range(plan.indices.shape[1])])
    return out


def make_compare_method(method_name: str, budget: int | None, settings: dict) -> Method | None:
    """The mixkv method of a row; None (no compression) for ``full`` or a prompt that fits the budget."""
    if budget is None:
        return None
    window, kernel = int(settings.get("window", 32)), int(settings.get("kernel", 5))
    if method_name == ADAKV_AS_KVPRESS:
        return AdaKV(budget=budget, window=window, kernel=kernel, floor=0.0, normalize=False)
    return make_method(method_name, budget=budget, window=window, kernel=kernel)


def _answer(tokens: list[int], max_new: int, eos: set[int]) -> list[int]:
    answer = []
    for t in tokens[:max_new]:
        answer.append(t)
        if t in eos:
            break
    return answer


@torch.no_grad()
def measure_mixkv_one(model, prompt: dict, method_name: str, settings: dict, record_kept: bool = True,
                      steps: int | None = None) -> dict:
    """One prompt under one method with mixkv; the run record has the fields of kvpress's."""
    ids = torch.tensor([prompt["input_ids"]], dtype=torch.long, device=model.device)
    n = ids.shape[1]
    max_new = int(settings.get("max_new_tokens", 10))
    steps = max(max_new, int(settings.get("decode_steps", 16))) if steps is None else steps
    budget = None if method_name == "full" else mixkv_budget(n, settings)
    method = make_compare_method(method_name, budget, settings)

    reset_peak_rss()
    rss_before = status_mib("VmRSS")
    times: list[float] = []
    with press(model, method, record=record_kept) as session:
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - start
        cache = out.cache
        nbytes = cache_kv_bytes(cache)
        num_layers = len(cache.layers)
        compress_s = session.stats.compress_seconds if session is not None else 0.0
        kept = _plans_to_lists(session.plans) if session is not None and record_kept else None
        kept_per_layer = ({int(i): v[0].tolist() for i, v in session.stats.kept_per_layer.items()}
                          if session is not None else {})
        # no EOS stop: every run times the same number of steps; the answer is cut at EOS below
        tokens = greedy_decode(model, cache, int(out.logits[0, -1].argmax()), steps, None, times)
    peak = peak_rss_mib()
    return {
        "prompt_id": prompt["id"], "context": prompt["context"], "task": prompt["task"], "method": method_name,
        "impl": "mixkv", "prompt_tokens": n, "budget": budget,
        "kept_per_head": budget if budget is not None else n,
        "prefill_s": prefill_s, "compress_s": compress_s,
        "decode_step_ms": [1000 * t for t in times],
        "decode_ms_per_token": 1000 * statistics.median(times) if times else None,
        "kv_bytes": nbytes, "kv_bytes_unmasked": nbytes,
        "num_layers": num_layers,
        "kept_counts": [kept_per_layer[i] for i in sorted(kept_per_layer)] or None,
        "rss_before_mib": rss_before, "peak_rss_mib": peak,
        "tokens": _answer(tokens, max_new, set(settings.get("eos_token_ids") or [])), "decode_tokens": tokens,
        "kept": kept,
    }


def measure_mixkv(model, tokenizer, spec: dict, progress: Callable[[str], None] | None = print) -> list[dict]:
    """All prompts x methods of an exported prompts file; the first prompt (cut to 512 tokens) warms up.

    The warm-up keeps first-call costs (allocator, kernels) out of the numbers, as on the kvpress side.
    """
    settings, prompts = spec["settings"], spec["prompts"]
    methods = list(settings.get("methods", METHODS)) + list(settings.get("mixkv_only_methods", []))
    record = bool(settings.get("record_kept", True))
    if settings.get("warmup", True) and prompts:
        short = dict(prompts[0], input_ids=prompts[0]["input_ids"][:512])
        warm = dict(settings, budget=2 * int(settings.get("window", 32)), compression_ratio=None)
        for name in methods:
            measure_mixkv_one(model, short, name, warm, record_kept=False, steps=3)
    runs = []
    for i, prompt in enumerate(prompts):
        for name in methods:
            r = measure_mixkv_one(model, prompt, name, settings, record)
            r["text"] = tokenizer.decode(r["tokens"], skip_special_tokens=True).strip()
            runs.append(r)
            if progress is not None:
                decode = "-" if r["decode_ms_per_token"] is None else f"{r['decode_ms_per_token']:.1f}"
                progress(f"[mixkv] {i + 1}/{len(prompts)} {prompt['id']} {name}: N={r['prompt_tokens']} "
                         f"prefill {r['prefill_s']:.2f} s, decode {decode} ms/tok, "
                         f"KV {r['kv_bytes'] / 2**20:.2f} MiB, answer {r['text'][:20]!r}")
    return runs
