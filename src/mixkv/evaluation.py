"""Accuracy of methods x budgets on a task suite, with one shared prefill per prompt.

Each prompt is prefilled once (:func:`mixkv.prefill.shared_prefill`); every (method, budget)
then builds its compressed cache from that capture and decodes greedily. Results are plain
dicts so the command line can print, save and plot them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .prefill import build_cache, greedy_decode, shared_prefill
from .press import press
from .registry import make_method


@dataclass
class EvalItem:
    """One prompt: model inputs, how to score a decoded text, and its task name."""

    task: str
    inputs: dict
    score: Callable[[str], float]
    meta: dict = field(default_factory=dict)


@dataclass
class EvalConfig:
    methods: Sequence[str]
    budgets: Sequence[int]
    max_new_tokens: int = 12
    window: int = 32
    profile: Any = None
    redundancy: str = "online"

    def grid(self) -> list[tuple[str, int | None]]:
        """(method, budget) pairs; ``full`` appears once with budget None."""
        out: list[tuple[str, int | None]] = []
        for name in self.methods:
            if name.strip().lower() == "full":
                out.append(("full", None))
            else:
                out.extend((name, b) for b in self.budgets)
        return out

    def validate(self) -> None:
        for name, budget in self.grid():
            self.make(name, budget)  # raises a clear error for bad names / budgets / missing profiles

    def make(self, name: str, budget: int | None):
        if budget is None:
            return None
        return make_method(name, budget=budget, window=self.window, profile=self.profile,
                           redundancy=self.redundancy)


def evaluate(model, items: Sequence[EvalItem], config: EvalConfig, decode_text: Callable[[list[int]], str],
             eos_token_ids: set[int] | None = None, progress: bool = True) -> dict:
    """Run the grid; returns ``{"results": [...], "samples": [...], "timing": {...}}``."""
    config.validate()
    grid = config.grid()
    correct: dict[tuple[str, str, int | None], list[float]] = defaultdict(list)
    samples = []
    t_prefill = t_compress = t_decode = 0.0
    bar = tqdm(total=len(items) * len(grid), desc="eval", unit="run", disable=not progress)
    for i, item in enumerate(items):
        pre = shared_prefill(model, item.inputs, window=config.window)
        t_prefill += pre.seconds
        for name, budget in grid:
            method = config.make(name, budget)
            start = time.perf_counter()
            if method is None:
                cache, _, secs = build_cache(pre, None, None)
                tokens = greedy_decode(model, cache, pre.logits, config.max_new_tokens, eos_token_ids)
            else:
                with press(model, method) as session:
                    cache, _, secs = build_cache(pre, method, session)
                    tokens = greedy_decode(model, cache, pre.logits, config.max_new_tokens, eos_token_ids)
            t_compress += secs
            t_decode += time.perf_counter() - start - secs
            text = decode_text(tokens)
            s = float(item.score(text))
            correct[(item.task, name, budget)].append(s)
            samples.append({"index": i, "task": item.task, "method": name, "budget": budget,
                            "output": text, "score": s})
            bar.update(1)
            bar.set_postfix_str(f"{item.task} {name}@{budget}")
        del pre
    bar.close()
    results = [
        {"task": task, "method": name, "budget": budget, "accuracy": sum(v) / len(v), "n": len(v)}
        for (task, name, budget), v in correct.items()
    ]
    return {"results": results, "samples": samples,
            "timing": {"prefill_s": t_prefill, "compress_s": t_compress, "decode_s": t_decode}}


def mean_over_tasks(results: list[dict]) -> list[dict]:
    """Add a ``task="mean"`` row per (method, budget): the unweighted mean over tasks."""
    groups: dict[tuple[str, int | None], list[dict]] = defaultdict(list)
    for r in results:
        if r["task"] != "mean":
            groups[(r["method"], r["budget"])].append(r)
    return [
        {"task": "mean", "method": m, "budget": b, "accuracy": sum(r["accuracy"] for r in rs) / len(rs),
         "n": sum(r["n"] for r in rs)}
        for (m, b), rs in groups.items()
    ]


def text_items(tokenizer, samples, build_prompt, scorer, device: torch.device | str = "cpu") -> list[EvalItem]:
    """EvalItems for text-only samples (the LLM task suite)."""
    items = []
    for s in samples:
        enc = tokenizer(build_prompt(tokenizer, s), return_tensors="pt", add_special_tokens=False)
        inputs = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
        items.append(EvalItem(task=s.task, inputs=inputs, score=lambda text, s=s: scorer(s, text),
                              meta={"answer": s.answer, "tokens": enc["input_ids"].shape[1]}))
    return items
