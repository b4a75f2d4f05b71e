"""``mixkv analyze``: PNG figures of head redundancy and of what SnapKV / MixKV keep
(see :mod:`mixkv.lab.analysis_figures` for what each figure shows)."""

from __future__ import annotations

import time

from ..core import defaults
from ..core.profiles import load_profile
from ..lab import report
from ..lab.analyze import analyze
from ..lab.calibration.sources import generated_samples
from ..testbeds import sources
from .common import check_outputs, machine_description, nonneg_int, positive_int, setup_threads


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="figures: redundancy heat map, key similarity, coverage, kept patches")
    p.add_argument("--model", default=sources.SMOLLM2, help="smollm2-135m, toy-vlm, a local directory or a hub id")
    p.add_argument("--out", required=True, help="directory for the PNG files")
    p.add_argument("--profile", default=None, help="calibration profile: heat map and MixKV's offline redundancy")
    p.add_argument("--budget", type=positive_int, default=defaults.BUDGET)
    p.add_argument("--window", type=positive_int, default=defaults.WINDOW)
    p.add_argument("--n", type=positive_int, default=3, help="generated prompts for the online redundancy heat map")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--length", type=positive_int, default=800, help="tokens per generated text prompt")
    p.add_argument("--task", default="redundant", help="task of the prompt drawn in figures b-d (when present)")
    p.add_argument("--layer", type=int, default=None, help="layer of figures b-c (default: most redundant head)")
    p.add_argument("--head", type=int, default=None, help="KV head of figures b-c")
    p.add_argument("--dtype", default="float32", choices=sorted(sources.DTYPES))
    p.add_argument("--threads", type=positive_int, default=None)
    p.set_defaults(run=run)


def run(args) -> int:
    if (args.layer is None) != (args.head is None):
        raise ValueError("give both --layer and --head, or neither")
    if args.budget <= args.window:
        raise ValueError(f"--budget ({args.budget}) must exceed the window ({args.window}): it counts the window")
    check_outputs(f"{args.out}/redundancy_heatmap.png")
    sources.check_model_name(args.model)
    profile = load_profile(args.profile) if args.profile else None
    if profile is not None and profile.key_redundancy is None:
        raise ValueError(f"profile {args.profile!r} has no key_redundancy (only {', '.join(profile.fields())}); "
                         "make one with `mixkv calibrate`")
    threads = setup_threads(args.threads)
    start = time.perf_counter()
    model, processor = sources.load(args.model, args.dtype)
    samples, _ = generated_samples(args.model, processor, args.n, seed=args.seed, length=args.length)
    focus = next((i for i, s in enumerate(samples) if s.meta.get("task") == args.task), 0)
    result = analyze(model, samples, args.out, model_name=args.model, budget=args.budget, window=args.window,
                     focus=focus, layer=args.layer, head=args.head, profile=profile)
    s = result.summary
    print(f"key redundancy ({s['redundancy_source']}): {s['redundancy_min']:.3f}..{s['redundancy_max']:.3f}, "
          f"mean {s['redundancy_mean']:.3f}")
    print("per-layer mean: " + " ".join(f"{v:.2f}" for v in s["redundancy_per_layer"]))
    print(f"figures b-c: {samples[focus].name} ({s['prompt_tokens']} tokens), layer {s['layer']}, KV head {s['head']}")
    for name, value in s.get("group_similarity_mean", {}).items():
        print(f"  mean token similarity, {name}: {value:.3f} (redundancy over heads "
              f"{s['group_redundancy_mean_over_heads'][name]:.3f})")
    if "answer_tokens_kept_share" in s:
        print(report.format_table(["method", "answer tokens kept (share of all KV heads)"],
                                  [[k, f"{v:.2f}"] for k, v in s["answer_tokens_kept_share"].items()]))
    for kind, path in result.files.items():
        print(f"wrote {path} ({kind})")
    for kind, why in result.skipped.items():
        print(f"skipped {kind}: {why}")
    print(f"{time.perf_counter() - start:.0f} s, {machine_description()}, {threads} threads")
    return 0
