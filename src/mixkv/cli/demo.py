"""``mixkv demo``: the main job. Load a real model offline, answer long prompts with the full
cache and with compressed caches, print answers / memory / time, and draw what was kept."""

from __future__ import annotations

import time
from pathlib import Path

from .. import report
from ..prefill import build_cache, greedy_decode, shared_prefill
from ..press import cache_kv_bytes, press
from ..registry import make_method
from ..testbeds import tasks as task_suite
from .common import load, machine_description, parse_list, setup_threads


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="answer generated long prompts with full and compressed caches")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="full,snapkv,snapkv+mixkv,adakv,adakv+mixkv")
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--tasks", default="passkey,kv_retrieval,redundant")
    p.add_argument("--length", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="out/demo.png", help="PNG of the kept tokens")
    p.set_defaults(run=run)


def _answer_positions(tokenizer, text: str, needle: str) -> list[int]:
    """Token positions of the first occurrence of ``needle`` in the prompt text (for the picture)."""
    at = text.find(needle)
    if at < 0:
        return []
    try:
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    except (NotImplementedError, TypeError, ValueError):
        return []
    end = at + len(needle)
    return [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < end and e > at]


def run(args) -> int:
    setup_threads(args.threads)
    methods = parse_list(args.methods)
    for name in methods:  # fail before loading anything
        make_method(name, budget=args.budget, window=args.window)
    t0 = time.perf_counter()
    model, tokenizer = load(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s on {machine_description()}")
    samples = task_suite.make_suite(task_suite.validate_tasks(parse_list(args.tasks)), 1, args.seed,
                                    args.length, tokenizer)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    rows, picture = [], None
    for sample in samples:
        text = task_suite.build_prompt(tokenizer, sample)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        pre = shared_prefill(model, dict(enc), window=args.window)
        print(f"\n[{sample.task}] {pre.prompt_length} prompt tokens, prefill {pre.seconds:.1f} s; "
              f"expected answer: {sample.answer}")
        full_bytes = None
        kept = {}
        for name in methods:
            method = make_method(name, budget=args.budget, window=args.window)
            start = time.perf_counter()
            if method is None:
                cache, plans, secs = build_cache(pre, None, None)
                tokens = greedy_decode(model, cache, pre.logits, args.max_new_tokens, eos)
            else:
                with press(model, method) as session:
                    cache, plans, secs = build_cache(pre, method, session)
                    nbytes = cache_kv_bytes(cache)
                    tokens = greedy_decode(model, cache, pre.logits, args.max_new_tokens, eos)
            decode_s = time.perf_counter() - start - secs
            if method is None:
                nbytes = pre.prompt_length * 2 * sum(c.keys.shape[1] * c.keys.shape[3] * c.keys.element_size()
                                                     for c in pre.layers)
                full_bytes = nbytes
            answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            ok = task_suite.score(sample, answer) == 1.0
            share = f"{100 * nbytes / full_bytes:.1f}%" if full_bytes else "-"
            rows.append([sample.task, name, "yes" if ok else "no", answer[:28], f"{nbytes / 2**20:.2f}", share,
                         f"{1000 * secs:.0f}", f"{decode_s:.2f}"])
            kept[name] = plans
        if picture is None:
            needle = sample.meta.get("needle") or sample.answer
            picture = (sample, pre.prompt_length, kept, _answer_positions(tokenizer, text, needle))
        del pre
    print()
    print(report.format_table(["task", "method", "right", "answer", "KV MiB", "of full", "compress ms",
                               "decode s"], rows))
    if picture is not None and args.out:
        from ..plots import plot_kept_positions

        sample, n, kept, marks = picture
        path = plot_kept_positions(kept, n, Path(args.out), marks=marks,
                                   title=f"{args.model}, {sample.task}: kept tokens at budget {args.budget} "
                                         f"(share of KV heads keeping each position)")
        print(f"\nwrote {path}")
    return 0
