"""``mixkv eval``: accuracy of methods x budgets on a generated task suite (text, or the toy VLM's)."""

from __future__ import annotations

import time
from pathlib import Path

from ..core import defaults
from ..core.models import inspect_model
from ..lab import report
from ..lab.evaluation import EvalConfig, evaluate, mean_over_tasks, text_items, toyvlm_items
from ..lab.gap import answer_observer, gap_payload
from ..testbeds import sources
from ..testbeds import tasks as task_suite
from .common import (
    check_outputs,
    load_results,
    machine_description,
    nonneg_int,
    parse_list,
    positive_int,
    positive_ints,
    setup_threads,
    write_json,
    write_partial_json,
)


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="accuracy of methods x budgets on a generated task suite")
    p.add_argument("--model", default=sources.SMOLLM2,
                   help=f"{sources.SMOLLM2}, {sources.TOY_VLM} / {sources.TOY_VLM_24} (our trained VLMs: 256 / 576 "
                        "visual tokens), a local directory or a hub id")
    p.add_argument("--methods", default="full,snapkv,snapkv+mixkv,pyramidkv,pyramidkv+mixkv")
    p.add_argument("--budgets", default="64,128,256")
    p.add_argument("--tasks", default=None,
                   help=f"default: all text tasks ({','.join(task_suite.TASKS)}); toy VLMs: their trained tasks")
    p.add_argument("--length", type=positive_ints, default=[1500],
                   help="prompt length in tokens (approximate); a list (1000,2000,3000) gives sample i of each task "
                        "the (i mod k)-th length")
    p.add_argument("--n", type=positive_int, default=20, help="samples per task")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--window", type=positive_int, default=defaults.WINDOW)
    p.add_argument("--max-new-tokens", type=positive_int, default=20,
                   help="the LLM answers with a sentence before the value: 10 tokens can cut it off")
    p.add_argument("--profile", default=None,
                   help="calibration profile (SparseMM head scores, HeadKV retrieval scores, offline redundancy); "
                        "default: the profile shipped for smollm2-135m, toy-vlm and toy-vlm-24 when a method needs one")
    p.add_argument("--redundancy", default="online", choices=["online", "profile"])
    p.add_argument("--stack", type=positive_int, default=1,
                   help="decode up to this many compressed (method, budget) runs of a prompt as one batch: the same "
                        "kept tokens, many times faster on CPU (weights read once per step); 1 = one at a time, "
                        "exactly as press decodes")
    p.add_argument("--dtype", default="float32", choices=sorted(sources.DTYPES))
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--json", default=None,
                   help="write results here (JSON). On Ctrl-C what was measured is saved, marked "
                        "\"interrupted\": true: here if the file does not exist yet, else to <JSON>.partial.json "
                        "(an earlier results file is never replaced by a partial run)")
    p.add_argument("--plot", default=None,
                   help="write a PNG of accuracy vs budget here (--followup: of the follow-up answers)")
    p.add_argument("--task-plot", default=None,
                   help="write a PNG with one accuracy-vs-budget panel per task here (--followup: the follow-up "
                        "answers, per follow-up task)")
    p.add_argument("--gap-plot", default=None,
                   help="toy VLMs: record which answer tokens each method kept and draw the gap analysis here")
    p.add_argument("--gap-budget", type=positive_int, default=64, help="budget of the gap plot's middle/right panels")
    p.add_argument("--from-json", default=None,
                   help="no run: print the tables and draw --plot / --task-plot / --gap-plot from this JSON")
    p.add_argument("--followup", action="store_true",
                   help=f"{sources.TOY_VLM} only: ask a second question on the first one's compressed cache "
                        "(two generate calls inside one press) and score both answers; not with --gap-plot")
    p.set_defaults(run=run)


def _title(payload: dict) -> str:
    cfg = payload.get("config") or {}
    tokens = cfg.get("prompt_tokens") or {}
    span = f"{tokens.get('min')}-{tokens.get('max')} prompt tokens" if tokens else ""
    window = f", window {cfg['window']}" if cfg.get("window") else ""
    return f"{payload.get('model', '?')}: accuracy vs budget (n={cfg.get('n')}/task, {span}{window})"


def replot(args) -> int:
    check_outputs(args.plot, args.task_plot, args.gap_plot)
    payload = load_results(args.from_json)
    print(report.accuracy_tables(payload["results"]))
    _figures(args, payload)
    return 0


