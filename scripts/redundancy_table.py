#!/usr/bin/env python
"""Online vs profile redundancy, paired: two ``mixkv eval --json`` files that differ only in ``--redundancy``.

Prints one markdown row per (method, budget): accuracy with the Wilson 95% interval for each file, n, and
the paired count of prompts only one of the two answers right (online-only / profile-only), with the exact
two-sided sign-test (McNemar) p-value of those discordant pairs. Both files must hold the same prompts
(same model, seed, n, tasks, length, window); prompts are matched by their index in the run.

Usage: ``python scripts/redundancy_table.py ONLINE.json PROFILE.json [--tasks]`` (``--tasks``: a row per task too).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from mixkv.lab.stats import scores_by_prompt, sign_test_p, wilson_interval

SAME = ("tasks", "n", "seed", "length", "window", "max_new_tokens", "dtype")


def pct(k: float, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"{100 * k / n:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def rows(online: dict, profile: dict, per_task: bool) -> list[str]:
    a, b = scores_by_prompt(online["samples"]), scores_by_prompt(profile["samples"])
    cells: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for key, got in a.items():
        task, method, budget = key
        other = b.get(key, {})
        pairs = [(got[i], other[i]) for i in sorted(got) if i in other]
        cells[("mean", method, budget)].extend(pairs)
        if per_task:
            cells[(task, method, budget)].extend(pairs)
    out = ["| method | budget | task | online % [95%] | profile % [95%] | n | online-only / profile-only right | p |",
           "|---|---|---|---|---|---|---|---|"]
    order = list(dict.fromkeys((m, bud) for (_, m, bud) in a))
    tasks = ["mean"] + (list(dict.fromkeys(t for (t, _, _) in a)) if per_task else [])
    for method, budget in order:
        for task in tasks:
            pairs = cells.get((task, method, budget), [])
            if not pairs:
                continue
            n = len(pairs)
            k_on, k_pr = sum(x for x, _ in pairs), sum(y for _, y in pairs)
            only_on = sum(1 for x, y in pairs if x > y)
            only_pr = sum(1 for x, y in pairs if y > x)
            out.append(f"| {method} | {budget if budget is not None else '-'} | {task} | {pct(k_on, n)} | "
                       f"{pct(k_pr, n)} | {n} | {only_on} / {only_pr} | {sign_test_p(only_on, only_pr):.2g} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("online")
    p.add_argument("profile")
    p.add_argument("--tasks", action="store_true", help="a row per task as well as the mean over tasks")
    args = p.parse_args()
    online, profile = (json.loads(Path(path).read_text()) for path in (args.online, args.profile))
    for k in SAME:
        if online["config"].get(k) != profile["config"].get(k):
            raise SystemExit(f"the two runs differ in {k}: {online['config'].get(k)} vs {profile['config'].get(k)}")
    if online["model"] != profile["model"]:
        raise SystemExit(f"the two runs are of different models: {online['model']} vs {profile['model']}")
    print("\n".join(rows(online, profile, args.tasks)))
    for name, payload in (("online", online), ("profile", profile)):
        c = payload["config"]
        print(f"{name}: {payload['model']}, redundancy {c.get('redundancy', '?')}, profile {c.get('profile')}, "
              f"seed {c['seed']}, n {c['n']} per task, window {c['window']}, {c['runtime_s']} s, "
              f"{c['threads']} thread(s), interrupted {payload['interrupted']}")


if __name__ == "__main__":
    main()
