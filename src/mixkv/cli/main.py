"""``mixkv <command>``: argument parsing only; each command lives in its own module."""

from __future__ import annotations

import argparse
import logging
import sys

from . import analyze, bench, calibrate, capacity, compare, demo, eval_cmd, export_toyvlm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixkv", description="KV-cache compression for HF VLMs and LLMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (shows attention paths)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (demo, eval_cmd, calibrate, analyze, compare, bench, capacity, export_toyvlm):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"\nmixkv {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, NotImplementedError) as e:
        print(f"mixkv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
