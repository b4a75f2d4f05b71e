#!/usr/bin/env python
"""Which kinds of tokens SnapKV, +MixKV and +MixKV-modal keep on toy-vlm-24 colour prompts at B=32, window 16.

Share of the kept slots outside the window, over all (layer, KV head) caches of held-out seeds 0-3:
prompt text (system prompt, chat template, question), blank image cells, tags, list numbers, glyphs,
the shape the question names, other shapes. Usage: ``python scripts/kept_kinds_toyvlm24.py`` (~1 min on 2 cores).
"""

from __future__ import annotations

from collections import Counter

from mixkv.core.capture import capture_prefill
from mixkv.lab.evaluation import EvalConfig, toyvlm_items
from mixkv.lab.run import run_method
from mixkv.testbeds import sources
from mixkv.testbeds.toyvlm import generator as gen

METHODS = ("snapkv", "snapkv+mixkv", "snapkv+mixkv-modal")
BUDGET, WINDOW = 32, 16


def token_kinds(sample, input_ids, image_token_id: int) -> list[str]:
    """What each prompt position holds, in the words of the table."""
    first = int((input_ids == image_token_id).nonzero()[0])
    words = gen.cell_words(sample.scene)
    numbers = {e.patch_in(sample.scene.grid): True for e in sample.scene.numbers}
    kinds = []
    for p in range(len(input_ids)):
        cell = p - first
        if not 0 <= cell < len(words):
            kinds.append("text")
        elif words[cell] == "blank":
            kinds.append("blank")
        elif cell in sample.answer_patches:
            kinds.append("answer shape")
        elif words[cell].startswith(("row ", "column ")):
            kinds.append("tag")
        elif numbers.get(cell):
            kinds.append("number")
        else:
            kinds.append("other shape" if " " in words[cell] else "glyph")
    return kinds


def main() -> int:
    model, proc = sources.load("toy-vlm-24")
    config = EvalConfig(methods=list(METHODS), budgets=[BUDGET], window=WINDOW)
    totals = {m: Counter() for m in METHODS}
    for seed in range(4):
        sample = gen.make_sample(seed, "colour", grid=24)
        item = toyvlm_items(proc, [sample])[0]
        kinds = token_kinds(sample, item.inputs["input_ids"][0], model.config.image_token_id)
        pre = capture_prefill(model, item.inputs, window=WINDOW)
        for m in METHODS:
            run = run_method(model, pre, config.make(m, BUDGET), 12, {proc.eos_token_id})
            for plan in run.plans.values():
                valid = plan.valid()[0]
                for h in range(plan.indices.shape[1]):
                    for p in plan.indices[0, h][valid[h]].tolist():
                        if p < pre.prompt_length - WINDOW:
                            totals[m][kinds[p]] += 1
    for m, counts in totals.items():
        total = sum(counts.values())
        print(m, {k: f"{100 * v / total:.1f}%" for k, v in counts.most_common()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
