"""``mixkv calibrate``: measure a model's per-(layer, KV head) redundancy, SparseMM visual-head scores
and HeadKV retrieval-reasoning scores into a calibration profile (format: :mod:`mixkv.core.profiles`;
method: :mod:`mixkv.lab.calibration`)."""

from __future__ import annotations

import time
from pathlib import Path

from ..lab import report
from ..lab.calibration.run import calibrate, partial_path
from ..lab.calibration.sources import DEFAULT_SEED, generated_samples, read_jsonl
from ..testbeds import sources
from .common import check_outputs, machine_description, nonneg_int, positive_int, setup_threads


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="write a calibration profile (offline redundancy, SparseMM head scores, "
                                           "HeadKV retrieval scores)")
    p.add_argument("--model", default=sources.SMOLLM2, help="smollm2-135m, toy-vlm, a local directory or a hub id")
    p.add_argument("--data", default="generated",
                   help="'generated' (the library's prompts for this model) or a JSONL file of "
                        '{"prompt": ..., "answer_span": [start, end], "answer": ...} lines')
    p.add_argument("--n", type=positive_int, default=64, help="number of calibration prompts")
    p.add_argument("--out", required=True, help="profile JSON path (written only when complete)")
    p.add_argument("--seed", type=nonneg_int, default=DEFAULT_SEED, help="seed of generated prompts (eval uses 0)")
    p.add_argument("--length", type=positive_int, default=1024, help="tokens per generated text prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=16,
                   help="greedy tokens decoded for head and retrieval scores")
    p.add_argument("--hits-on", default="answer", choices=["answer", "all"],
                   help="decoded steps that count for head and retrieval scores: tokens of the answer, or all")
    p.add_argument("--resume", action="store_true", help="continue from <out>.partial.json")
    p.add_argument("--save-every", type=positive_int, default=4, help="write <out>.partial.json every k prompts")
    p.add_argument("--dtype", default="float32", choices=sorted(sources.DTYPES))
    p.add_argument("--threads", type=positive_int, default=None)
    p.set_defaults(run=run)


def load_samples(model_name: str, processor, data: str, n: int, seed: int, length: int):
    if data == "generated":
        return generated_samples(model_name, processor, n, seed=seed, length=length)
    return read_jsonl(data, processor, n)


def _top_heads(scores, fmt: str, k: int = 5) -> str:
    """The ``k`` highest-scoring heads as ``(layer, head, score)``, ties in (layer, head) order."""
    rows, cols = scores.shape
    top = sorted((-float(scores[i, j]), i, j) for i in range(rows) for j in range(cols))[:k]
    return ", ".join(f"({i}, {j}, {fmt.format(-v)})" for v, i, j in top)


def run(args) -> int:
    check_outputs(args.out, partial_path(args.out))
    sources.check_model_name(args.model)
    if args.data != "generated" and not Path(args.data).is_file():
        raise FileNotFoundError(f"calibration data {args.data!r} does not exist (or pass --data generated)")
    if partial_path(args.out).exists() and not args.resume:
        raise ValueError(f"{partial_path(args.out)} holds an interrupted calibration; pass --resume to continue it, "
                         "or delete it to start over")
    threads = setup_threads(args.threads)
    start = time.perf_counter()
    model, processor = sources.load(args.model, args.dtype)
    loaded = time.perf_counter() - start
    samples, data = load_samples(args.model, processor, args.data, args.n, args.seed, args.length)
    lengths = [s.length for s in samples]
    eos = {processor.eos_token_id} if getattr(processor, "eos_token_id", None) is not None else set()
    print(f"{args.model}: {len(samples)} prompts of {min(lengths)}-{max(lengths)} tokens ({data['source']}); "
          f"partial progress in {partial_path(args.out)}")
    t0 = time.perf_counter()
    try:
        profile = calibrate(model, samples, args.out, model_id=args.model, data=dict(data, dtype=args.dtype),
                            decode=processor.decode, max_new_tokens=args.max_new_tokens, eos_token_ids=eos,
                            hits_on=args.hits_on, resume=args.resume, save_every=args.save_every)
    except KeyboardInterrupt:
        if partial_path(args.out).exists():
            print(f"\nprogress saved in {partial_path(args.out)}; rerun with --resume to continue")
        raise
    measured = time.perf_counter() - t0
    kr = profile.key_redundancy
    rows = [[layer, *(f"{float(v):.3f}" for v in kr[layer])] for layer in range(profile.num_layers)]
    print(report.format_table(["layer", *(f"head {h}" for h in range(profile.num_kv_heads))], rows))
    print(f"key redundancy {float(kr.min()):.3f}..{float(kr.max()):.3f} (mean {float(kr.mean()):.3f}); value "
          f"redundancy {float(profile.value_redundancy.min()):.3f}..{float(profile.value_redundancy.max()):.3f}")
    if profile.head_scores is not None:
        print(f"head scores from {profile.data['counted_steps']} decoded answer tokens; top SparseMM heads (layer, "
              "head, hit rate): " + _top_heads(profile.head_scores, "{:.2f}"))
    else:
        print("no head scores: no prompt had an answer region with a matching decoded token")
    if profile.retrieval_scores is not None:
        print("top HeadKV heads (layer, head, retrieval-reasoning score): "
              + _top_heads(profile.retrieval_scores, "{:.3g}"))
    print(f"model load {loaded:.1f} s, calibration {measured:.1f} s ({measured / len(samples):.1f} s/prompt), "
          f"{machine_description()}, {threads} threads")
    print(f"wrote {args.out}")
    return 0
