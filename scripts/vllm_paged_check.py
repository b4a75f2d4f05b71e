"""Per-layer and per-head methods in vLLM (#27): what a request holds, how many run at once, decode speed.

Run inside the venv made by `make vllm-env` (`make vllm-paged-check` runs this and the equality check). For every
method of ``--methods`` at every budget of ``--budgets`` one engine serves the toy VLM (the exported LLaVA folder,
float32, image prompts of ~618 tokens) with the plugin and its scheduler trace, in one KV pool of ``--pool-blocks``
blocks, and measures three things in that engine:

* **held blocks**: one request alone, two output tokens; the pool's used blocks at the step after its prompt was
  compressed (what vLLM's block pool accounts), against mixkv's own theory: the tokens the method keeps per head on
  average (``kept_total / (L H)``, :func:`mixkv.integrations.vllm.paging.kept_total`) plus the one output token,
  in blocks of ``block_size`` (a fraction). Target: at most 10% plus one block (one tile per layer and head) above;
* **requests at once**: ``--requests`` held-out image questions sent together; the most running in one step and the
  mean over steps where others waited (the pool was the limit), from the trace; compared with snapkv+mixkv at the
  same budget (target: within 10%);
* **decode seconds per step**: ``--decode-requests`` requests generate ``--decode-tokens + 1`` tokens with EOS
  ignored; the median time between consecutive scheduler steps that only decode all of them (from the trace),
  against snapkv+mixkv's (uniform: vLLM's own kernel) at the same budget (target: at most 1.3x).

Equality of outputs and kept positions with ``mixkv.press`` is checked by ``scripts/vllm_vlm_check.py --parts
press-images --methods ...`` (image and text prompts in one engine) and preemption by ``scripts/vllm_check.py
--parts preemption --preempt-methods ...``; `make vllm-paged-check` runs all three. Results: ``--json`` (key
``memory``; other keys of the file are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import vllm_jobs  # scripts/, beside this file
import vllm_vlm_check as vc  # scripts/, beside this file

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = "snapkv+mixkv,adakv+mixkv,pyramidkv+mixkv,sparsemm+mixkv,headkv+mixkv"
LAYERS, KV_HEADS = 30, 3  # the toy VLM's language model (SmolLM2-135M)


@dataclass
class Job:
    plugin_env: dict[str, str]
    llm_kwargs: dict
    alone: dict
    batch: list[dict]
    decode: list[dict]
    decode_tokens: int
    out: str


def run_job(job: Job) -> None:
    for var in vc.PLUGIN_VARS:
        os.environ.pop(var, None)
    os.environ.update(job.plugin_env)
    from vllm import LLM, SamplingParams

    def prompts(specs: list[dict]) -> list[dict]:
        out = []
        for spec in specs:
            r = vc.Request(**spec)
            out.append({"prompt": r.text, "multi_modal_data": {"image": vc.images_of(r)[0]}})
        return out

    started = time.perf_counter()
    llm = LLM(**job.llm_kwargs)
    ready = time.perf_counter()
    marks = {"alone": time.time()}
    llm.generate(prompts([job.alone]), SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                 use_tqdm=False)
    marks["batch"] = time.time()
    batch = [vc.Request(**s) for s in job.batch]
    outs = llm.generate(prompts(job.batch), [SamplingParams(temperature=0.0, max_tokens=r.max_tokens) for r in batch],
                        use_tqdm=False)
    marks["decode"] = time.time()
    llm.generate(prompts(job.decode), SamplingParams(temperature=0.0, max_tokens=job.decode_tokens + 1,
                                                     ignore_eos=True), use_tqdm=False)
    marks["end"] = time.time()
    Path(job.out).write_text(json.dumps({
        "texts": [o.outputs[0].text for o in outs], "marks": marks, "load_seconds": ready - started,
        "generate_seconds": time.perf_counter() - ready}))


def steps_between(trace: Path, start: float, end: float) -> list:
    from mixkv.integrations.vllm.trace import read_trace

    return [s for s in read_trace(trace) if start <= s.t < end and s.scheduled_tokens > 0]


def decode_seconds(steps: list, requests: int) -> float | None:
    """Median time between consecutive scheduler steps that only decode, all ``requests`` running (one token each):
    the time of one decode step of that batch (the trace line is written as each step is scheduled)."""
    import statistics

    pure = [i for i, s in enumerate(steps) if s.running == requests and s.scheduled_tokens == requests]
    gaps = [steps[i + 1].t - steps[i].t for i in pure if i + 1 < len(steps) and i + 1 in pure]
    return statistics.median(gaps) if gaps else None


def measure(args, method: str, budget: int, work: Path, requests: list, alone, decode: list) -> dict:
    from mixkv import make_method
    from mixkv.core.registry import needs_profile
    from mixkv.integrations.vllm.paging import kept_total
    from mixkv.lab.stats import wilson_interval

    label = f"{method}@{budget}"
    trace = work / f"trace-{label}.jsonl"
    env = {"MIXKV_VLLM_METHOD": method, "MIXKV_VLLM_BUDGET": str(budget), "MIXKV_VLLM_TRACE": str(trace)}
    options = {}
    if needs_profile(method):
        env["MIXKV_VLLM_PROFILE"] = options["profile"] = args.profile
    kwargs = vc.llm_kwargs(args.model, args.block_size, args.pool_blocks * args.block_size * vc.BYTES_PER_TOKEN,
                           max_model_len=1024, max_num_seqs=256)
    job = Job(env, kwargs, asdict(alone), [asdict(r) for r in requests], [asdict(r) for r in decode],
              args.decode_tokens, str(work / f"{label}.json"))
    got = vllm_jobs.launch(job, label, __file__)
    marks = got["marks"]
    alone_steps = steps_between(trace, marks["alone"], marks["batch"])
    # used blocks at the step after compression; the pool's count includes vLLM's null block
    held = alone_steps[1].total_blocks - alone_steps[1].free_blocks - 1 if len(alone_steps) > 1 else None
    prompt_tokens = 618
    per_head = kept_total(make_method(method, budget=budget, **options), prompt_tokens, LAYERS, KV_HEADS) / (
        LAYERS * KV_HEADS)
    theory = (per_head + 1) / args.block_size  # the method's own tokens per head (and one output), in blocks
    batch_steps = steps_between(trace, marks["batch"], marks["decode"])
    queued = [s for s in batch_steps if s.waiting > 0]
    scores = [vc.score_of(r, t) for r, t in zip(requests, got["texts"])]
    lo, hi = wilson_interval(sum(scores), len(scores))
    decode_step = decode_seconds(steps_between(trace, marks["decode"], marks["end"]), len(decode))
    row = {"method": method, "budget": budget, "held_blocks": held, "theory_blocks": theory,
           "held_over_theory": held / theory if held else None,
           "within_target": bool(held is not None and held <= 1.1 * theory + 1),
           "kept_tokens_per_head": per_head, "max_running": max((s.running for s in batch_steps), default=0),
           "mean_running_while_queued": sum(s.running for s in queued) / len(queued) if queued else None,
           "preemptions": sum(len(s.preempted) for s in batch_steps),
           "accuracy": 100 * sum(scores) / len(scores), "ci95": [100 * lo, 100 * hi], "n": len(scores),
           "decode_seconds_per_step": decode_step, "decode_requests": len(decode),
           "load_seconds": got["load_seconds"]}
    print(f"    held {held} blocks (theory {theory:.2f}); running at once max {row['max_running']}, mean while queued "
          f"{row['mean_running_while_queued'] or 0:.1f}; accuracy {row['accuracy']:.1f}% n={len(scores)}; decode "
          f"{1000 * (decode_step or 0):.1f} ms per step ({len(decode)} requests)", flush=True)
    return row


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, default=vc.DEFAULT_MODEL)
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="the first is the uniform reference")
    ap.add_argument("--budgets", default="64,128")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--pool-blocks", type=int, default=64, help="KV pool (64: three full toy-VLM requests)")
    ap.add_argument("--requests", type=int, default=8, help="image requests per task sent together")
    ap.add_argument("--seed-start", type=int, default=5000, help="held-out sample seeds (request i of task t: "
                    "seed + 5 i + t)")
    ap.add_argument("--decode-requests", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--profile", default=None, help="profile for sparsemm / headkv (default: the toy VLM's shipped)")
    ap.add_argument("--shared", action="store_true", help="say in the JSON that other jobs shared the cores")
    ap.add_argument("--json", type=Path, default=ROOT / "results" / "vllm-paged.json")
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.budgets = [int(b) for b in args.budgets.split(",")]
    if args.profile is None:
        from mixkv.testbeds.sources import shipped_profile

        args.profile = str(shipped_profile("toy-vlm-24"))
    return args


def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.job:
        run_job(Job(**json.loads(Path(args.job).read_text())))
        return 0
    if not (args.model / "config.json").is_file():
        print(f"no model folder at {args.model}: run `make vllm-env`", file=sys.stderr)
        return 2
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(args.model))
    requests = [vc.image_request(processor, args.seed_start + 5 * i + t, task)
                for i in range(args.requests) for t, task in enumerate(vc.TASKS)]
    alone = vc.image_request(processor, args.seed_start - 1, "colour")
    decode = requests[: args.decode_requests]
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mixkv-vllm-paged-") as tmp:
        for budget in args.budgets:
            for method in args.methods:
                print(f"[{method}@{budget}] pool {args.pool_blocks} blocks of {args.block_size}", flush=True)
                rows.append(measure(args, method, budget, Path(tmp), requests, alone, decode))
    for row in rows:  # against the uniform reference at the same budget
        ref = next(r for r in rows if r["budget"] == row["budget"] and r["method"] == args.methods[0])
        row["running_vs_reference"] = (row["mean_running_while_queued"] / ref["mean_running_while_queued"]
                                       if row["mean_running_while_queued"] and ref["mean_running_while_queued"]
                                       else None)
        row["decode_vs_reference"] = (row["decode_seconds_per_step"] / ref["decode_seconds_per_step"]
                                      if row["decode_seconds_per_step"] and ref["decode_seconds_per_step"] else None)
    report = json.loads(args.json.read_text()) if args.json.is_file() else {}
    sharing = "2 CPU cores shared with other jobs" if args.shared else "machine otherwise idle"
    report["memory"] = {"rows": rows, "reference": args.methods[0], "pool_blocks": args.pool_blocks,
                        "block_size": args.block_size, "requests": len(requests), "seeds": f"{args.seed_start}+",
                        "decode_tokens": args.decode_tokens, "machine": f"{vc.machine()}; {sharing}",
                        "command": " ".join(["scripts/vllm_paged_check.py", *raw]),
                        "seconds": round(time.perf_counter() - started)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=float))
    print("| method | budget | held blocks (theory) | at once, mean queued (x ref) | decode ms/step (x ref) | acc % |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['budget']} | {r['held_blocks']} ({r['theory_blocks']:.2f}) | "
              f"{r['mean_running_while_queued'] or 0:.1f} ({r['running_vs_reference'] or 0:.2f}) | "
              f"{1000 * (r['decode_seconds_per_step'] or 0):.1f} ({r['decode_vs_reference'] or 0:.2f}) | "
              f"{r['accuracy']:.0f} |")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
