#!/usr/bin/env python
"""Accuracy with 95% intervals and paired comparisons, from one ``mixkv eval --json`` file.

Table 1: one row per method, one column per budget: accuracy over all prompts (every task) with its Wilson
95% interval; ``--tasks`` adds a table per task. Table 2: paired comparisons on the same prompts, one row
per (pair, budget): both accuracies, the prompts only one of the two answers right, and the exact sign-test
p-value of those. Default pairs: each ``<base>+mixkv`` against ``<base>``, and each ``<base>+mixkv-modal``
against ``<base>+mixkv`` and against ``<base>``; ``--pair A,B`` (repeatable) names others.

    python scripts/method_table.py results/eval-smollm2-suite.json --tasks
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from mixkv.lab.stats import sign_test_p, wilson_interval


def per_prompt(payload: dict, task: str | None = None) -> dict[tuple[str, int | None], dict[int, float]]:
    """``(method, budget) -> {prompt index: score}`` (one task, or all)."""
    out: dict[tuple[str, int | None], dict[int, float]] = defaultdict(dict)
    for s in payload["samples"]:
        if task is None or s["task"] == task:
            out[(s["method"], s["budget"])][s["index"]] = float(s["score"])
    return out


def pct(scores: list[float]) -> str:
    n, k = len(scores), sum(scores)
    lo, hi = wilson_interval(k, n)
    return f"{100 * k / n:.0f} [{100 * lo:.0f}-{100 * hi:.0f}]"


def accuracy_table(cells: dict, budgets: list[int]) -> list[str]:
    methods = list(dict.fromkeys(m for m, _ in cells))
    lines = ["| method | " + " | ".join(f"B={b}" for b in budgets) + " | n |",
             "|---|" + "---|" * (len(budgets) + 1)]
    for m in methods:
        row = [pct(list(cells[(m, b)].values())) if (m, b) in cells else
               (pct(list(cells[(m, None)].values())) if (m, None) in cells else "-") for b in budgets]
        n = max(len(v) for (mm, _), v in cells.items() if mm == m)
        lines.append(f"| {m} | " + " | ".join(row) + f" | {n} |")
    return lines


def default_pairs(methods: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for m in methods:
        base, _, wrapper = m.partition("+")
        if wrapper == "mixkv" and base in methods:
            pairs.append((base, m))
        if wrapper == "mixkv-modal":
            pairs += [(p, m) for p in (f"{base}+mixkv", base) if p in methods]
    return pairs


def paired_table(cells: dict, pairs: list[tuple[str, str]], budgets: list[int]) -> list[str]:
    lines = ["| A | B | budget | A % | B % | B - A (points) | only A right | only B right | p (sign test) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        for bud in budgets:
            x, y = cells.get((a, bud)), cells.get((b, bud))
            if not x or not y:
                continue
            common = sorted(set(x) & set(y))
            sa, sb = [x[i] for i in common], [y[i] for i in common]
            only_a = sum(1 for u, v in zip(sa, sb, strict=True) if u > v)
            only_b = sum(1 for u, v in zip(sa, sb, strict=True) if v > u)
            diff = 100 * (sum(sb) - sum(sa)) / len(common)
            lines.append(f"| {a} | {b} | {bud} | {100 * sum(sa) / len(common):.0f} | {100 * sum(sb) / len(common):.0f} "
                         f"| {diff:+.0f} | {only_a} | {only_b} | {sign_test_p(only_a, only_b):.3f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("json")
    p.add_argument("--tasks", action="store_true", help="a table per task too")
    p.add_argument("--pair", action="append", default=[], help="A,B: compare B against A (repeatable)")
    args = p.parse_args()
    payload = json.loads(Path(args.json).read_text())
    cfg = payload["config"]
    budgets = list(cfg["budgets"])
    cells = per_prompt(payload)
    methods = list(dict.fromkeys(m for m, _ in cells))
    print(f"{payload['model']}: window {cfg['window']}, seed {cfg['seed']}, n={cfg['n']} per task "
          f"({', '.join(cfg['tasks'])}), prompts {cfg.get('prompt_tokens')}\n")
    print("\n".join(accuracy_table(cells, budgets)))
    if args.tasks:
        for task in cfg["tasks"]:
            print(f"\n{task}\n")
            print("\n".join(accuracy_table(per_prompt(payload, task), budgets)))
    pairs = [tuple(x.split(",", 1)) for x in args.pair] or default_pairs(methods)
    if pairs:
        print("\n" + "\n".join(paired_table(cells, pairs, budgets)))


if __name__ == "__main__":
    main()
