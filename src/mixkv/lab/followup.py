"""Follow-up questions on a compressed cache: the chat case of compression across turns.

The first question's prompt (image + question) is compressed with that question's window queries.
A follow-up question about the same image is then asked on the same cache, through the user's path:
a second ``generate`` that continues the first one's cache inside the same ``press``. The follow-up
turn (about 20 tokens) is not longer than the window, so it is appended as it is: it can only use
what the first question kept. Query-aware eviction keeps the first question's evidence; whether the
follow-up's survives is what this measures, per method and budget, for both answers.

Pairs: the toy VLM's scenes with two questions of different tasks (a colour and a shape question ask
about different shapes, so the first reply never gives the second answer away), as in its training
conversations.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..core.press import press
from ..core.registry import make_method
from ..testbeds.toyvlm import generator as gen


@dataclass(frozen=True)
class FollowupPair:
    """Two questions about one image: asked first, then as a follow-up on the same cache."""

    first: gen.Sample
    second: gen.Sample


def followup_pairs(n: int, seed: int = 0, tasks: Sequence[str] = gen.DEFAULT_TASKS,
                   grid: int = gen.GRID) -> list[FollowupPair]:
    """``n`` pairs on scenes ``seed``..``seed + n - 1``; pair ``i`` asks task ``i`` then task ``i + 1`` (cycling)."""
    tasks = tuple(tasks)
    if len(tasks) < 2:
        raise ValueError(f"follow-up pairs need two different tasks, got {tasks}")
    pairs = []
    for i in range(n):
        scene = gen.make_scene(seed + i, grid=grid)
        rng = random.Random((seed + i) * 104729 + 3)
        first = gen.questions_for(scene, tasks[i % len(tasks)], rng)
        for _ in range(50):
            second = gen.questions_for(scene, tasks[(i + 1) % len(tasks)], rng)
            if second.answer_cells != first.answer_cells:
                break
        pairs.append(FollowupPair(first, second))
    return pairs


def _reply(processor, ids: torch.Tensor) -> str:
    return processor.decode(ids, skip_special_tokens=True)


@torch.no_grad()
def ask_twice(model, processor, pair: FollowupPair, max_new_tokens: int = 16) -> tuple[str, str]:
    """Both replies: the first question, then the follow-up on the same cache (greedy)."""
    inputs = processor.sample_inputs(pair.first)
    n = inputs["input_ids"].shape[1]
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end,
                         return_dict_in_generate=True)
    first = _reply(processor, out.sequences[0, n:])
    seq = out.sequences
    if int(seq[0, -1]) != end:  # the reply was cut off: close the turn as the training format does
        seq = torch.cat([seq, torch.tensor([[end]])], 1)
    # The cache lacks the last generated token's keys: generate feeds every token past the cache's length.
    ids = torch.cat([seq, torch.tensor([processor.followup_ids(pair.second.question)])], 1)
    out2 = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=out.past_key_values,
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end,
                          return_dict_in_generate=True)
    return first, _reply(processor, out2.sequences[0, ids.shape[1]:])


def run_followup(model, processor, pairs: Sequence[FollowupPair], methods: Sequence[str], budgets: Sequence[int],
                 window: int, max_new_tokens: int = 16,
                 progress: Callable[[str], None] | None = None) -> list[dict]:
    """Accuracy of the first answer and of the follow-up, per method, budget and task (``"full"`` once)."""
    grid = [("full", None)] + [(m, b) for m in methods if m != "full" for b in budgets]
    rows = []
    for name, budget in grid:
        scores = {"first": {}, "followup": {}}
        examples = []
        for pair in pairs:
            if budget is None:
                first, second = ask_twice(model, processor, pair, max_new_tokens)
            else:
                with press(model, make_method(name, budget=budget, window=window)):
                    first, second = ask_twice(model, processor, pair, max_new_tokens)
            scores["first"].setdefault(pair.first.task, []).append(gen.score(pair.first, first))
            scores["followup"].setdefault(pair.second.task, []).append(gen.score(pair.second, second))
            if len(examples) < 3:
                examples.append({"seed": pair.first.seed, "first": first, "followup": second,
                                 "answers": [pair.first.answer, pair.second.answer]})
        for turn, by_task in scores.items():
            for task, values in by_task.items():
                rows.append({"method": name, "budget": budget, "turn": turn, "task": task, "n": len(values),
                             "accuracy": 100.0 * sum(values) / len(values)})
            every = [v for values in by_task.values() for v in values]
            rows.append({"method": name, "budget": budget, "turn": turn, "task": "mean", "n": len(every),
                         "accuracy": 100.0 * sum(every) / len(every), "examples": examples})
        if progress is not None:
            progress(f"{name}{'' if budget is None else f' @{budget}'}")
    return rows


def turn_results(rows: Sequence[dict], turn: str = "followup") -> list[dict]:
    """One turn's rows in :func:`mixkv.lab.evaluation.evaluate`'s result form (accuracy a fraction,
    not a percentage), so the eval figures can draw them."""
    return [{"task": r["task"], "method": r["method"], "budget": r["budget"], "accuracy": r["accuracy"] / 100,
             "n": r["n"]} for r in rows if r["turn"] == turn]