def _figures(args, payload: dict) -> None:
    """Draw the figures asked for; print the gap table when the payload has one."""
    results = payload["results"]
    if args.plot and results:
        from ..lab.figures import plot_accuracy

        print(f"wrote {plot_accuracy(results, args.plot, _title(payload))}")
    if args.task_plot and results:
        from ..lab.figures import plot_accuracy_by_task

        print(f"wrote {plot_accuracy_by_task(results, args.task_plot, _title(payload))}")
    gap = payload.get("gap")
    if gap:
        print("\n" + report.gap_table(gap["summary"], results))
    if args.gap_plot:
        if not gap:
            raise ValueError("no gap analysis in these results: run with --gap-plot on a toy VLM")
        import torch

        from ..lab.figures import plot_gap

        maps = {k.rsplit("@", 1)[0]: torch.tensor(v) for k, v in gap["heads"].items()
                if k.endswith(f"@{args.gap_budget}")}
        if not maps:
            raise ValueError(f"no budget {args.gap_budget} in the gap records; "
                             f"budgets: {sorted({r['budget'] for r in gap['summary'] if r['budget']})}")
        title = f"{payload.get('model')}: why compressed caches trail the full one"
        print(f"wrote {plot_gap(gap['summary'], maps, args.gap_plot, title, args.gap_budget)}")


def _task_names(args) -> list[str]:
    if sources.is_toy_vlm(args.model):
        from ..testbeds.toyvlm import generator as gen

        trained = sources.toy_vlm_config(args.model).get("tasks", list(gen.DEFAULT_TASKS))
        names = parse_list(args.tasks or ",".join(trained))
        unknown = [t for t in names if t not in gen.TASKS]
        if unknown:
            raise ValueError(f"unknown toy-vlm task(s) {unknown}; accepted: {', '.join(gen.TASKS)}")
        untrained = [t for t in names if t not in trained]
        if untrained:
            raise ValueError(f"{args.model} was not trained on {untrained}; its tasks: {', '.join(trained)}")
        return names
    return task_suite.validate_tasks(parse_list(args.tasks or ",".join(task_suite.TASKS)))


def shipped_profile_for(config: EvalConfig, model: str) -> str | None:
    """The profile shipped for ``model`` when a method of ``config`` needs one and none was given."""
    shipped = sources.shipped_profile(model)
    if shipped is None or not config.uses_profile():
        return None
    print(f"profile: the one shipped for {model} ({shipped}); --profile PATH to use another")
    return str(shipped)


def _profile_label(profile, model: str) -> str | None:
    """How the JSON names the profile a run read: the shipped one by its package path, another as given."""
    if profile is None:
        return None
    shipped = sources.shipped_profile(model)
    if shipped is not None and Path(profile).resolve() == shipped.resolve():
        return f"shipped: src/mixkv/testbeds/profiles/{shipped.name}"
    return str(profile)


def run(args) -> int:
    if args.from_json:
        return replot(args)
    # Everything that can be wrong is checked before the model loads.
    check_outputs(args.json, args.plot, args.task_plot, args.gap_plot)
    if args.gap_plot and not sources.is_toy_vlm(args.model):
        raise ValueError("--gap-plot needs the toy VLM (toy-vlm): its samples know where the answer is")
    if args.gap_plot and args.followup:
        raise ValueError("--gap-plot does not apply to --followup: the gap analysis records single-question runs; "
                         "drop one of the two (--plot and --task-plot do work with --followup)")
    sources.check_model_name(args.model)
    if args.profile is not None and not Path(args.profile).is_file():
        raise FileNotFoundError(f"calibration profile {args.profile!r} does not exist")
    config = EvalConfig(methods=parse_list(args.methods), budgets=parse_list(args.budgets, int),
                        max_new_tokens=args.max_new_tokens, window=args.window, profile=args.profile,
                        redundancy=args.redundancy, stack=args.stack)
    if config.profile is None:
        config.profile = shipped_profile_for(config, args.model)
    config.validate()
    if args.gap_plot and args.gap_budget not in config.budgets:
        raise ValueError(f"--gap-budget {args.gap_budget} is not among --budgets {list(config.budgets)}; "
                         "pick one of them for the gap plot")
    names = _task_names(args)
    if args.followup:
        return run_followup_eval(args, config, names)
    threads = setup_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = sources.load(args.model, args.dtype)
    if sources.is_toy_vlm(args.model):
        from ..testbeds.toyvlm import generator as gen

        # tasks interleaved, so an interrupted run (Ctrl-C keeps what was measured) covers every task
        samples = [gen.make_sample(args.seed + i, task=t, grid=tokenizer.grid) for i in range(args.n) for t in names]
        items = toyvlm_items(tokenizer, samples)
    else:
        samples = task_suite.make_suite(names, args.n, args.seed, args.length, tokenizer)
        items = text_items(tokenizer, samples, task_suite.build_prompt, task_suite.score, model.device)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    observe = answer_observer(model) if args.gap_plot else None
    out = evaluate(model, items, config, lambda ids: tokenizer.decode(ids, skip_special_tokens=True), eos,
                   observe=observe)
    results = out["results"] + mean_over_tasks(out["results"])
    elapsed = time.perf_counter() - start
    lengths = [it.meta["tokens"] for it in items]
    payload = {
        "model": args.model,
        "results": results,
        "interrupted": out["interrupted"],
        "config": {
            "methods": list(config.methods), "budgets": list(config.budgets), "tasks": names, "n": args.n,
            "seed": args.seed,
            "length": args.length[0] if len(args.length) == 1 else args.length, "window": args.window,
            "max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "threads": threads, "stack": config.stack,
            "redundancy": config.redundancy, "profile": _profile_label(config.profile, args.model),
            "prompt_tokens": {"min": min(lengths), "max": max(lengths)} if lengths else None,
            "machine": machine_description(), "runtime_s": round(elapsed, 1), "timing": out["timing"],
        },
        "samples": out["samples"],
    }
    if observe is not None:
        payload["gap"] = gap_payload(out["samples"], inspect_model(model).num_layers)
    if results:
        print(report.accuracy_tables(results))
    print(f"\n{len(items)} prompts, {len(config.grid())} method/budget runs each, window {args.window}, "
          f"{elapsed:.0f} s on {machine_description()}")
    if args.json and out["interrupted"]:
        written = write_partial_json(payload, args.json)
        kept = "" if written == Path(args.json) else f"; {args.json}, from an earlier run, left as it was"
        print(f"wrote {written} (partial: interrupted{kept})")
    elif args.json:
        print(f"wrote {write_json(payload, args.json)}")
    _figures(args, payload)
    if out["interrupted"]:
        raise KeyboardInterrupt
    return 0


