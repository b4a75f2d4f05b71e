"""``mixkv bench``: speed and memory per method and context length; ``--micro`` for the
variable-length decode-attention microbenchmark, ``--throughput`` for batched decoding,
``--long-answer`` for compression while decoding."""

from __future__ import annotations

import time

import torch

from ..core import defaults
from ..core.capture import capture_prefill
from ..core.registry import make_method
from ..lab import report
from ..lab.benchmark import (
    LAYOUTS,
    bench_context,
    check_micro_batches,
    check_micro_layout,
    check_micro_lengths,
    micro_decode_step,
    micro_grid,
    parse_layout,
    rows_to_dicts,
    throughput,
)
from ..lab.long_answer import long_answer
from ..lab.long_answer import rows_to_dicts as long_answer_dicts
from ..testbeds import sources
from ..testbeds import tasks as task_suite
from .common import check_outputs, machine_description, parse_list, positive_int, setup_threads, write_json


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="prefill / compression / decode time and KV memory per method")
    p.add_argument("--model", default=sources.SMOLLM2)
    p.add_argument("--methods", default="full,snapkv,snapkv+mixkv,pyramidkv,pyramidkv+mixkv,adakv,adakv+mixkv")
    p.add_argument("--contexts", default="1024,2048,4096")
    p.add_argument("--budget", type=positive_int, default=128)
    p.add_argument("--window", type=positive_int, default=defaults.WINDOW)
    p.add_argument("--steps", type=positive_int, default=16, help="decoded tokens per timing run")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--dtype", default="float32", choices=sorted(sources.DTYPES))
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--micro", action="store_true", help="only the decode-attention microbenchmark (no model)")
    p.add_argument("--micro-lengths", default="1024,4096,16384", help="mean tokens per head")
    p.add_argument("--micro-layouts", default=",".join(LAYOUTS),
                   help="KVHEADSxGROUPxHEADDIM layouts (default: SmolLM2, Qwen2.5-VL-3B/7B, LLaVA-NeXT, LLaVA-1.5)")
    p.add_argument("--micro-batches", default="1,8")
    p.add_argument("--micro-iters", type=positive_int, default=30)
    p.add_argument("--micro-max-tokens", type=positive_int, default=1 << 20,
                   help="skip settings with more tokens per layer (B x H x L) than this (memory)")
    p.add_argument("--throughput", action="store_true",
                   help="tokens/s of a batch of long prompts decoded together (with --batch, --contexts)")
    p.add_argument("--batch", type=positive_int, default=8, help="--throughput: prompts decoded together")
    p.add_argument("--long-answer", action="store_true",
                   help="decode a long answer after one prompt (first of --contexts): each method with and "
                        "without --decode-budget, KV bytes every step, time per token, agreement with full")
    p.add_argument("--new-tokens", type=positive_int, default=512, help="--long-answer: tokens decoded")
    p.add_argument("--decode-budget", type=positive_int, default=256,
                   help="--long-answer: tokens per head kept while decoding")
    p.add_argument("--every", type=positive_int, default=defaults.DECODE_EVERY,
                   help="--long-answer: re-compress a layer at most once per this many tokens")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG of decode time and KV bytes vs context")
    p.set_defaults(run=run)


def _prompt(tokenizer, n_tokens: int) -> dict:
    sample = task_suite.make_passkey(0, n_tokens, tokenizer)
    text = task_suite.build_prompt(tokenizer, sample)
    return dict(tokenizer(text, return_tensors="pt", add_special_tokens=False))


