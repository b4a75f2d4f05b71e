"""The prompts file both sides read (token ids, so both see the very same tokens) and its scorer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .protocol import PROMPTS_FORMAT


def export_prompts(tokenizer, contexts: Sequence[int], tasks: Sequence[str], n: int, seed: int,
                   settings: dict, make_suite: Callable | None = None,
                   build_prompt: Callable | None = None) -> dict:
    """Token ids, expected answer and task of every prompt, plus the settings, as plain JSON.

    ``make_suite`` / ``build_prompt`` default to :mod:`mixkv.testbeds.tasks` (tests pass fakes).
    """
    if make_suite is None or build_prompt is None:
        from ...testbeds import tasks as task_suite

        make_suite = make_suite or task_suite.make_suite
        build_prompt = build_prompt or task_suite.build_prompt
    if (settings.get("budget") is None) == (settings.get("compression_ratio") is None):
        raise ValueError("give exactly one of budget (tokens per KV head) and compression_ratio")
    prompts = []
    for ctx in contexts:
        for i, sample in enumerate(make_suite(list(tasks), n, seed, ctx, tokenizer)):
            prompts.append(_prompt_entry(tokenizer, build_prompt(tokenizer, sample), sample, int(ctx), i % max(n, 1)))
    window = int(settings.get("window", 32))
    for p in prompts:
        if settings.get("budget") is not None and len(p["input_ids"]) <= window:
            raise ValueError(f"prompt {p['id']} has only {len(p['input_ids'])} tokens, not more than the window")
    return {"format": PROMPTS_FORMAT, "version": 1, "settings": dict(settings), "prompts": prompts}


def _prompt_entry(tokenizer, text: str, sample, ctx: int, index: int) -> dict:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    if ids and isinstance(ids[0], list):
        raise ValueError("the tokenizer returned a batch; expected the ids of one prompt")
    return {
        "id": f"{ctx}/{sample.task}/{index}", "context": ctx, "task": sample.task,
        "input_ids": [int(t) for t in ids], "answer": str(sample.answer),
        "answer_kind": sample.meta.get("answer_kind", "number"), "choices": sample.meta.get("choices"),
        "meta": {k: v for k, v in sample.meta.items() if isinstance(v, (int, float, str, bool))},
    }


def score_text(prompt: dict, text: str) -> float:
    """mixkv's scorer (:func:`mixkv.testbeds.tasks.score`) on an exported prompt: one rule for both sides."""
    from ...testbeds.tasks import Sample, score

    meta = {"answer_kind": prompt.get("answer_kind") or "number"}
    if prompt.get("choices"):
        meta["choices"] = prompt["choices"]
    return score(Sample(task=prompt["task"], prompt="", answer=str(prompt["answer"]), meta=meta), text)
