"""``mixkv calibrate``: measure a model's per-(layer, KV head) redundancy and visual-head scores
into a calibration profile (format: :mod:`mixkv.profiles`; method: :mod:`mixkv.calibration`)."""

from __future__ import annotations

import time

from .. import report
from ..calibration import DEFAULT_SEED, calibrate, generated_samples, partial_path, read_jsonl
from .common import load, machine_description, setup_threads


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="write a calibration profile (offline redundancy, SparseMM head scores)")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, toy-vlm, a local directory or a hub id")
    p.add_argument("--data", default="generated",
                   help="'generated' (the library's prompts for this model) or a JSONL file of "
                        '{"prompt": ..., "answer_span": [start, end], "answer": ...} lines')
    p.add_argument("--n", type=int, default=64, help="number of calibration prompts")
    p.add_argument("--out", required=True, help="profile JSON path (written only when complete)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of generated prompts (eval uses 0)")
    p.add_argument("--length", type=int, default=1024, help="tokens per generated text prompt")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens decoded for head scores")
    p.add_argument("--hits-on", default="answer", choices=["answer", "all"],
                   help="decoded steps that count for head scores: tokens of the answer, or all")
    p.add_argument("--resume", action="store_true", help="continue from <out>.partial.json")
    p.add_argument("--save-every", type=int, default=4, help="write <out>.partial.json every k prompts")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(run=run)


def load_model_and_processor(name: str, dtype: str = "float32"):
    """``(model, tokenizer or processor)``; ``toy-vlm`` is the toy VLM test bed."""
    if name in ("toy-vlm", "toyvlm"):
        import torch

        from ..testbeds.toyvlm import load_toy_vlm

        return load_toy_vlm(dtype={"float32": torch.float32, "bfloat16": torch.bfloat16,
                                   "float16": torch.float16}[dtype])
    return load(name, dtype)


def load_samples(model_name: str, processor, data: str, n: int, seed: int, length: int):
    if data == "generated":
        return generated_samples(model_name, processor, n, seed=seed, length=length)
    return read_jsonl(data, processor, n)


def run(args) -> int:
    if args.n < 1 or args.save_every < 1:
        raise ValueError("--n and --save-every must be >= 1")
    threads = setup_threads(args.threads)
    start = time.perf_counter()
    model, processor = load_model_and_processor(args.model, args.dtype)
    loaded = time.perf_counter() - start
    samples, data = load_samples(args.model, processor, args.data, args.n, args.seed, args.length)
    lengths = [s.length for s in samples]
    eos = {processor.eos_token_id} if getattr(processor, "eos_token_id", None) is not None else set()
    print(f"{args.model}: {len(samples)} prompts of {min(lengths)}-{max(lengths)} tokens ({data['source']}); "
          f"partial progress in {partial_path(args.out)}")
    t0 = time.perf_counter()
    profile = calibrate(model, samples, args.out, model_id=args.model, data=dict(data, dtype=args.dtype),
                        decode=processor.decode, max_new_tokens=args.max_new_tokens, eos_token_ids=eos,
                        hits_on=args.hits_on, resume=args.resume, save_every=args.save_every)
    measured = time.perf_counter() - t0
    kr = profile.key_redundancy
    rows = [[layer, *(f"{float(v):.3f}" for v in kr[layer])] for layer in range(profile.num_layers)]
    print(report.format_table(["layer", *(f"head {h}" for h in range(profile.num_kv_heads))], rows))
    print(f"key redundancy {float(kr.min()):.3f}..{float(kr.max()):.3f} (mean {float(kr.mean()):.3f}); value "
          f"redundancy {float(profile.value_redundancy.min()):.3f}..{float(profile.value_redundancy.max()):.3f}")
    if profile.head_scores is not None:
        hs = profile.head_scores
        top = sorted(((float(hs[i, j]), i, j) for i in range(hs.shape[0]) for j in range(hs.shape[1])), reverse=True)
        print(f"head scores from {profile.data['counted_steps']} decoded answer tokens; top heads (layer, head, "
              "hit rate): " + ", ".join(f"({i}, {j}, {v:.2f})" for v, i, j in top[:5]))
    else:
        print("no head scores: no prompt had an answer region with a matching decoded token")
    print(f"model load {loaded:.1f} s, calibration {measured:.1f} s ({measured / len(samples):.1f} s/prompt), "
          f"{machine_description()}, {threads} threads")
    print(f"wrote {args.out}")
    return 0
