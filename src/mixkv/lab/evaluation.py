"""Accuracy of methods x budgets on a task suite, with one shared prefill per prompt.

Each prompt is prefilled once (:func:`mixkv.core.capture.capture_prefill`); every (method,
budget) then builds its compressed cache from that capture and decodes greedily
(:func:`mixkv.lab.run.run_method`). Results are plain dicts so the command line can print, save and plot them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core import defaults
from ..core.capture import capture_prefill
from ..core.registry import make_method, needs_profile
from .run import MethodRun, run_method, run_methods_stacked


@dataclass
class EvalItem:
    """One prompt: model inputs, how to score a decoded text, and its task name."""

    task: str
    inputs: dict
    score: Callable[[str], float]
    meta: dict = field(default_factory=dict)
    max_new_tokens: int | None = None  # a shorter cap for this prompt (its expected reply is short)
    extra_scores: dict[str, Callable[[str], float]] = field(default_factory=dict)  # e.g. grounding "near"


@dataclass
class EvalConfig:
    methods: Sequence[str]
    budgets: Sequence[int]
    max_new_tokens: int = 12
    window: int = defaults.WINDOW
    profile: Any = None
    redundancy: str = "online"
    stack: int = 1  # compressed (method, budget) runs of one prompt decoded as one batch (1: one at a time)

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
        if not self.methods:
            raise ValueError("no methods to evaluate")
        if any(name.strip().lower() != "full" for name in self.methods) and not self.budgets:
            raise ValueError("no budgets to evaluate")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if isinstance(self.stack, bool) or not isinstance(self.stack, int) or self.stack < 1:
            raise ValueError(f"stack must be a positive int (runs decoded per batch), got {self.stack!r}")
        if self.profile is not None and not self.uses_profile():
            raise ValueError("a profile was given but no method would use it (sparsemm, headkv, or a +mixkv method "
                             "with redundancy 'profile'); drop the profile, add such a method or pass --redundancy "
                             "profile")
        for name, budget in self.grid():
            self.make(name, budget)  # raises a clear error for bad names / budgets / missing profiles

    def uses_profile(self) -> bool:
        """Some method of the grid reads a calibration profile (by its declared trait, not its name)."""
        return any(needs_profile(m, self.redundancy) for m in self.methods)

    def make(self, name: str, budget: int | None):
        if budget is None:
            return None
        return make_method(name, budget=budget, window=self.window, profile=self.profile,
                           redundancy=self.redundancy)


def evaluate(model, items: Sequence[EvalItem], config: EvalConfig, decode_text: Callable[[list[int]], str],
             eos_token_ids: set[int] | None = None, progress: bool = True,
             observe: Callable[[EvalItem, MethodRun], dict] | None = None) -> dict:
    """Run the grid; returns ``{"results": [...], "samples": [...], "timing": {...}, "interrupted": bool}``.

    ``observe(item, run)`` may add fields to each sample record (e.g. which answer tokens the
    method kept, for the gap analysis). Ctrl-C stops the run between two decodes and returns what
    was measured so far (``interrupted`` True), so a long run's results are never lost.
    """
    config.validate()
    grid = config.grid()
    correct: dict[tuple[str, str, int | None], list[float]] = defaultdict(list)
    extra: dict[tuple[str, str, int | None, str], list[float]] = defaultdict(list)
    samples = []
    t_prefill = t_compress = t_decode = 0.0
    bar = tqdm(total=len(items) * len(grid), desc="eval", unit="run", disable=not progress)
    interrupted = False
    try:
        for i, item in enumerate(items):
            pre = capture_prefill(model, item.inputs, window=config.window)
            t_prefill += pre.seconds
            cap = min(config.max_new_tokens, item.max_new_tokens or config.max_new_tokens)
            for name, budget, run in _runs(model, pre, grid, config, cap, eos_token_ids):
                t_compress += run.compress_seconds
                t_decode += run.decode_seconds
                text = decode_text(run.tokens)
                s = float(item.score(text))
                correct[(item.task, name, budget)].append(s)
                extras = {k: float(f(text)) for k, f in item.extra_scores.items()}
                for k, v in extras.items():
                    extra[(item.task, name, budget, k)].append(v)
                extras = {f"score_{k}": v for k, v in extras.items()}
                record = {"index": i, "task": item.task, "method": name, "budget": budget, "output": text, "score": s,
                          **extras}
                if "seed" in item.meta:  # generated samples: which one, whatever the order of the items
                    record["seed"] = item.meta["seed"]
                if observe is not None:
                    record.update(observe(item, run))
                samples.append(record)
                bar.update(1)
                bar.set_postfix_str(f"{item.task} {name}@{budget}")
            del pre
    except KeyboardInterrupt:
        interrupted = True  # return what is done; the caller saves it and reports the interruption
    finally:
        bar.close()
    results = [
        {"task": task, "method": name, "budget": budget, "accuracy": sum(v) / len(v), "n": len(v),
         **{f"accuracy_{k}": sum(x) / len(x) for (t, m, b, k), x in extra.items() if (t, m, b) == (task, name, budget)}}
        for (task, name, budget), v in correct.items()
    ]
    return {"results": results, "samples": samples, "interrupted": interrupted,
            "timing": {"prefill_s": t_prefill, "compress_s": t_compress, "decode_s": t_decode}}


def _runs(model, pre, grid, config: EvalConfig, cap: int, eos_token_ids):
    """``(name, budget, MethodRun)`` for every grid entry of one prompt, in grid order; compressed
    entries are decoded ``config.stack`` at a time (:func:`mixkv.lab.run.run_methods_stacked`)."""
    if config.stack == 1:
        for name, budget in grid:
            yield name, budget, run_method(model, pre, config.make(name, budget), cap, eos_token_ids)
        return
    pending: list[tuple[str, int | None]] = []

    def flush():
        runs = run_methods_stacked(model, pre, [config.make(n, b) for n, b in pending], cap, eos_token_ids)
        out = [(n, b, r) for (n, b), r in zip(pending, runs, strict=True)]
        pending.clear()
        return out

    for name, budget in grid:
        if budget is None:
            yield name, budget, run_method(model, pre, None, cap, eos_token_ids)
            continue
        pending.append((name, budget))
        if len(pending) == config.stack:
            yield from flush()
    if pending:
        yield from flush()


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


def toyvlm_items(processor, samples: Sequence) -> list[EvalItem]:
    """EvalItems for the toy VLM's generated samples (score: :func:`mixkv.testbeds.toyvlm.generator.score`).

    ``meta`` holds the answer, the task and ``answer_positions`` (prompt positions of the answer's
    visual tokens). Held-out samples are ``generator.make_samples(n, seed=0)`` (training used seeds
    >= 900000).
    """
    from ..testbeds.toyvlm import generator as gen

    items = []
    for s in samples:
        inputs = processor.sample_inputs(s)
        reply = len(processor.tokenizer(s.reply, add_special_tokens=False)["input_ids"])
        items.append(EvalItem(task=s.task, inputs=inputs, score=lambda text, s=s: gen.score(s, text),
                              meta={"answer": s.answer, "seed": s.seed,
                                    "answer_positions": processor.answer_positions(s, inputs["input_ids"]),
                                    "tokens": int(inputs["input_ids"].shape[1])},
                              max_new_tokens=reply + 4,  # the trained reply, its end token and slack
                              extra_scores={"near": lambda text, s=s: gen.score_near(s, text)}
                              if s.task == "ground" else {}))
    return items
