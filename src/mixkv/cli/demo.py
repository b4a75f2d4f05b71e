"""``mixkv demo``: the main job. Load a trained model offline (by default our toy VLM), answer
questions with the full cache and with compressed caches, print answers / KV memory / time,
and write a PNG of what each method kept."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..core import defaults
from ..core.capture import capture_prefill
from ..core.registry import make_method
from ..lab import report
from ..lab.run import run_method
from ..testbeds import sources
from .common import check_outputs, machine_description, nonneg_int, parse_list, positive_int, setup_threads


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="answer generated prompts with full and compressed caches")
    p.add_argument("--model", default=sources.TOY_VLM,
                   help=f"{sources.TOY_VLM} (default), {sources.TOY_VLM_24}, {sources.SMOLLM2}, or a checkpoint")
    p.add_argument("--methods", default="full,snapkv,snapkv+mixkv,adakv,adakv+mixkv")
    p.add_argument("--budget", type=positive_int, default=defaults.BUDGET)
    p.add_argument("--window", type=positive_int, default=defaults.WINDOW)
    p.add_argument("--tasks", default=None,
                   help="toy VLMs: the tasks they were trained on; LLMs: passkey,kv_retrieval,redundant")
    p.add_argument("--length", type=positive_int, default=1500, help="LLM prompts: length in tokens")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--max-new-tokens", type=positive_int, default=12)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--out", default="out/demo.png", help="PNG of the kept tokens")
    p.set_defaults(run=run)


@dataclass
class Prompt:
    """One demo question: model inputs, expected answer, scorer, and what to draw."""

    task: str
    inputs: dict
    answer: str
    score: object
    picture: dict


def _vlm_prompts(processor, tasks: list[str], seed: int) -> list[Prompt]:
    from ..testbeds.toyvlm import generator as gen

    out = []
    for i, task in enumerate(tasks):
        s = gen.make_sample(seed + i, task=task, grid=processor.grid)
        inputs = processor.sample_inputs(s)
        start = processor.image_start(inputs["input_ids"])
        out.append(Prompt(task, inputs, s.answer, lambda text, s=s: gen.score(s, text),
                          {"image": s.image, "grid": (processor.grid, processor.grid),
                           "answer_patches": s.answer_patches,
                           "image_positions": list(range(start, start + processor.num_image_tokens)),
                           "question": s.question}))
    return out


def _text_prompts(tokenizer, tasks: list[str], seed: int, length: int) -> list[Prompt]:
    from ..testbeds import tasks as task_suite

    out = []
    for s in task_suite.make_suite(task_suite.validate_tasks(tasks), 1, seed, length, tokenizer):
        text = task_suite.build_prompt(tokenizer, s)
        enc = dict(tokenizer(text, return_tensors="pt", add_special_tokens=False))
        out.append(Prompt(s.task, enc, s.answer, lambda t, s=s: task_suite.score(s, t), {"text": text}))
    return out


def run(args) -> int:
    methods = parse_list(args.methods)
    for name in methods:  # fail before loading anything
        make_method(name, budget=args.budget, window=args.window)
    check_outputs(args.out)
    sources.check_model_name(args.model)
    setup_threads(args.threads)
    is_vlm = sources.is_toy_vlm(args.model)
    t0 = time.perf_counter()
    model, processor = sources.load(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s on {machine_description()}")
    if is_vlm:
        prompts = _vlm_prompts(processor, parse_list(args.tasks or ",".join(processor.tasks)), args.seed)
    else:
        prompts = _text_prompts(processor, parse_list(args.tasks or "passkey,kv_retrieval,redundant"), args.seed,
                                args.length)
    decode = processor.decode if hasattr(processor, "decode") else processor.tokenizer.decode
    eos = {processor.eos_token_id} if processor.eos_token_id is not None else set()
    rows, drawn = [], None
    num_layers = None
    for prompt in prompts:
        pre = capture_prefill(model, prompt.inputs, window=args.window)
        num_layers = len(pre.layers)
        question = prompt.picture.get("question", f"{prompt.task} prompt")
        print(f"\n[{prompt.task}] {question} — {pre.prompt_length} prompt tokens, prefill {pre.seconds:.1f} s, "
              f"expected: {prompt.answer}")
        full_bytes, kept = None, {}
        for name in methods:
            method = make_method(name, budget=args.budget, window=args.window)
            run = run_method(model, pre, method, args.max_new_tokens, eos)
            tokens, plans, nbytes, secs, dec = run.tokens, run.plans, run.kv_bytes, run.compress_seconds, \
                run.decode_seconds
            full_bytes = nbytes if method is None else full_bytes
            text = decode(tokens, skip_special_tokens=True).strip()
            ok = prompt.score(text) == 1.0
            print(f"  {name:<16} {'right' if ok else 'wrong'}  {text!r}")
            share = f"{100 * nbytes / full_bytes:.1f}%" if full_bytes else "-"
            rows.append([prompt.task, name, "yes" if ok else "no", f"{nbytes / 2**20:.2f}", share,
                         f"{1000 * secs:.0f}", f"{1000 * dec / max(len(tokens) - 1, 1):.0f}"])
            if plans:
                kept[name] = plans
        if drawn is None or prompt.task == "text":
            drawn = (prompt, pre.prompt_length, kept)
        del pre
    print()
    print(report.format_table(["task", "method", "right", "KV MiB", "of full", "compress ms", "decode ms/token"],
                              rows))
    if drawn is not None and drawn[2] and args.out:
        prompt, n, kept = drawn
        path = Path(args.out)
        title = f"{args.model}: kept tokens at budget {args.budget}/head"
        if "image" in prompt.picture:
            from ..lab.analysis_figures import plot_kept_patches

            pic = prompt.picture
            plot_kept_patches(pic["image"], pic["grid"], pic["image_positions"], kept, num_layers, n, path,
                              title=f"{title} — {pic['question']} (answer {prompt.answer})",
                              answer_patches=pic["answer_patches"])
        else:
            from ..lab.figures import plot_kept_positions

            plot_kept_positions(kept, n, path, title=f"{title} (share of KV heads keeping each position)")
        print(f"\nwrote {path}")
    return 0
