"""mixkv next to NVIDIA kvpress: the same prompts, the same budgets, measured the same way.

One call of :func:`run_compare` (``mixkv compare``):

1. exports the prompts (token ids of the generated task suite, :mod:`mixkv.testbeds.tasks`) and the
   settings to JSON (:func:`export_prompts`);
2. builds ``.venv-kvpress`` with ``scripts/kvpress/setup_env.sh`` when it is missing (kvpress 0.5.5
   needs transformers<5.3, mixkv 5.24, so kvpress runs in its own environment);
3. runs ``scripts/kvpress/run_kvpress.py`` with that venv's Python in a subprocess (kvpress's own
   ``SnapKVPress`` / ``AdaKVPress(SnapKVPress(...))`` and ``with press(model):``);
4. measures mixkv on the same prompts with the same protocol (:func:`measure_mixkv`): one prefill
   under ``mixkv.press`` per prompt and method (``logits_to_keep=1``), then greedy decoding of a
   fixed number of tokens with every step timed;
5. aggregates both sides per context length and method and prints them side by side with
   kvpress/mixkv ratios (:func:`compare_rows`, :func:`format_tables`); writes JSON (+ PNG).

Budget matching (tokens kept per KV head, the observation window included, on both sides): for a
prompt of N tokens kvpress gets ``compression_ratio = 1 - (B + 0.5) / N``, which keeps exactly
``int(N * (1 - ratio)) = B`` tokens per head (the run script asserts it with kvpress's own
``compute_n_kept``). With ``ratio`` (kvpress's compression ratio, the fraction removed) instead of a
budget, mixkv gets ``budget = int(N * (1 - ratio))`` per prompt: the count kvpress keeps.

Cross-check of the two implementations: where the same method runs on both sides (SnapKV at the
same budget), the decoded tokens and the kept positions should agree; :func:`kept_overlap` gives
the fraction of identical kept (head, position) pairs per layer.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

PROMPTS_FORMAT = "mixkv-compare-prompts"
KVPRESS_FORMAT = "kvpress-compare-results"
METHODS = ("full", "snapkv", "adakv")
# mixkv's AdaKV configured as kvpress's behaves at small budgets (no floor, no mass normalisation);
# run on the mixkv side only and paired with kvpress's "adakv" (see ``AS_KVPRESS``).
ADAKV_AS_KVPRESS = "adakv-as-kvpress"
PEER = {ADAKV_AS_KVPRESS: "adakv"}
IMPLS = ("mixkv", "kvpress")
REPO_ROOT = Path(__file__).resolve().parents[2]


# ---- budgets ---------------------------------------------------------------------------------------

def kvpress_n_kept(n_tokens: int, compression_ratio: float) -> int:
    """Tokens per KV head kvpress keeps (``kvpress.utils.compute_n_kept``, repeated here)."""
    if compression_ratio >= 1.0:
        return 0
    return max(1, int(n_tokens * (1 - compression_ratio)))


def matched_ratio(n_tokens: int, budget: int) -> float:
    """kvpress's ``compression_ratio`` keeping exactly ``budget`` tokens per head of an N-token prompt."""
    if n_tokens <= budget:
        return 0.0
    return 1.0 - (budget + 0.5) / n_tokens


def mixkv_budget(n_tokens: int, settings: dict) -> int | None:
    """mixkv's budget (per KV head, window included) for one prompt; None: no compression."""
    if settings.get("budget") is not None:
        budget = int(settings["budget"])
        return None if n_tokens <= budget else budget
    ratio = float(settings["compression_ratio"])
    if ratio <= 0:
        return None
    kept = kvpress_n_kept(n_tokens, ratio)
    if kept <= int(settings.get("window", 32)):
        raise ValueError(f"compression ratio {ratio} keeps {kept} tokens of a {n_tokens}-token prompt, not more "
                         f"than the window ({settings.get('window', 32)}); use a smaller ratio")
    return None if kept >= n_tokens else kept


# ---- prompts ---------------------------------------------------------------------------------------

