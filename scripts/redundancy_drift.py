#!/usr/bin/env python
"""How far each prompt's online head redundancy lies from the shipped profile's, on held-out prompts.

For every prompt (the same ones ``mixkv eval --model M --seed S --n N`` builds), one exact prefill; per
(layer, KV head) the online ``r`` (``docs/method.md``, MixKV step 5) against the profile's ``key_redundancy``:
mean and largest ``|r_online - r_profile|`` over heads and prompts, the mean signed difference, the spread of
``r`` across prompts per head, and the share of heads whose ``r`` differs by more than 0.05.

Usage: ``python scripts/redundancy_drift.py --model toy-vlm-24 --seed 7000 --n 4 [--length 1024]``.
"""

from __future__ import annotations

import argparse
import json

import torch

from mixkv.core.capture import capture_prefill
from mixkv.core.profiles import load_profile
from mixkv.lab.evaluation import text_items, toyvlm_items
from mixkv.testbeds import sources
from mixkv.testbeds import tasks as task_suite


def items_for(model_name: str, processor, model, seed: int, n: int, length: int):
    if sources.is_toy_vlm(model_name):
        from mixkv.testbeds.toyvlm import generator as gen

        tasks = sources.toy_vlm_config(model_name).get("tasks", list(gen.DEFAULT_TASKS))
        samples = [gen.make_sample(seed + i, task=t, grid=processor.grid) for i in range(n) for t in tasks]
        return toyvlm_items(processor, samples)
    samples = task_suite.make_suite(list(task_suite.TASKS), n, seed, length, processor)
    return text_items(processor, samples, task_suite.build_prompt, task_suite.score, model.device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--seed", type=int, default=7000)
    p.add_argument("--n", type=int, default=4, help="prompts per task")
    p.add_argument("--length", type=int, default=1024, help="text suite prompt length (ignored for toy VLMs)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    profile = load_profile(sources.shipped_profile(args.model))
    model, processor = sources.load(args.model)
    items = items_for(args.model, processor, model, args.seed, args.n, args.length)
    online = []
    for item in items:
        pre = capture_prefill(model, item.inputs, window=8)
        online.append(torch.stack([layer.key_redundancy[0] for layer in pre.layers]))  # (L, H)
    r = torch.stack(online)  # (prompts, L, H)
    ref = profile.key_redundancy.to(r.dtype)
    diff = r - ref
    out = {
        "model": args.model, "seed": args.seed, "n_per_task": args.n, "prompts": len(items),
        "prompt_tokens": [min(i.meta["tokens"] for i in items), max(i.meta["tokens"] for i in items)],
        "profile_data": profile.data,
        "mean_abs_diff": float(diff.abs().mean()), "max_abs_diff": float(diff.abs().max()),
        "mean_signed_diff": float(diff.mean()),
        "share_heads_abs_diff_over_0.05": float((diff.abs() > 0.05).float().mean()),
        "mean_sd_across_prompts": float(r.std(dim=0).mean()),
        "per_prompt_mean_abs_diff": [float(x) for x in diff.abs().mean(dim=(1, 2))],
        "online_range": [float(r.min()), float(r.max())], "profile_range": [float(ref.min()), float(ref.max())],
    }
    print(json.dumps({k: v for k, v in out.items() if k != "profile_data"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
