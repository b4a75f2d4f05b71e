#!/usr/bin/env python3
"""`make lmms-check`: lmms-eval's own CLI and `mixkv eval` must agree, sample by sample, on the toy VLM (offline).

Steps (all in the lmms-eval venv of `make lmms-env`, so both harnesses run the same torch and transformers):

1. export the toy-VLM samples `mixkv eval --model toy-vlm --seed S --n N` uses, plus the lmms-eval task
   (`python -m mixkv.integrations.lmms_eval.export`);
2. `mixkv eval --model toy-vlm` for full, snapkv and snapkv+mixkv at budget 64 (one shared prefill per prompt);
3. `python -m lmms_eval --model mixkv_toy_vlm --model_args method=M,budget=64 --tasks toyvlm_* --include_path
   <export> --log_samples`, once per method (lmms-eval's ordinary CLI; mixkv is only its plugin);
4. compares per sample (task, doc) the two scores, and prints the accuracy table with the per-sample KV bytes
   and compression time lmms-eval logged. Exits 1 when a single score differs (or a run fails), 0 otherwise.

Also reported, not required: how many decoded texts are identical (lmms-eval cuts a text at its `until`
strings, `mixkv eval` does not, so a text may differ after the answer without changing its score).

This script itself needs only the standard library; it finds the venv as scripts/lmms_env.sh makes it:
$MIXKV_LMMS_VENV, else ($MIXKV_CACHE or ~/.cache/mixkv)/venv-lmms, or --python.
Defaults are sized for a few minutes on 2 CPU cores (n=10 per task, 3 tasks, 3 methods).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def default_python() -> Path:
    venv = os.environ.get("MIXKV_LMMS_VENV")
    if not venv:
        cache = os.environ.get("MIXKV_CACHE") or str(Path.home() / ".cache" / "mixkv")
        venv = str(Path(cache).expanduser() / "venv-lmms")
    return Path(venv).expanduser() / "bin" / "python"


@dataclass
class Run:
    """One lmms-eval run: per (task, doc_id) its score, text and logged mixkv numbers."""

    label: str
    scores: dict[tuple[str, int], float] = field(default_factory=dict)
    texts: dict[tuple[str, int], str] = field(default_factory=dict)
    counts: dict[tuple[str, int], dict] = field(default_factory=dict)
    seconds: float = 0.0


def run(cmd: list[str], log: Path, env: dict[str, str]) -> float:
    """Run ``cmd`` with output to ``log``; raise with the log's tail when it fails. Returns seconds."""
    print(f"$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"command failed (exit {proc.returncode}, log {log}):\n{tail}")
    print(f"  done in {seconds:.0f} s (log {log})", flush=True)
    return seconds


def run_name(label: str) -> str:
    return label.replace("+", "_").replace("@", "_")


def method_args(method: str, budget: int) -> str:
    return "method=full" if method == "full" else f"method={method},budget={budget}"


def label_of(method: str, budget: int) -> str:
    return "full" if method == "full" else f"{method}@{budget}"


def read_lmms(out_dir: Path, label: str, tasks: list[str]) -> Run:
    """Per-sample results of one lmms-eval run from its ``--log_samples`` JSONL files."""
    result = Run(label)
    for task in tasks:
        files = sorted(out_dir.rglob(f"*_samples_toyvlm_{task}.jsonl"), key=lambda p: p.stat().st_mtime)
        if not files:
            raise RuntimeError(f"lmms-eval wrote no samples for toyvlm_{task} under {out_dir}")
        for line in files[-1].read_text().splitlines():
            s = json.loads(line)
            key = (task, int(s["doc_id"]))
            result.scores[key] = float(s["accuracy"])
            resp = s["filtered_resps"]  # one request per doc: its text, or a one-element list of it
            while isinstance(resp, list) and resp:
                resp = resp[0]
            result.texts[key] = resp if isinstance(resp, str) else str(resp)
            tc = s.get("token_counts") or [None]
            result.counts[key] = tc[0] or {}
    return result


def read_mixkv(path: Path, tasks: list[str], n: int, seed: int = 0) -> dict[str, Run]:
    """Per-sample results of `mixkv eval --json` by method label, keyed (task, i) for the sample of seed ``seed + i``.

    Records carry their sample's seed; older files without it were indexed task by task."""
    payload = json.loads(path.read_text())
    runs: dict[str, Run] = {}
    for s in payload["samples"]:
        label = label_of(s["method"], s["budget"])
        r = runs.setdefault(label, Run(label))
        task = s["task"]
        key = (task, int(s["seed"]) - seed) if "seed" in s else (task, int(s["index"]) - tasks.index(task) * n)
        r.scores[key] = float(s["score"])
        r.texts[key] = s["output"]
    return runs


def reference_matches(path: Path, methods: list[str], budget: int, n: int, seed: int, tasks: list[str]) -> bool:
    """True when ``path`` is a finished `mixkv eval` JSON for this configuration (its methods may be more)."""
    try:
        payload = json.loads(path.read_text())
        cfg = payload["config"]
    except (OSError, ValueError, KeyError):
        return False
    return (not payload.get("interrupted") and set(methods) <= set(cfg.get("methods") or [])
            and cfg.get("budgets") == [budget]
            and cfg.get("n") == n and cfg.get("seed") == seed and cfg.get("tasks") == tasks
            and cfg.get("max_new_tokens") == 20)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=int(os.environ.get("LMMS_CHECK_N", 10)), help="samples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--methods", default="full,snapkv,snapkv+mixkv")
    p.add_argument("--tasks", default="colour,shape,text")
    p.add_argument("--batch-size", type=int, default=1, help="lmms-eval --batch_size (mixkv eval runs one by one)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in both harnesses")
    p.add_argument("--out", default=str(ROOT / "out" / "lmms-check"))
    p.add_argument("--python", default=str(default_python()), help="the lmms-eval venv's python")
    p.add_argument("--reuse-reference", action="store_true",
                   help="keep <out>/mixkv_eval.json when it was made for the same methods, budget, n, seed and tasks "
                        "(e.g. to rerun lmms-eval alone with another --batch-size)")
    p.add_argument("--no-run", action="store_true", help="run nothing: compare what <out> holds from a past run")
    args = p.parse_args(argv)

    python = Path(args.python)
    if not python.exists():
        print(f"error: {python} does not exist: build the lmms-eval venv first (make lmms-env)", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(out / "hf-datasets"))
    threads = [] if args.threads is None else ["--threads", str(args.threads)]

    export_dir = out / "tasks"
    if args.no_run:
        if not reference_matches(out / "mixkv_eval.json", methods, args.budget, args.n, args.seed, tasks):
            print(f"error: {out / 'mixkv_eval.json'} is missing or was made for other settings", file=sys.stderr)
            return 2
        return compare(args, methods, tasks, out, read_mixkv(out / "mixkv_eval.json", tasks, args.n, args.seed),
                       {label_of(m, args.budget): read_lmms(out / "lmms" / run_name(label_of(m, args.budget)),
                                                            label_of(m, args.budget), tasks) for m in methods}, 0.0)
    run([str(python), "-m", "mixkv.integrations.lmms_eval.export", "--out", str(export_dir), "--n", str(args.n),
         "--seed", str(args.seed), "--tasks", ",".join(tasks)], out / "export.log", env)

    ref_json = out / "mixkv_eval.json"
    if not (args.reuse_reference and reference_matches(ref_json, methods, args.budget, args.n, args.seed, tasks)):
        ref_json.unlink(missing_ok=True)
    ref_cmd = [str(python), "-m", "mixkv.cli.main", "eval", "--model", "toy-vlm", "--methods", ",".join(methods),
               "--budgets", str(args.budget), "--n", str(args.n), "--seed", str(args.seed), "--tasks", ",".join(tasks),
               "--max-new-tokens", "20", "--json", str(ref_json), *threads]
    if ref_json.exists():
        print(f"reusing {ref_json} (--reuse-reference: same methods, budget, n, seed and tasks)")
        ref_seconds = 0.0
    else:
        ref_seconds = run(ref_cmd, out / "mixkv_eval.log", env)
    reference = read_mixkv(ref_json, tasks, args.n, args.seed)

    lmms: dict[str, Run] = {}
    for method in methods:
        label = label_of(method, args.budget)
        run_dir = out / "lmms" / run_name(label)
        model_args = method_args(method, args.budget)
        if args.threads is not None:
            model_args += f",threads={args.threads}"
        seconds = run([str(python), "-m", "lmms_eval", "--model", "mixkv_toy_vlm", "--model_args", model_args,
                       "--tasks", ",".join(f"toyvlm_{t}" for t in tasks), "--include_path", str(export_dir),
                       "--batch_size", str(args.batch_size), "--log_samples", "--output_path", str(run_dir),
                       "--verbosity", "WARNING"], out / f"lmms_{run_dir.name}.log", env)
        lmms[label] = read_lmms(run_dir, label, tasks)
        lmms[label].seconds = seconds
    return compare(args, methods, tasks, out, reference, lmms, ref_seconds)


