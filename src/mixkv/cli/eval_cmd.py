"""``mixkv eval``: accuracy of methods x budgets on the generated long-context suite."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import report
from ..evaluation import EvalConfig, evaluate, mean_over_tasks, text_items
from ..testbeds import tasks as task_suite
from .common import TOY_VLM, load, machine_description, parse_list, setup_threads, write_json


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="accuracy of methods x budgets on a generated task suite")
    p.add_argument("--model", default="smollm2-135m",
                   help=f"smollm2-135m, {TOY_VLM} (our trained VLM), a local directory or a hub id")
    p.add_argument("--methods", default="full,snapkv,snapkv+mixkv,pyramidkv,pyramidkv+mixkv")
    p.add_argument("--budgets", default="64,128,256")
    p.add_argument("--tasks", default=None,
                   help=f"default: all text tasks ({','.join(task_suite.TASKS)}); {TOY_VLM}: colour,shape,text")
    p.add_argument("--length", type=int, default=1500, help="prompt length in tokens (approximate)")
    p.add_argument("--n", type=int, default=20, help="samples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=20,
                   help="the LLM answers with a sentence before the value: 10 tokens can cut it off")
    p.add_argument("--profile", default=None, help="calibration profile (SparseMM head scores, offline redundancy)")
    p.add_argument("--redundancy", default="online", choices=["online", "profile"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write results here (JSON)")
    p.add_argument("--plot", default=None, help="write a PNG of accuracy vs budget here")
    p.add_argument("--from-json", default=None, help="no run: print the table and draw --plot from this JSON")
    p.set_defaults(run=run)


def _title(payload: dict) -> str:
    cfg = payload["config"]
    tokens = cfg.get("prompt_tokens") or {}
    span = f"{tokens.get('min')}-{tokens.get('max')} prompt tokens" if tokens else ""
    return f"{payload['model']}: accuracy vs budget (n={cfg.get('n')}/task, {span})"


def replot(args) -> int:
    payload = load_results(args.from_json)
    print(report.accuracy_tables(payload["results"]))
    if args.plot:
        print(f"wrote {report.plot_accuracy(payload['results'], args.plot, _title(payload))}")
    return 0


def run(args) -> int:
    if args.from_json:
        return replot(args)
    threads = setup_threads(args.threads)
    config = EvalConfig(methods=parse_list(args.methods), budgets=parse_list(args.budgets, int),
                        max_new_tokens=args.max_new_tokens, window=args.window, profile=args.profile,
                        redundancy=args.redundancy)
    config.validate()
    start = time.perf_counter()
    if args.model == TOY_VLM:
        from ..testbeds.toyvlm import generator as gen
        from ..testbeds.toyvlm.model import eval_items

        names = parse_list(args.tasks or ",".join(gen.DEFAULT_TASKS))
        unknown = [t for t in names if t not in gen.TASKS]
        if unknown:
            raise ValueError(f"unknown toy-vlm task(s) {unknown}; accepted: {', '.join(gen.TASKS)}")
        model, tokenizer = load(args.model, args.dtype)
        samples = [gen.make_sample(args.seed + i, task=t) for t in names for i in range(args.n)]
        items = eval_items(tokenizer, samples)
    else:
        names = task_suite.validate_tasks(parse_list(args.tasks or ",".join(task_suite.TASKS)))
        model, tokenizer = load(args.model, args.dtype)
        samples = task_suite.make_suite(names, args.n, args.seed, args.length, tokenizer)
        items = text_items(tokenizer, samples, task_suite.build_prompt, task_suite.score, model.device)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    out = evaluate(model, items, config, lambda ids: tokenizer.decode(ids, skip_special_tokens=True), eos)
    results = out["results"] + mean_over_tasks(out["results"])
    elapsed = time.perf_counter() - start
    lengths = [it.meta["tokens"] for it in items]
    payload = {
        "model": args.model,
        "results": results,
        "config": {
            "methods": list(config.methods), "budgets": list(config.budgets), "tasks": names, "n": args.n,
            "seed": args.seed, "length": args.length, "window": args.window,
            "max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "threads": threads,
            "prompt_tokens": {"min": min(lengths), "max": max(lengths)} if lengths else None,
            "machine": machine_description(), "runtime_s": round(elapsed, 1), "timing": out["timing"],
        },
        "samples": out["samples"],
    }
    print(report.accuracy_tables(results))
    print(f"\n{len(items)} prompts, {len(config.grid())} method/budget runs each, "
          f"{elapsed:.0f} s on {machine_description()}")
    if args.json:
        print(f"wrote {write_json(payload, args.json)}")
    if args.plot:
        print(f"wrote {report.plot_accuracy(results, args.plot, _title(payload))}")
    return 0


def load_results(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