def run(args) -> int:
    check_outputs(args.json, args.plot)
    if args.micro:
        return run_micro(args)
    if args.throughput:
        return run_throughput(args)
    if args.long_answer:
        return run_long_answer(args)
    methods = parse_list(args.methods)
    for name in methods:  # bad names and budgets fail here, before the model loads
        make_method(name, budget=args.budget, window=args.window)
    contexts = parse_list(args.contexts, int)
    if any(c <= args.budget for c in contexts):
        raise ValueError(f"--contexts must all exceed the budget ({args.budget}) or nothing is compressed; "
                         f"got {contexts}")
    sources.check_model_name(args.model)
    threads = setup_threads(args.threads)
    machine = machine_description()
    start = time.perf_counter()
    model, tokenizer = sources.load(args.model, args.dtype, device=args.device)
    rows = []
    # The limit a compressed cache can reach: decoding after a prompt as short as the budget. It joins
    # every context's round robin, so each row's ratio to it is measured under the same conditions.
    short = {k: v.to(model.device) for k, v in _prompt(tokenizer, args.budget).items()}
    for ctx in contexts:
        inputs = {k: v.to(model.device) for k, v in _prompt(tokenizer, ctx).items()}
        try:
            rows.extend(bench_context(model, inputs, methods, args.budget, args.window, args.steps, args.repeats,
                                      floor_inputs=short))
        except KeyboardInterrupt:
            if rows and args.json:
                partial = {"model": args.model, "rows": rows_to_dicts(rows), "interrupted": True}
                print(f"\ninterrupted: wrote the {len(rows)} rows measured so far to {write_json(partial, args.json)}")
            raise
        print(f"context {ctx}: done ({time.perf_counter() - start:.0f} s)")
    data = rows_to_dicts(rows)
    floors = {}
    context = None
    for r in data:  # each context's floor row follows its methods
        context = r["context"] if r["method"] != "floor" else context
        if r["method"] == "floor":
            floors[context] = r["decode_ms_per_token"]
    table, context = [], None
    for r in data:
        context = r["context"] if r["method"] != "floor" else context
        vs_floor = r["decode_ms_per_token"] / floors[context] if context in floors else None
        table.append([r["context"], r["method"], r["prefill_s"], f"{1000 * r['compress_s']:.1f}",
                      f"{r['compress_pct_of_prefill']:.2f}%", r["decode_ms_per_token"],
                      f"{vs_floor:.2f}x" if vs_floor else "-", f"{r['kv_bytes'] / 2**20:.2f}",
                      f"{r['kv_bytes'] / max(r['kv_bytes_theory'], 1):.4f}", r["peak_mem_mib"]])
    print(report.format_table(["context", "method", "prefill s", "compress ms", "of prefill", "decode ms/tok",
                               "vs floor", "KV MiB", "KV/theory", "peak MiB"], table))
    print("\nfloor: decoding after a prompt as short as the budget (full cache), in the same round robin")
    print(f"{machine}, {threads} threads, {time.perf_counter() - start:.0f} s")
    payload = {"model": args.model, "rows": data,
               "config": {"methods": methods, "contexts": contexts, "budget": args.budget, "window": args.window,
                          "steps": args.steps, "repeats": args.repeats, "dtype": args.dtype, "threads": threads,
                          "machine": machine}}
    if args.json:
        print(f"wrote {write_json(payload, args.json)}")
    if args.plot:
        from ..lab.figures import plot_bench

        shown = [r for r in data if r["method"] != "floor"]
        title = f"{args.model}, budget {args.budget}, {machine}"
        print(f"wrote {plot_bench(shown, args.plot, title=title)}")
    return 0


def _flag_check(flag: str, check, value) -> None:
    """Run ``check(value)``; its ValueError names the flag the value came from."""
    try:
        check(value)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def micro_settings(args) -> tuple[list[str], list[int], list[int]]:
    """Layouts, batches and lengths of ``--micro``, checked: an empty grid is an error, not an empty table."""
    lengths = parse_list(args.micro_lengths, int)
    batches = parse_list(args.micro_batches, int)
    layouts = parse_list(args.micro_layouts)
    for layout in layouts:
        _flag_check("--micro-layouts", check_micro_layout, layout)
    _flag_check("--micro-lengths", check_micro_lengths, lengths)
    _flag_check("--micro-batches", check_micro_batches, batches)
    if not micro_grid(layouts, batches, lengths, args.micro_max_tokens):
        smallest = min(parse_layout(lay)[0] for lay in layouts) * min(batches) * min(lengths)
        raise ValueError(f"no --micro setting fits --micro-max-tokens {args.micro_max_tokens}: the smallest "
                         f"holds {smallest} tokens per layer (batch x KV heads x tokens per head); raise "
                         "--micro-max-tokens or give smaller --micro-lengths / --micro-batches")
    return layouts, batches, lengths


def run_micro(args) -> int:
    layouts, batches, lengths = micro_settings(args)
    threads = setup_threads(args.threads)
    machine = machine_description()
    dtype = sources.check_dtype(args.dtype)
    rows = micro_decode_step(lengths, layouts, batches, iters=args.micro_iters, dtype=dtype,
                             max_tokens=args.micro_max_tokens)
    print(report.format_table(
        ["layout", "model", "batch", "tokens/head", "varlen ms", "dense ms", "padded+mask ms", "vs dense",
         "vs padded"],
        [[r["layout"], r["model"], r["batch"], r["tokens_per_head"], r["varlen_ms"], r["dense_ms"], r["padded_ms"],
          f"{r['ratio']:.2f}x", f"{r['ratio_padded']:.2f}x"] for r in rows]))
    print(f"\none decode step of attention, {args.dtype}, lengths +-50% per head; {machine}, {threads} threads")
    if args.json:
        payload = {"micro": rows, "machine": machine, "threads": threads, "dtype": args.dtype}
        print(f"wrote {write_json(payload, args.json)}")
    return 0


