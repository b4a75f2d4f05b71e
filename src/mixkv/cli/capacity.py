"""``mixkv capacity``: KV bytes per request and concurrent requests in a KV pool, full cache vs
each method at each budget, for transformers and for paged serving (no model is loaded; see
:mod:`mixkv.serving.capacity` and docs/serving.md)."""

from __future__ import annotations

import argparse

from ..core import defaults
from ..core.registry import available_methods
from ..lab import report
from ..serving import capacity, shapes
from .common import check_outputs, nonneg_int, parse_list, positive_int, write_json

DEFAULT_METHODS = "snapkv,snapkv+mixkv,pyramidkv,adakv"
DEFAULT_BUDGETS = "64,128,256"


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _pool_gib(text: str) -> float:
    """argparse type: a KV pool size, positive and at most 1 EiB (1e300 GiB overflowed the byte count)."""
    value = _positive_float(text)
    if value > capacity.MAX_POOL_GIB:
        raise argparse.ArgumentTypeError(f"expected at most {capacity.MAX_POOL_GIB} GiB (1 EiB), got {text!r}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("capacity", help="plan KV memory: bytes per request and requests that fit, full vs compressed")
    p.add_argument("--model", default=None,
                   help="a named shape (see --list-models) or the path of a Hugging Face config.json")
    p.add_argument("--list-models", action="store_true", help="print the named model shapes and exit")
    p.add_argument("--pool-gib", type=_pool_gib, default=None,
                   help="memory for the KV cache in GiB (after weights and activations; with tensor parallelism "
                        "the sum over GPUs)")
    p.add_argument("--dtype", default="bf16", choices=sorted(capacity.DTYPE_BYTES), help="KV cache element type")
    p.add_argument("--prompt-tokens", type=positive_int, default=None, help="prompt length (text + image tokens)")
    p.add_argument("--image-tokens", type=nonneg_int, default=None, help="image tokens of the prompt")
    p.add_argument("--text-tokens", type=nonneg_int, default=None, help="text tokens of the prompt")
    p.add_argument("--output-tokens", type=nonneg_int, default=256, help="generated tokens per request")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated method names (full is always shown)")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help="tokens kept per KV head, window included")
    p.add_argument("--window", type=positive_int, default=defaults.WINDOW)
    p.add_argument("--block-size", type=positive_int, default=capacity.VLLM_BLOCK_SIZE,
                   help="paged serving: token slots per block (vLLM's default 16)")
    p.add_argument("--prefilling", type=nonneg_int, default=1,
                   help="paged serving: requests prefilling at once, each holding its whole prompt until compressed")
    p.add_argument("--max-head-ratio", type=_positive_float, default=None,
                   help="per-head methods, paged: largest head's kept tokens / budget, as measured (no default)")
    p.add_argument("--decode-budget", type=positive_int, default=None,
                   help="tokens per head kept while decoding (compressed methods; default: decoded tokens all kept)")
    p.add_argument("--decode-every", type=positive_int, default=defaults.DECODE_EVERY,
                   help="with --decode-budget: decoded tokens between re-compressions")
    p.add_argument("--json", default=None, help="write the results here")
    p.set_defaults(run=run)


def _prompt_tokens(args) -> int:
    parts = (args.image_tokens, args.text_tokens)
    if args.prompt_tokens is not None:
        if any(x is not None for x in parts):
            raise ValueError("give --prompt-tokens, or --image-tokens and/or --text-tokens, not both")
        return args.prompt_tokens
    if all(x is None for x in parts):
        raise ValueError("give the prompt length: --prompt-tokens, or --image-tokens and/or --text-tokens")
    total = sum(x or 0 for x in parts)
    if total < 1:
        raise ValueError("the prompt needs at least one token (--image-tokens + --text-tokens is 0)")
    return total


def _check_methods(methods: list[str]) -> None:
    accepted = available_methods()
    for name in methods:
        if name.strip().lower() not in accepted:
            raise ValueError(f"unknown method {name!r}; accepted: {', '.join(accepted)}")
        capacity.budget_kind(name)


def _budgets(text: str, window: int) -> list[int]:
    budgets = parse_list(text, int)
    low = [b for b in budgets if b <= window]
    if low:
        raise ValueError(f"--budgets {', '.join(map(str, low))} must exceed the window ({window}): "
                         "a budget counts the window")
    return sorted(set(budgets))


def list_models() -> str:
    rows = []
    for name in shapes.named_shapes():
        s = shapes.load_named(name)
        img = s.image_tokens or {}
        span = "-" if img.get("max") is None else (
            str(img["max"]) if img.get("min") == img.get("max") else f"{img['min']}-{img['max']}")
        rows.append([s.name, s.num_layers, s.num_kv_heads, s.head_dim, f"{s.kv_bytes_per_token(2) / 1024:.0f}", span])
    return report.format_table(["model", "layers", "KV heads", "head dim", "KiB/token (bf16)", "image tokens"], rows)


def _mib(nbytes: int | None) -> str | None:
    return None if nbytes is None else f"{nbytes / 2**20:.1f}"


def _times(x: float | None) -> str | None:
    return None if x is None else f"{x:.1f}x"


def format_plan(p: capacity.Plan) -> str:
    """Header, one table row per method and budget, and the notes."""
    s, w, pool = p.shape, p.work, p.pool
    per_token = s.kv_bytes_per_token(pool.dtype_bytes)
    lines = [f"{s.name}: {s.num_layers} layers x {s.num_kv_heads} KV heads x head dim {s.head_dim}; "
             f"{pool.dtype}: {per_token / 1024:.1f} KiB per token (all layers)",
             f"KV pool {pool.gib:g} GiB; prompt {w.prompt_tokens} tokens, output {w.output_tokens}; window {w.window}; "
             f"paged: {pool.block_size}-token blocks, {pool.prefilling} "
             f"{'request' if pool.prefilling == 1 else 'requests'} prefilling at a time", ""]
    rows = []
    for r in p.rows:
        paged_mib = r.paged.note or _mib(r.paged.bytes_per_request)
        rows.append([r.method, r.budget, f"{r.kept_per_head:g}", _mib(r.transformers.bytes_per_request),
                     _times(p.compression(r)), r.transformers.requests, _times(p.factor(r, "transformers")),
                     paged_mib, r.paged.requests, _times(p.factor(r, "paged"))])
    lines.append(report.format_table(
        ["method", "budget", "kept/head", "MiB/request", "ratio", "requests", "x full", "paged MiB/request",
         "paged requests", "paged x full"], rows))
    if p.notes:
        lines += ["", *(f"note: {n}" for n in p.notes)]
    return "\n".join(lines)


def run(args) -> int:
    if args.list_models:
        print(list_models())
        return 0
    if args.model is None:
        raise ValueError("give --model: a named shape (" + ", ".join(shapes.named_shapes()) +
                         ") or the path of a Hugging Face config.json")
    if args.pool_gib is None:
        raise ValueError("give --pool-gib: the memory for the KV cache in GiB")
    prompt = _prompt_tokens(args)
    methods = parse_list(args.methods)
    _check_methods(methods)
    budgets = _budgets(args.budgets, args.window)
    if args.decode_budget is not None and args.decode_budget <= args.window:
        raise ValueError(f"--decode-budget ({args.decode_budget}) must exceed the window ({args.window}): "
                         "it counts the window")
    if args.max_head_ratio is not None and args.max_head_ratio < 1:
        raise ValueError(f"--max-head-ratio ({args.max_head_ratio:g}) is the largest head over the budget: >= 1")
    check_outputs(args.json)
    shape = shapes.resolve_shape(args.model)
    work = capacity.Workload(prompt, args.output_tokens, args.window, args.decode_budget, args.decode_every)
    pool = capacity.Pool(args.pool_gib, args.dtype, args.block_size, args.prefilling)
    result = capacity.plan(shape, work, pool, methods, budgets, args.max_head_ratio)
    print(format_plan(result))
    if args.json:
        print(f"\nwrote {write_json(result.to_dict(), args.json)}")
    return 0