def export_prompts(tokenizer, contexts: Sequence[int], tasks: Sequence[str], n: int, seed: int,
                   settings: dict, make_suite: Callable | None = None,
                   build_prompt: Callable | None = None) -> dict:
    """The prompts file both sides read: token ids, expected answer, task; plus the settings.

    ``make_suite`` / ``build_prompt`` default to :mod:`mixkv.testbeds.tasks` (tests pass fakes).
    """
    if make_suite is None or build_prompt is None:
        from .testbeds import tasks as task_suite

        make_suite = make_suite or task_suite.make_suite
        build_prompt = build_prompt or task_suite.build_prompt
    if (settings.get("budget") is None) == (settings.get("compression_ratio") is None):
        raise ValueError("give exactly one of budget (tokens per KV head) and compression_ratio")
    prompts = []
    for ctx in contexts:
        for i, sample in enumerate(make_suite(list(tasks), n, seed, ctx, tokenizer)):
            text = build_prompt(tokenizer, sample)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = [int(t) for t in (ids.tolist() if hasattr(ids, "tolist") else ids)]
            if ids and isinstance(ids[0], list):
                raise ValueError("the tokenizer returned a batch; expected the ids of one prompt")
            prompts.append({
                "id": f"{ctx}/{sample.task}/{i % max(n, 1)}", "context": int(ctx), "task": sample.task,
                "input_ids": ids, "answer": str(sample.answer),
                "answer_kind": sample.meta.get("answer_kind", "number"), "choices": sample.meta.get("choices"),
                "meta": {k: v for k, v in sample.meta.items() if isinstance(v, (int, float, str, bool))},
            })
    for p in prompts:
        if settings.get("budget") is not None and len(p["input_ids"]) <= int(settings.get("window", 32)):
            raise ValueError(f"prompt {p['id']} has only {len(p['input_ids'])} tokens, not more than the window")
    return {"format": PROMPTS_FORMAT, "version": 1, "settings": dict(settings), "prompts": prompts}


def score_text(prompt: dict, text: str) -> float:
    """mixkv's scorer (:func:`mixkv.testbeds.tasks.score`) on an exported prompt."""
    from .testbeds.tasks import Sample, score

    meta = {"answer_kind": prompt.get("answer_kind") or "number"}
    if prompt.get("choices"):
        meta["choices"] = prompt["choices"]
    return score(Sample(task=prompt["task"], prompt="", answer=str(prompt["answer"]), meta=meta), text)


# ---- process memory --------------------------------------------------------------------------------