def compare(args: argparse.Namespace, methods: list[str], tasks: list[str], out: Path, reference: dict[str, Run],
            lmms: dict[str, Run], ref_seconds: float) -> int:
    """Print the table; 0 when every sample's score agrees and mixkv's numbers were logged, else 1."""
    rows = [["method", "task", "n", "lmms-eval acc", "mixkv eval acc", "scores agree", "texts agree",
             "KV MiB/sample", "KV vs full", "compress ms/sample"]]
    failures = []
    for label, got in lmms.items():
        want = reference.get(label)
        if want is None:
            failures.append(f"{label}: mixkv eval has no results")
            continue
        by_task: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for key in sorted(want.scores):
            by_task[key[0]].append(key)
        for task in tasks + ["mean"]:
            keys = [k for t in tasks for k in by_task[t]] if task == "mean" else by_task[task]
            missing = [k for k in keys if k not in got.scores]
            if missing:
                failures.append(f"{label}: lmms-eval lacks samples {missing[:5]}")
                continue
            agree = sum(got.scores[k] == want.scores[k] for k in keys)
            same_text = sum(got.texts[k] == want.texts[k] for k in keys)
            for k in keys:
                if got.scores[k] != want.scores[k]:
                    failures.append(f"{label} {k}: lmms-eval {got.scores[k]} ({got.texts[k]!r}) vs mixkv eval "
                                    f"{want.scores[k]} ({want.texts[k]!r})")
            kv = [got.counts[k].get("kv_bytes") for k in keys]
            full = [got.counts[k].get("kv_bytes_full") for k in keys]
            ms = [got.counts[k].get("compress_ms") for k in keys]
            have = all(v is not None for v in kv + full + ms)
            if not have:
                failures.append(f"{label} {task}: lmms-eval's logged token_counts lack mixkv's kv_bytes/compress_ms")
            acc_l = sum(got.scores[k] for k in keys) / len(keys)
            acc_m = sum(want.scores[k] for k in keys) / len(keys)
            rows.append([label, task, str(len(keys)), f"{acc_l:.3f}", f"{acc_m:.3f}", f"{agree}/{len(keys)}",
                         f"{same_text}/{len(keys)}",
                         f"{sum(kv) / len(kv) / 2**20:.2f}" if have else "-",
                         f"{sum(kv) / sum(full):.3f}" if have else "-",
                         f"{sum(ms) / len(ms):.1f}" if have else "-"])
    print()
    print(table(rows))
    if not args.no_run:
        timing = ", ".join(f"{r.label} {r.seconds:.0f} s" for r in lmms.values())
        ref = f"{ref_seconds:.0f} s" if ref_seconds else "reused"
        print(f"\nmixkv eval {ref}; lmms-eval runs (model load included): {timing}")
    summary = {"n": args.n, "seed": args.seed, "budget": args.budget, "tasks": tasks, "batch_size": args.batch_size,
               "table": rows, "failures": failures}
    (out / "lmms_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    if failures:
        print(f"\nFAIL: {len(failures)} problem(s):", *failures[:20], sep="\n  ")
        return 1
    print(f"\nOK: lmms-eval and mixkv eval agree on every sample ({out / 'lmms_check.json'})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        print(f"\nFAIL: {e}", file=sys.stderr)
        sys.exit(1)
