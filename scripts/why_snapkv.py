"""Why SnapKV fails on SmolLM2-135M's text suite: where the window looks vs where the answer is read.

For each prompt (the eval suite's generator, seeds not used elsewhere): the full-cache greedy reply; one
capture of prompt + reply up to the first answer digit, from which (per layer, mean over KV heads)
* the window queries' attention per token of each region (chat template/instruction, filler, facts,
  answer digits, question) -- what SnapKV ranks by;
* the attention per token of the query that writes the first answer digit -- what the model reads;
* what SnapKV, SnapKV+MixKV and HeadKV keep of each region at one budget, per layer, and in the ten
  (layer, KV head) pairs that read the answer most when it is written (the "reading heads").

    python scripts/why_snapkv.py --n 4 --seed 9100 --length 1000,2000 --budget 256 \
        --json results/why-snapkv-smollm2.json --plot results/why-snapkv-smollm2.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mixkv.core.capture import Prefill, build_cache, capture_prefill
from mixkv.core.registry import make_method
from mixkv.lab.analysis import kept_share
from mixkv.lab.machine import machine_description
from mixkv.lab.regions import REGIONS, kept_per_region, mass_per_token, query_attention, region_masks, text_region_spans
from mixkv.testbeds import sources
from mixkv.testbeds import tasks as suite

METHODS = ("snapkv", "snapkv+mixkv", "headkv")
READING_HEADS = 10  # the (layer, KV head) pairs that read the answer most when it is written


def first_digit_step(tokenizer, reply: list[int]) -> int | None:
    """Index of the first reply token that contains a digit (the answer starts there)."""
    for j, t in enumerate(reply):
        if any(ch.isdigit() for ch in tokenizer.decode([t])):
            return j
    return None


def analyse(model, tokenizer, sample, budget: int, window: int, profile) -> dict | None:
    text = suite.build_prompt(tokenizer, sample)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"][0].tolist()]
    n = ids.shape[1]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    reply = out[0, n:].tolist()
    reply_text = tokenizer.decode(reply, skip_special_tokens=True)
    j = first_digit_step(tokenizer, reply)
    if j is None:
        return None
    ext = torch.cat([ids, torch.tensor([reply[:j]], dtype=ids.dtype)], 1) if j else ids
    pre = capture_prefill(model, {"input_ids": ext, "attention_mask": torch.ones_like(ext)}, window=window + j)
    masks = region_masks(offsets, text_region_spans(text, sample.prompt, sample.answer.split()))
    window_mass, answer_mass, reads = [], [], []
    for cap in pre.layers:
        w_att = query_attention(cap.queries[:, :, :window], cap.keys[:, :, :n], cap.scaling)  # SnapKV's view
        a_att = query_attention(cap.queries[:, :, -1:], cap.keys, cap.scaling)[:, :n]  # writes the first digit
        window_mass.append({k: float(v.mean()) for k, v in mass_per_token(w_att, masks).items()})
        answer_mass.append({k: float(v.mean()) for k, v in mass_per_token(a_att, masks).items()})
        reads.append(a_att[:, masks["answer"]].sum(-1))  # (H,): how much each KV head reads the answer
    read = torch.stack(reads)  # (L, H)
    top = read.flatten().topk(READING_HEADS).indices.tolist()
    heads = [(i // read.shape[1], i % read.shape[1]) for i in top]
    prompt_only = Prefill([dataclasses.replace(c, queries=c.queries[:, :, :window], keys=c.keys[:, :, :n],
                                               values=c.values[:, :, :n], window=window) for c in pre.layers],
                          pre.logits, n, window, pre.seconds)
    kept = {}
    for name in METHODS:
        method = make_method(name, budget=budget, window=window, profile=profile)
        _, plans, _ = build_cache(prompt_only, method, None)
        kept[name] = kept_per_region(kept_share(plans, len(pre.layers), n), masks)
        kept[name]["answer_per_layer"] = [float(kept_share(plans, len(pre.layers), n, layer=li)[masks["answer"]].mean())
                                          for li in range(len(pre.layers))]
        in_heads = [kept_share(plans, len(pre.layers), n, layer=li, head=h) for li, h in heads]
        kept[name]["reading_heads"] = {"answer": mean([float(k[masks["answer"]].mean()) for k in in_heads]),
                                       "tokens": mean([float(k.mean()) for k in in_heads])}
    return {"task": sample.task, "seed": sample.meta["seed"], "tokens": n, "answer": sample.answer,
            "reply": reply_text, "correct": suite.score(sample, reply_text),
            "region_tokens": {k: int(v.sum()) for k, v in masks.items()},
            "window_mass": window_mass, "answer_mass": answer_mass, "reading_heads": heads, "kept": kept}


def mean(values):
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def summarise(records: list[dict]) -> dict:
    layers = len(records[0]["window_mass"])
    per_layer = {src: {r: [mean([rec[src][li][r] for rec in records]) for li in range(layers)] for r in REGIONS}
                 for src in ("window_mass", "answer_mass")}
    kept = {m: {r: {k: mean([rec["kept"][m][r][k] for rec in records]) for k in ("kept", "budget")}
                for r in REGIONS} for m in METHODS}
    for m in METHODS:
        kept[m]["answer_per_layer"] = [mean([rec["kept"][m]["answer_per_layer"][li] for rec in records])
                                       for li in range(layers)]
        kept[m]["reading_heads"] = {k: mean([rec["kept"][m]["reading_heads"][k] for rec in records])
                                    for k in ("answer", "tokens")}
    ratio = {src: [per_layer[src]["answer"][li] / per_layer[src]["filler"][li] for li in range(layers)]
             for src in per_layer}
    return {"per_layer": per_layer, "answer_over_filler": ratio, "kept": kept}


def plot(summary: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, c, b) = plt.subplots(1, 3, figsize=(18, 4.8), gridspec_kw={"width_ratios": [1.25, 1.25, 1.1]})
    layers = range(len(summary["answer_over_filler"]["window_mass"]))
    a.semilogy(layers, summary["answer_over_filler"]["window_mass"], "o-", label="window queries (SnapKV's score)")
    a.semilogy(layers, summary["answer_over_filler"]["answer_mass"], "s-",
               label="query writing the first answer digit")
    a.axhline(1.0, color="grey", lw=0.8, ls="--")
    a.set_xlabel("layer")
    a.set_ylabel("attention per answer token / per filler token")
    a.set_title("(a) does the window look at the answer?")
    a.legend(fontsize=8)
    for m, marker in zip(summary["kept"], "o^s", strict=False):
        c.plot(layers, summary["kept"][m]["answer_per_layer"], marker=marker, ms=4, label=m)
    c.set_xlabel("layer")
    c.set_ylabel("share of KV heads keeping the answer tokens")
    c.set_ylim(0, 1.05)
    c.set_title("(b) where the answer is kept")
    c.legend(fontsize=8)
    methods = list(summary["kept"])
    colours = {"template": "#888888", "filler": "#cccccc", "facts": "#80b1d3", "answer": "#e41a1c",
               "question": "#4daf4a"}
    bottom = [0.0] * len(methods)
    for r in REGIONS:
        vals = [summary["kept"][m][r]["budget"] for m in methods]
        b.bar(methods, vals, bottom=bottom, color=colours[r], label=r)
        bottom = [x + y for x, y in zip(bottom, vals, strict=True)]
    for i, m in enumerate(methods):
        rh = summary["kept"][m]["reading_heads"]
        b.text(i, 1.02, f"answer kept {summary['kept'][m]['answer']['kept']:.0%}\nreading heads: answer "
               f"{rh['answer']:.0%},\nprompt {rh['tokens']:.0%}", ha="center", fontsize=7)
    b.set_ylim(0, 1.22)
    b.set_ylabel("share of the kept slots")
    b.set_title("(c) where the budget goes")
    b.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(suite.TASKS))
    p.add_argument("--n", type=int, default=4, help="prompts per task")
    p.add_argument("--seed", type=int, default=9100)
    p.add_argument("--length", default="1000,2000")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--json", required=True)
    p.add_argument("--plot", default=None)
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args()
    if args.plot_only:
        payload = json.loads(Path(args.json).read_text())
        plot(payload["summary"], args.plot, payload["title"])
        return
    torch.set_num_threads(int(os.environ.get("MIXKV_THREADS", "2")))
    start = time.perf_counter()
    model, tokenizer = sources.load(sources.SMOLLM2, "float32")
    profile = sources.shipped_profile(sources.SMOLLM2)
    lengths = [int(x) for x in args.length.split(",")]
    samples = suite.make_suite(args.tasks.split(","), args.n, args.seed, lengths, tokenizer)
    records = []
    for s in tqdm(samples, desc="prompts"):
        rec = analyse(model, tokenizer, s, args.budget, args.window, profile)
        if rec is not None:
            records.append(rec)
    summary = summarise(records)
    title = (f"SmolLM2-135M: why SnapKV misses the answer ({len(records)} prompts, {args.length} tokens, "
             f"window {args.window}, budget {args.budget}, seed {args.seed})")
    payload = {"title": title, "config": {**vars(args), "machine": machine_description(),
                                          "seconds": round(time.perf_counter() - start)},
               "summary": summary, "records": records}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.json}")
    for src in ("window_mass", "answer_mass"):
        print(src, "answer/filler per layer:", " ".join(f"{v:.1f}" for v in summary["answer_over_filler"][src]))
    for m, regions in summary["kept"].items():
        print(m, "reading heads:", regions["reading_heads"])
        print(m, " ".join(f"{r}: kept {regions[r]['kept']:.2f} budget {regions[r]['budget']:.2f}" for r in REGIONS))
    if args.plot:
        plot(summary, args.plot, title)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