def _status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _rss_reset() -> None:
    """Give freed heap back to the OS (glibc ``malloc_trim``), then reset the peak-RSS counter (Linux).

    Without the trim, a run's allocations reuse memory an earlier step (model loading) freed but
    kept resident, and the peak would not move at all.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


# ---- the mixkv side --------------------------------------------------------------------------------

def _plans_to_lists(plans: dict) -> list | None:
    if not plans:
        return None
    out = []
    for idx in sorted(plans):
        plan = plans[idx]
        out.append([plan.indices[0, h, : int(plan.lengths[0, h])].tolist() for h in range(plan.indices.shape[1])])
    return out


@torch.no_grad()
def measure_mixkv_one(model, prompt: dict, method_name: str, settings: dict, record_kept: bool = True,
                      steps: int | None = None) -> dict:
    """One prompt under one method with mixkv, measured as ``run_kvpress.py`` measures kvpress."""
    from .press import cache_kv_bytes, press
    from .registry import make_method

    ids = torch.tensor([prompt["input_ids"]], dtype=torch.long, device=model.device)
    n = ids.shape[1]
    max_new = int(settings.get("max_new_tokens", 10))
    steps = max(max_new, int(settings.get("decode_steps", 16))) if steps is None else steps
    eos = set(settings.get("eos_token_ids") or [])
    window = int(settings.get("window", 32))
    budget = None if method_name == "full" else mixkv_budget(n, settings)
    method = None
    if budget is not None and method_name == ADAKV_AS_KVPRESS:
        from .methods import AdaKV

        method = AdaKV(budget=budget, window=window, kernel=int(settings.get("kernel", 5)), floor=0.0,
                       normalize=False)
    elif budget is not None:
        method = make_method(method_name, budget=budget, window=window, kernel=int(settings.get("kernel", 5)))

    _rss_reset()
    rss_before = _status_mib("VmRSS")
    times: list[float] = []
    with press(model, method, record=record_kept) as session:
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - start
        cache = out.cache
        nbytes = cache_kv_bytes(cache)
        num_layers = len(cache.layers)
        compress_s = session.stats.compress_seconds if session is not None else 0.0
        kept = _plans_to_lists(session.plans) if session is not None and record_kept else None
        kept_per_layer = ({int(i): v[0].tolist() for i, v in session.stats.kept_per_layer.items()}
                          if session is not None else {})
        token = int(out.logits[0, -1].argmax())
        tokens = [token]
        for _ in range(steps - 1):
            t0 = time.perf_counter()
            step = model(input_ids=torch.tensor([[token]], device=ids.device), cache=cache, use_cache=True)
            token = int(step.logits[0, -1].argmax())
            times.append(time.perf_counter() - t0)
            tokens.append(token)
    peak = _status_mib("VmHWM")
    answer = []
    for t in tokens[:max_new]:
        answer.append(t)
        if t in eos:
            break
    return {
        "prompt_id": prompt["id"], "context": prompt["context"], "task": prompt["task"], "method": method_name,
        "impl": "mixkv", "prompt_tokens": n, "budget": budget,
        "kept_per_head": budget if budget is not None else n,
        "prefill_s": prefill_s, "compress_s": compress_s,
        "decode_step_ms": [1000 * t for t in times],
        "decode_ms_per_token": 1000 * statistics.median(times) if times else None,
        "kv_bytes": nbytes, "kv_bytes_unmasked": nbytes,
        "num_layers": num_layers,
        "kept_counts": [kept_per_layer[i] for i in sorted(kept_per_layer)] or None,
        "rss_before_mib": rss_before, "peak_rss_mib": peak,
        "tokens": answer, "decode_tokens": tokens, "kept": kept,
    }


def measure_mixkv(model, tokenizer, spec: dict, progress: Callable[[str], None] | None = print) -> list[dict]:
    """All prompts x methods of an exported prompts file; the first prompt (cut to 512 tokens) warms up."""
    settings, prompts = spec["settings"], spec["prompts"]
    methods = list(settings.get("methods", METHODS)) + list(settings.get("mixkv_only_methods", []))
    record = bool(settings.get("record_kept", True))
    if settings.get("warmup", True) and prompts:
        short = dict(prompts[0], input_ids=prompts[0]["input_ids"][:512])
        warm = dict(settings, budget=2 * int(settings.get("window", 32)), compression_ratio=None)
        for name in methods:
            measure_mixkv_one(model, short, name, warm, record_kept=False, steps=3)
    runs = []
    for i, prompt in enumerate(prompts):
        for name in methods:
            r = measure_mixkv_one(model, prompt, name, settings, record)
            r["text"] = tokenizer.decode(r["tokens"], skip_special_tokens=True).strip()
            runs.append(r)
            if progress is not None:
                progress(f"[mixkv] {i + 1}/{len(prompts)} {prompt['id']} {name}: N={r['prompt_tokens']} "
                         f"prefill {r['prefill_s']:.2f} s, decode {r['decode_ms_per_token']:.1f} ms/tok, "
                         f"KV {r['kv_bytes'] / 2**20:.2f} MiB, answer {r['text'][:20]!r}")
    return runs


# ---- the kvpress side ------------------------------------------------------------------------------

def kvpress_paths(repo: Path | None = None, venv: Path | None = None) -> dict[str, Path]:
    repo = Path(repo) if repo is not None else REPO_ROOT
    venv = Path(venv) if venv is not None else Path(os.environ.get("KVPRESS_VENV", repo / ".venv-kvpress"))
    return {"repo": repo, "setup": repo / "scripts" / "kvpress" / "setup_env.sh",
            "script": repo / "scripts" / "kvpress" / "run_kvpress.py", "venv": venv,
            "python": venv / "bin" / "python", "stamp": venv / ".kvpress-setup"}


def ensure_kvpress_env(paths: dict[str, Path], allow_setup: bool = True) -> Path:
    """The venv's Python; runs ``setup_env.sh`` when the venv is missing or was never completed."""
    if paths["python"].exists() and paths["stamp"].exists():
        return paths["python"]
    if not allow_setup:
        raise RuntimeError(f"{paths['venv']} is not set up; run {paths['setup']} (or drop --no-setup)")
    if not paths["setup"].exists():
        raise FileNotFoundError(f"{paths['setup']} not found: `mixkv compare` runs from a checkout of the repository "
                                "(pass --repo DIR)")
    env = dict(os.environ, KVPRESS_VENV=str(paths["venv"]), PYTHON=os.environ.get("PYTHON", sys.executable))
    proc = subprocess.run(["bash", str(paths["setup"])], env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{paths['setup']} failed with status {proc.returncode}")
    return paths["python"]


def run_kvpress(python: Path, script: Path, prompts_path: Path, gguf: Path, out_path: Path,
                threads: int) -> dict:
    """Run the kvpress side in its venv (output streamed); returns its results JSON."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    cmd = [str(python), str(script), str(prompts_path), str(gguf), str(out_path), "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the kvpress run failed with status {proc.returncode}: {' '.join(cmd)}")
    return load_kvpress_results(out_path)


def check_kvpress_results(spec: dict, kv_data: dict) -> None:
    """Raise unless ``kv_data`` holds every (prompt, method) of ``spec`` under the same settings."""
    mine, theirs = spec["settings"], kv_data.get("settings", {})
    for key in ("budget", "compression_ratio", "window", "kernel", "max_new_tokens", "decode_steps"):
        if mine.get(key) != theirs.get(key):
            raise ValueError(f"the kvpress results were made with {key}={theirs.get(key)!r}, this run uses "
                             f"{mine.get(key)!r}; rerun without --kvpress-results")
    have = {(r["prompt_id"], r["method"]): r["prompt_tokens"] for r in kv_data["runs"]}
    for p in spec["prompts"]:
        for method in mine.get("methods", METHODS):
            n = have.get((p["id"], method))
            if n is None:
                raise ValueError(f"the kvpress results lack prompt {p['id']} under {method}; "
                                 "rerun without --kvpress-results")
            if n != len(p["input_ids"]):
                raise ValueError(f"prompt {p['id']} has {len(p['input_ids'])} tokens here but {n} in the kvpress "
                                 "results (another tokenizer, seed or task version?); rerun without --kvpress-results")


def load_kvpress_results(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("format") != KVPRESS_FORMAT:
        raise ValueError(f"{path}: not a kvpress results file (format {data.get('format')!r})")
    return data


# ---- aggregation and the side-by-side table -------------------------------------------------------

def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(runs: Sequence[dict]) -> dict[tuple[int, str, str], dict]:
    """Per (context, method, impl): medians of the timings (decode: over all steps of all prompts),
    mean KV bytes and accuracy (``score`` must already be set on each run)."""
    groups: dict[tuple[int, str, str], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(int(r["context"]), r["method"], r["impl"])].append(r)
    out = {}
    for key, rs in groups.items():
        steps = [t for r in rs for t in r.get("decode_step_ms") or []]
        extra = [r["peak_rss_mib"] - r["rss_before_mib"] for r in rs
                 if r.get("peak_rss_mib") is not None and r.get("rss_before_mib") is not None]
        out[key] = {
            "context": key[0], "method": key[1], "impl": key[2], "n": len(rs),
            "prompt_tokens": _mean([r["prompt_tokens"] for r in rs]),
            "kept_per_head": _mean([r.get("kept_per_head") for r in rs]),
            "prefill_s": _median([r["prefill_s"] for r in rs]),
            "compress_s": _median([r.get("compress_s") for r in rs]),
            "decode_ms_per_token": _median(steps) if steps else _median([r.get("decode_ms_per_token") for r in rs]),
            "kv_bytes": _mean([r["kv_bytes"] for r in rs]),
            "kv_bytes_unmasked": _mean([r.get("kv_bytes_unmasked", r["kv_bytes"]) for r in rs]),
            "peak_rss_mib": max((r["peak_rss_mib"] for r in rs if r.get("peak_rss_mib") is not None), default=None),
            "peak_extra_mib": _median(extra),
            "accuracy": _mean([r.get("score") for r in rs]),
        }
    return out


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, None when either is missing or the denominator is 0."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def kept_overlap(a: list | None, b: list | None) -> list[float] | None:
    """Per layer: identical kept (head, position) pairs / the larger of the two kept counts.

    ``a`` and ``b`` are ``[layer][kv_head] -> positions``. 1.0 means the same tokens were kept.
    """
    if not a or not b or len(a) != len(b):
        return None
    out = []
    for la, lb in zip(a, b):
        if len(la) != len(lb):
            return None
        same = sum(len(set(ha) & set(hb)) for ha, hb in zip(la, lb))
        total = max(sum(len(h) for h in la), sum(len(h) for h in lb))
        out.append(same / total if total else 1.0)
    return out


def alloc_difference(a: list | None, b: list | None) -> float | None:
    """Mean over layers and heads of ``|kept_a - kept_b| / mean kept``: 0 when every head keeps as many.

    ``a`` and ``b`` are ``[layer][kv_head] -> count`` (AdaKV moves budget between heads).
    """
    if not a or not b or len(a) != len(b):
        return None
    diffs = []
    for la, lb in zip(a, b):
        if len(la) != len(lb) or not la:
            return None
        mean = (sum(la) + sum(lb)) / (2 * len(la))
        diffs.extend(abs(x - y) / mean if mean else 0.0 for x, y in zip(la, lb))
    return statistics.mean(diffs)


def agreement(mixkv_runs: Sequence[dict], kvpress_runs: Sequence[dict]) -> dict[tuple[int, str], dict]:
    """Per (context, method): identical answers, identical correctness, kept-position overlap."""
    by_key = {(r["prompt_id"], r["method"]): r for r in kvpress_runs}
    groups: dict[tuple[int, str], list[tuple[dict, dict]]] = defaultdict(list)
    for m in mixkv_runs:
        k = by_key.get((m["prompt_id"], PEER.get(m["method"], m["method"])))
        if k is not None:
            groups[(int(m["context"]), m["method"])].append((m, k))
    out = {}
    for key, pairs in groups.items():
        overlaps = [kept_overlap(m.get("kept"), k.get("kept")) for m, k in pairs]
        overlaps = [o for o in overlaps if o]
        by_layer = [statistics.mean(col) for col in zip(*overlaps)] if overlaps else None
        first_steps = [_first_divergence(m["decode_tokens"], k["decode_tokens"]) for m, k in pairs
                       if m.get("decode_tokens") and k.get("decode_tokens")]
        allocs = [alloc_difference(m.get("kept_counts"), k.get("kept_counts")) for m, k in pairs]
        allocs = [a for a in allocs if a is not None]
        out[key] = {
            "n": len(pairs),
            "same_answer": sum(m["tokens"] == k["tokens"] for m, k in pairs) / len(pairs),
            "same_correctness": sum(m.get("score") == k.get("score") for m, k in pairs) / len(pairs),
            "first_divergent_token": first_steps,
            "kept_overlap": statistics.mean(by_layer) if by_layer else None,
            "kept_overlap_by_layer": by_layer,
            "alloc_difference": statistics.mean(allocs) if allocs else None,
        }
    return out


def _first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first decoded token that differs (None: identical over the common length)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def compare_rows(summary: dict[tuple[int, str, str], dict], agree: dict[tuple[int, str], dict] | None = None
                 ) -> list[dict]:
    """One row per (context, method) present on either side; ratios are kvpress / mixkv."""
    agree = agree or {}
    keys = sorted({(c, m) for c, m, _ in summary}, key=lambda k: (k[0], _method_order(k[1])))
    rows = []
    for ctx, method in keys:
        m = summary.get((ctx, method, "mixkv"), {})
        k = summary.get((ctx, PEER.get(method, method), "kvpress"), {})
        row: dict[str, Any] = {"context": ctx, "method": method,
                               "prompt_tokens": m.get("prompt_tokens", k.get("prompt_tokens")),
                               "kept_per_head": m.get("kept_per_head", k.get("kept_per_head"))}
        for field in ("prefill_s", "compress_s", "decode_ms_per_token", "kv_bytes", "kv_bytes_unmasked",
                      "peak_rss_mib", "peak_extra_mib", "accuracy", "n"):
            row[f"mixkv_{field}"] = m.get(field)
            row[f"kvpress_{field}"] = k.get(field)
        for field in ("prefill_s", "compress_s", "decode_ms_per_token", "kv_bytes", "peak_extra_mib"):
            row[f"ratio_{field}"] = ratio(k.get(field), m.get(field))
        a = agree.get((ctx, method), {})
        row["same_answer"] = a.get("same_answer")
        row["kept_overlap"] = a.get("kept_overlap")
        rows.append(row)
    return rows


def _method_order(name: str) -> int:
    order = (*METHODS, ADAKV_AS_KVPRESS)
    return order.index(name) if name in order else len(order)


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _acc(value: float | None, n: int | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if not n else f"{round(value * n)}/{n}"


def format_tables(rows: Sequence[dict]) -> str:
    """Two plain-text tables (GitHub markdown): time, then memory / accuracy / agreement."""
    from .report import format_table

    time_rows = [[r["context"], r["method"], _f(r["prompt_tokens"], ".0f"),
                  _f(r["mixkv_prefill_s"], ".3f"), _f(r["kvpress_prefill_s"], ".3f"), _x(r["ratio_prefill_s"]),
                  _f(_ms(r["mixkv_compress_s"]), ".1f"), _f(_ms(r["kvpress_compress_s"]), ".1f"),
                  _f(r["mixkv_decode_ms_per_token"], ".1f"), _f(r["kvpress_decode_ms_per_token"], ".1f"),
                  _x(r["ratio_decode_ms_per_token"])] for r in rows]
    mem_rows = [[r["context"], r["method"], _f(r["kept_per_head"], ".0f"),
                 _f(_mib(r["mixkv_kv_bytes"]), ".2f"), _f(_mib(r["kvpress_kv_bytes"]), ".2f"), _x(r["ratio_kv_bytes"]),
                 _f(r["mixkv_peak_extra_mib"], ".0f"), _f(r["kvpress_peak_extra_mib"], ".0f"),
                 _acc(r["mixkv_accuracy"], r["mixkv_n"]), _acc(r["kvpress_accuracy"], r["kvpress_n"]),
                 _f(r["same_answer"], ".2f"), _f(r["kept_overlap"], ".3f")] for r in rows]
    t1 = format_table(["context", "method", "tokens", "prefill s mixkv", "prefill s kvpress", "kvpress/mixkv",
                       "compress ms mixkv", "compress ms kvpress", "decode ms/tok mixkv", "decode ms/tok kvpress",
                       "kvpress/mixkv"], time_rows)
    t2 = format_table(["context", "method", "kept/head", "KV MiB mixkv", "KV MiB kvpress", "kvpress/mixkv",
                       "peak +MiB mixkv", "peak +MiB kvpress", "right mixkv", "right kvpress", "same answer",
                       "kept overlap"], mem_rows)
    return f"{t1}\n\n{t2}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def _mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def plot_compare(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Decode ms/token and KV MiB after prefill vs context: mixkv solid, kvpress dashed."""
    from .plots import pyplot, save_figure, time_memory_axes

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    colors = dict(zip((*METHODS, ADAKV_AS_KVPRESS), ("tab:gray", "tab:blue", "tab:orange", "tab:red")))
    for method in dict.fromkeys(r["method"] for r in rows):
        for impl, style in (("mixkv", "-"), ("kvpress", "--")):
            if impl == "kvpress" and method in PEER:
                continue
            pts = sorted((r["context"], r[f"{impl}_decode_ms_per_token"], _mib(r[f"{impl}_kv_bytes"])) for r in rows
                         if r["method"] == method and r[f"{impl}_decode_ms_per_token"] is not None)
            if not pts:
                continue
            kw = {"color": colors.get(method), "marker": "o" if impl == "mixkv" else "s", "label": f"{method} ({impl})"}
            a.plot([p[0] for p in pts], [p[1] for p in pts], style, **kw)
            b.plot([p[0] for p in pts], [p[2] for p in pts], style, **kw)
    time_memory_axes(a, b, "context (tokens)")
    a.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def _strip(runs: Sequence[dict]) -> list[dict]:
    """Runs without the bulky kept positions (their overlap is in the agreement section)."""
    return [{k: v for k, v in r.items() if k != "kept"} for r in runs]


def build_report(spec: dict, mixkv_runs: list[dict], kvpress_data: dict, extra: dict | None = None) -> dict:
    """Score both sides with mixkv's scorer, summarise, pair up; the JSON written by ``mixkv compare``."""
    prompts = {p["id"]: p for p in spec["prompts"]}
    kv_runs = kvpress_data["runs"]
    for r in list(mixkv_runs) + list(kv_runs):
        r["score"] = score_text(prompts[r["prompt_id"]], r.get("text", ""))
    summary = summarize(list(mixkv_runs) + list(kv_runs))
    agree = agreement(mixkv_runs, kv_runs)
    rows = compare_rows(summary, agree)
    return {
        "format": "mixkv-compare", "version": 1, "settings": spec["settings"], "rows": rows,
        "agreement": [{"context": c, "method": m, **v} for (c, m), v in sorted(agree.items())],
        "kvpress": {k: v for k, v in kvpress_data.items() if k != "runs"},
        "runs": {"mixkv": _strip(mixkv_runs), "kvpress": _strip(kv_runs)},
        **(extra or {}),
    }


# ---- the whole job ---------------------------------------------------------------------------------

def run_compare(model_name: str = "smollm2-135m", contexts: Sequence[int] = (1024, 2048, 4096),
                budget: int | None = 128, compression_ratio: float | None = None,
                methods: Sequence[str] = METHODS, tasks: Sequence[str] = ("passkey",), n: int = 6, seed: int = 0,
                window: int = 32, max_new_tokens: int = 10, decode_steps: int = 16, threads: int = 1,
                work_dir: Path | str = "out/compare", gguf: Path | None = None, kvpress_results: Path | None = None,
                allow_setup: bool = True, record_kept: bool = True, crosscheck: bool = True, repo: Path | None = None,
                log: Callable[[str], None] = print) -> dict:
    """Export prompts, run kvpress in its venv, run mixkv, return the report (see :func:`build_report`).

    ``crosscheck`` adds the mixkv-only row ``adakv-as-kvpress``: mixkv's AdaKV with ``floor=0`` and
    ``normalize=False``, which is what kvpress's AdaKV computes while its safeguard
    (``int(0.2 * B)`` tokens per head, window included) only protects window tokens, i.e. for
    ``int(0.2 * B) <= window`` (B < 165 at window 32); its kept positions should then equal kvpress's.
    """
    from .testbeds.smollm2 import ensure_smollm2, load_model

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; compare runs {', '.join(METHODS)}")
    if model_name != "smollm2-135m" and gguf is None:
        raise ValueError("the kvpress side loads a GGUF checkpoint: for a model other than smollm2-135m pass --gguf")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    start = time.perf_counter()
    gguf = Path(gguf) if gguf is not None else ensure_smollm2()
    if model_name == "smollm2-135m":
        model, tokenizer = load_model(model_name)
    else:
        from .testbeds.smollm2 import _load_pretrained

        model, tokenizer = _load_pretrained(str(gguf.parent), gguf.name, torch.float32, "sdpa")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    settings = {"methods": list(methods), "budget": budget, "compression_ratio": compression_ratio,
                "window": window, "kernel": 5, "alpha_safeguard": 0.2, "max_new_tokens": max_new_tokens,
                "decode_steps": decode_steps, "eos_token_ids": eos, "record_kept": record_kept, "warmup": True,
                "threads": threads,
                "mixkv_only_methods": [ADAKV_AS_KVPRESS] if crosscheck and "adakv" in methods else []}
    spec = export_prompts(tokenizer, contexts, tasks, n, seed, settings)
    prompts_path = work / "prompts.json"
    prompts_path.write_text(json.dumps(spec))
    log(f"wrote {len(spec['prompts'])} prompts to {prompts_path}")

    if kvpress_results is not None:
        kv_data = load_kvpress_results(Path(kvpress_results))
        log(f"kvpress side: reusing {kvpress_results}")
    else:
        paths = kvpress_paths(repo)
        python = ensure_kvpress_env(paths, allow_setup)
        out = work / "kvpress.json"
        log(f"kvpress side: {python} {paths['script']} ({threads} threads)")
        kv_data = run_kvpress(python, paths["script"], prompts_path, gguf, out, threads)
    check_kvpress_results(spec, kv_data)
    mixkv_runs = measure_mixkv(model, tokenizer, spec, progress=log)
    from transformers import __version__ as tf_version

    from .cli.common import machine_description

    report = build_report(spec, mixkv_runs, kv_data, extra={
        "model": model_name, "gguf": str(gguf), "threads": threads, "machine": machine_description(),
        "mixkv_versions": {"transformers": tf_version, "torch": torch.__version__},
        "runtime_s": round(time.perf_counter() - start, 1),
        "prompts_file": str(prompts_path),
    })
    return report