def run_throughput(args) -> int:
    methods = parse_list(args.methods)
    for name in methods:
        make_method(name, budget=args.budget, window=args.window)
    contexts = parse_list(args.contexts, int)
    sources.check_model_name(args.model)
    threads = setup_threads(args.threads)
    machine = machine_description()
    model, tokenizer = sources.load(args.model, args.dtype, device=args.device)
    rows = []
    for ctx in contexts:
        prompts = [task_suite.make_passkey(seed, ctx, tokenizer) for seed in range(args.batch)]
        texts = [task_suite.build_prompt(tokenizer, p) for p in prompts]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        n = min(len(x) for x in ids)  # equal lengths: cut each prompt's start, no padding needed
        batch = torch.tensor([x[len(x) - n:] for x in ids], device=model.device)
        inputs = {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
        rows.extend(throughput(model, inputs, methods, args.budget, args.window, args.steps))
    print(report.format_table(["batch", "prompt tokens", "method", "decode step ms", "tokens/s"],
                              [[r["batch"], r["prompt_tokens"], r["method"], r["step_ms"], r["tokens_per_s"]]
                               for r in rows]))
    print(f"\n{args.model}, budget {args.budget}; {machine}, {threads} threads")
    if args.json:
        print(f"wrote {write_json({'throughput': rows, 'machine': machine, 'threads': threads}, args.json)}")
    return 0


def run_long_answer(args) -> int:
    """One prompt, a long greedy answer: full vs each method with and without a decode budget."""
    methods = [m for m in parse_list(args.methods) if m != "full"]
    for name in methods:
        make_method(name, budget=args.budget, window=args.window).with_budget(args.decode_budget)
    if args.decode_budget <= args.window:
        raise ValueError(f"--decode-budget ({args.decode_budget}) must be larger than the window ({args.window})")
    context = parse_list(args.contexts, int)[0]
    if context <= args.budget:
        raise ValueError(f"the context ({context}) must exceed the budget ({args.budget}) or nothing is compressed")
    sources.check_model_name(args.model)
    threads = setup_threads(args.threads)
    machine = machine_description()
    start = time.perf_counter()
    model, tokenizer = sources.load(args.model, args.dtype, device=args.device)
    inputs = {k: v.to(model.device) for k, v in _prompt(tokenizer, context).items()}
    prefill = capture_prefill(model, inputs, args.window)
    configs = [("full", None)] + [(m, d) for m in methods for d in (None, args.decode_budget)]
    rows = long_answer(model, prefill, configs, args.budget, args.window, args.every, args.new_tokens, args.repeats,
                       progress=lambda msg: print(f"  {msg} ({time.perf_counter() - start:.0f} s)", flush=True))
    print(report.format_table(
        ["method", "decode budget", "decode ms/tok", "median", "re-compress ms/tok", "re-compressions",
         "KV MiB start", "KV MiB peak", "KV MiB end", "query ring MiB", "same as full"],
        [[r.method, r.decode_budget or "-", f"{r.ms_per_token:.1f}", f"{r.ms_per_token_median:.1f}",
          f"{r.recompress_ms_per_token:.2f}", r.decode_compressions, f"{r.kv_mib_start:.2f}", f"{r.kv_mib_peak:.2f}",
          f"{r.kv_mib_end:.2f}", f"{r.query_ring_mib:.2f}", f"{r.same_as_full}/{r.new_tokens}"] for r in rows]))
    print(f"\n{args.model}, prompt {prefill.prompt_length} tokens, budget {args.budget}, every {args.every}; "
          f"{machine}, {threads} threads, {args.repeats} round-robin repeats, {time.perf_counter() - start:.0f} s")
    payload = {"model": args.model, "long_answer": long_answer_dicts(rows),
               "config": {"prompt_tokens": prefill.prompt_length, "budget": args.budget, "window": args.window,
                          "every": args.every, "decode_budget": args.decode_budget, "new_tokens": args.new_tokens,
                          "repeats": args.repeats, "dtype": args.dtype, "threads": threads, "machine": machine}}
    if args.json:
        print(f"wrote {write_json(payload, args.json)}")
    if args.plot:
        from ..lab.figures import plot_long_answer

        title = (f"{args.model}: {prefill.prompt_length}-token prompt, budget {args.budget}, "
                 f"{args.new_tokens} new tokens")
        print(f"wrote {plot_long_answer(rows, args.plot, title)}")
    return 0
