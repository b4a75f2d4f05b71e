#!/usr/bin/env python
"""Accuracy with 95% intervals and paired comparisons, from one ``mixkv eval --json`` file.

Table 1: one row per method, one column per budget: accuracy over all prompts (every task) with its Wilson
95% interval; ``--tasks`` adds a table per task. Table 2: paired comparisons on the same prompts, one row
per (pair, budget): both accuracies, the prompts only one of the two answers right, and the exact sign-test
p-value of those. Default pairs: each ``<base>+mixkv`` against ``<base>``, and each ``<base>+mixkv-modal``
against ``<base>+mixkv`` and against ``<base>``; ``--pair A,B`` (repeatable) names others.

    python scripts/method_table.py results/eval-smollm2-suite.json --tasks
    python scripts/method_table.py results/eval-toyvlm24-modal-w32.json results/eval-toyvlm24-modal-w16.json \
        --plot results/toyvlm24-modal.png      # one panel per (file, budget): each base, +mixkv, +mixkv-modal
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from mixkv.lab.evaluation import mean_over_tasks
from mixkv.lab.stats import scores_by_prompt, sign_test_p, wilson_interval


def per_prompt(payload: dict, task: str | None = None) -> dict[tuple[str, int | None], dict[int, float]]:
    """``(method, budget) -> {prompt index: score}`` (one task, or all: prompt indices are unique across tasks)."""
    out: dict[tuple[str, int | None], dict[int, float]] = defaultdict(dict)
    for (t, method, budget), got in scores_by_prompt(payload["samples"]).items():
        if task is None or t == task:
            out[(method, budget)].update(got)
    return out


def pct(scores: list[float]) -> str:
    n, k = len(scores), sum(scores)
    lo, hi = wilson_interval(k, n)
    return f"{100 * k / n:.0f} [{100 * lo:.0f}-{100 * hi:.0f}]"


def pool(payloads: list[dict]) -> dict:
    """One payload from runs of the same grid on different seeds: their prompts side by side.

    Prompt indices of later files are shifted past the earlier ones', so paired tests still pair a method's
    answer with another's on the same prompt.
    """
    first = payloads[0]["config"]
    same = ("methods", "budgets", "tasks", "length", "window", "max_new_tokens")
    for other in payloads[1:]:
        diff = [k for k in same if other["config"].get(k) != first.get(k)]
        if diff or other["model"] != payloads[0]["model"]:
            raise SystemExit(f"--pool: the runs differ in {diff or ['model']}; pool only one grid on several seeds")
    samples, offset = [], 0
    for pl in payloads:
        samples += [{**x, "index": x["index"] + offset} for x in pl["samples"]]
        offset += 1 + max(x["index"] for x in pl["samples"])
    seeds = [pl["config"]["seed"] for pl in payloads]
    n = sum(pl["config"]["n"] for pl in payloads)
    groups: dict[tuple, list[float]] = defaultdict(list)
    for x in samples:
        groups[(x["task"], x["method"], x["budget"])].append(float(x["score"]))
    results = [{"task": t, "method": m, "budget": b, "accuracy": sum(v) / len(v), "n": len(v)}
               for (t, m, b), v in groups.items()]
    lengths = [pl["config"]["prompt_tokens"] for pl in payloads if pl["config"].get("prompt_tokens")]
    tokens = {"min": min(x["min"] for x in lengths), "max": max(x["max"] for x in lengths)} if lengths else None
    return {**payloads[0], "samples": samples, "results": results + mean_over_tasks(results),
            "config": {**first, "seed": seeds, "n": n, "prompt_tokens": tokens, "pooled_from": len(payloads)}}


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


def plot_wrappers(payloads: list[dict], path: str) -> None:
    """Bars per base: the base, ``+mixkv`` and ``+mixkv-modal`` (those present), one panel per (file, budget),
    with Wilson 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(pl, b) for pl in payloads for b in pl["config"]["budgets"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.8), sharey=True, squeeze=False)
    kinds = [("", "base", "#bbbbbb"), ("+mixkv", "+mixkv (paper)", "#1f77b4"),
             ("+mixkv-modal", "+mixkv-modal", "#d62728")]
    for ax, (pl, budget) in zip(axes[0], panels, strict=True):
        cells = per_prompt(pl)
        bases = [m for m in dict.fromkeys(m for m, _ in cells) if "+" not in m and m != "full"]
        for k, (suffix, label, colour) in enumerate(kinds):
            xs, ys, lo, hi = [], [], [], []
            for i, base in enumerate(bases):
                got = cells.get((base + suffix, budget))
                if not got:
                    continue
                v = list(got.values())
                a, b = wilson_interval(sum(v), len(v))
                acc = sum(v) / len(v)
                xs.append(i + (k - 1) * 0.27)
                ys.append(100 * acc)
                lo.append(100 * (acc - a))
                hi.append(100 * (b - acc))
            ax.bar(xs, ys, 0.27, color=colour, label=label, yerr=[lo, hi], capsize=2, error_kw={"lw": 0.8})
        ax.set_xticks(range(len(bases)), bases, rotation=30, fontsize=8)
        ax.set_title(f"window {pl['config']['window']}, B={budget}", fontsize=9)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%), Wilson 95%")
    axes[0][0].legend(fontsize=7, loc="lower left")
    cfg = payloads[0]["config"]
    fig.suptitle(f"{payloads[0]['model']}: MixKV vs diversity inside each modality (seeds {cfg['seed']}.., "
                 f"n={cfg['n']}/task x {len(cfg['tasks'])} tasks)", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("json", nargs="+", help="eval results; tables are printed for the first, --plot draws all")
    p.add_argument("--plot", default=None, help="PNG: per base, the base, +mixkv and +mixkv-modal (bars)")
    p.add_argument("--pool", action="store_true",
                   help="the files are one grid on several seeds: tables over all their prompts together")
    p.add_argument("--pooled-json", default=None,
                   help="with --pool: write the pooled results here (`mixkv eval --from-json` draws its plots)")
    p.add_argument("--tasks", action="store_true", help="a table per task too")
    p.add_argument("--pair", action="append", default=[], help="A,B: compare B against A (repeatable)")
    args = p.parse_args()
    payloads = [json.loads(Path(f).read_text()) for f in args.json]
    if args.pool:
        payloads = [pool(payloads)]
        if args.pooled_json:
            Path(args.pooled_json).write_text(json.dumps(payloads[0], indent=1))
            print(f"wrote {args.pooled_json}")
    if args.plot:
        plot_wrappers(payloads, args.plot)
    payload = payloads[0]
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