def run_followup_eval(args, config: EvalConfig, names: list[str]) -> int:
    """``--followup``: first answer and follow-up answer per method and budget (toy VLM)."""
    from ..lab.followup import followup_pairs, run_followup

    if not sources.is_toy_vlm(args.model):
        raise ValueError(f"--followup needs the toy VLM ({sources.TOY_VLM}): its training conversations ask "
                         "several questions about one image")
    if len(names) < 2:
        raise ValueError(f"--followup needs at least two tasks, got {names}")
    threads = setup_threads(args.threads)
    start = time.perf_counter()
    model, processor = sources.load(args.model, args.dtype)
    pairs = followup_pairs(args.n * len(names), args.seed, names, processor.grid)
    rows = run_followup(model, processor, pairs, config.methods, config.budgets, args.window, args.max_new_tokens,
                        progress=lambda m: print(f"  {m} ({time.perf_counter() - start:.0f} s)", flush=True))
    means = {(r["method"], r["budget"], r["turn"]): r["accuracy"] for r in rows if r["task"] == "mean"}
    keys = list(dict.fromkeys((r["method"], r["budget"]) for r in rows))
    print(report.format_table(
        ["method", "budget", "first question", "follow-up", *[f"follow-up {t}" for t in names]],
        [[m, b or "-", f"{means[(m, b, 'first')]:.1f}", f"{means[(m, b, 'followup')]:.1f}",
          *[next((f"{r['accuracy']:.1f}" for r in rows if (r["method"], r["budget"], r["turn"], r["task"])
                  == (m, b, "followup", t)), "-") for t in names]] for m, b in keys]))
    elapsed = time.perf_counter() - start
    machine = machine_description()
    print(f"\n{len(pairs)} image/question pairs (seeds {args.seed}..{args.seed + len(pairs) - 1}), window "
          f"{args.window}; {machine}, {threads} threads, {elapsed:.0f} s")
    if args.json:
        payload = {"model": args.model, "followup": rows,
                   "config": {"pairs": len(pairs), "seed": args.seed, "tasks": names, "methods": config.methods,
                              "budgets": config.budgets, "window": args.window, "threads": threads,
                              "machine": machine, "seconds": elapsed}}
        print(f"wrote {write_json(payload, args.json)}")
    _followup_figures(args, rows, f"{args.model}: follow-up answers ({len(pairs)} pairs, window {args.window})")
    return 0


def _followup_figures(args, rows: list[dict], title: str) -> None:
    """``--plot`` / ``--task-plot`` of a follow-up run: the follow-up answers, drawn as an eval's results."""
    from ..lab.followup import turn_results

    results = turn_results(rows, "followup")
    if args.plot and results:
        from ..lab.figures import plot_accuracy

        print(f"wrote {plot_accuracy(results, args.plot, title)}")
    if args.task_plot and results:
        from ..lab.figures import plot_accuracy_by_task

        print(f"wrote {plot_accuracy_by_task(results, args.task_plot, title)}")
