"""Slot and block arithmetic of a compressed request: pure integers, shared by scheduler and worker.

vLLM keeps each request's KV in blocks of ``block_size`` slots; slot ``i`` of a request lives in its
block ``i // block_size`` at offset ``i % block_size``. Without compression slot ``i`` holds position
``i``. After compression a request holds ``budget`` kept prompt tokens in slots ``0 .. budget - 1``
(each KV head its own positions: a slot is only storage, RoPE is already in the keys) and every
later token right after them, so

    held slot = position - offset,   offset = prompt_length - budget.

The scheduler process and the worker process never exchange a message about compression: both
apply the same rule to facts they already share (prompt length, tokens computed, budget, block
size), so they agree on which request was compressed, when, and how many blocks it keeps. The rule:

* a request is compressed iff its prompt is longer than the budget (mixkv's rule: a prompt that
  fits is left as it is);
* it is compressed at the end of the step whose scheduled tokens reach the end of its prompt
  (``computed < prompt_length <= computed + scheduled``), so chunked prefill works and a request
  resumed after preemption is compressed again;
* a step never runs past the end of a prompt it completes (:meth:`CompressionRule.stop_at_prompt`):
  a request resumed after preemption recomputes its prompt, is compressed, and only then recomputes
  its outputs, over the compressed cache as they were first computed, so preemption does not change
  what it generates;
* it then keeps ``ceil(held / block_size)`` blocks, ``held = computed_after_step - offset``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class CompressionRule:
    """When a request is compressed and what it holds afterwards (see the module docstring)."""

    budget: int
    window: int
    prompt_slots: Callable[[int], int] | None = None
    """Slots a compressed prompt of this length occupies: ``budget`` (uniform methods) unless given; per-head
    methods pack their prompt into whole blocks (:meth:`.paging.PagedRule.prompt_slots`)."""

    def compresses(self, prompt_length: int) -> bool:
        return prompt_length > self.budget

    def offset(self, prompt_length: int) -> int:
        """Positions dropped: held slot = position - offset (0 when the prompt is kept whole)."""
        if not self.compresses(prompt_length):
            return 0
        held = self.budget if self.prompt_slots is None else self.prompt_slots(prompt_length)
        return prompt_length - held

    def finishes_prompt(self, computed: int, scheduled: int, prompt_length: int) -> bool:
        """True for the step after which the request is compressed."""
        return self.compresses(prompt_length) and computed < prompt_length <= computed + scheduled

    def stop_at_prompt(self, computed: int, scheduled: int, prompt_length: int) -> int:
        """Tokens to schedule: ``scheduled``, cut at the end of the prompt when the step would cross it.

        Only a request that already has outputs (resumed after preemption) can cross: its outputs'
        keys and values must be computed over the compressed prompt, as when they were generated.
        """
        if self.compresses(prompt_length) and computed < prompt_length < computed + scheduled:
            return prompt_length - computed
        return scheduled

    def held(self, computed: int, prompt_length: int) -> int:
        """Slots in use once ``computed`` tokens are in the cache (compressed when the prompt is done)."""
        if computed >= prompt_length:
            return computed - self.offset(prompt_length)
        return computed

    def blocks_kept(self, computed: int, prompt_length: int, block_size: int) -> int:
        """Blocks a request needs right after the step that brought it to ``computed`` tokens."""
        return cdiv(self.held(computed, prompt_length), block_size)

    def window_range(self, prompt_length: int) -> tuple[int, int]:
        """Positions whose queries score the prompt: the last ``window`` of it."""
        return prompt_length - self.window, prompt_length


def window_tokens(rule: CompressionRule, computed: np.ndarray, scheduled: np.ndarray, prompt: np.ndarray,
                  query_start: np.ndarray, skip: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which tokens of a flattened batch are window queries, for requests still to be compressed.

    Per request ``r``: ``computed[r]`` tokens before this step, ``scheduled[r]`` now, ``prompt[r]``
    prompt length, ``query_start[r]`` its first row in the batch; ``skip[r]`` True for requests that
    are not to be compressed (already compressed, or short). Returns ``(rows, requests, slots)``:
    batch row, request index and window slot (0 .. window-1) of each window token in this step.
    """
    rows, reqs, slots = [], [], []
    for r in range(len(computed)):
        p = int(prompt[r])
        if skip[r] or not rule.compresses(p):
            continue
        c, s = int(computed[r]), int(scheduled[r])
        lo, hi = rule.window_range(p)
        first, last = max(c, lo), min(c + s, hi)
        if first >= last:
            continue
        pos = np.arange(first, last)
        rows.append(int(query_start[r]) + pos - c)
        reqs.append(np.full(len(pos), r))
        slots.append(pos - lo)
    if not rows:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return (np.concatenate(rows).astype(np.int64), np.concatenate(reqs).astype(np.int64),
            np.concatenate(slots).astype(np.int64))


def slot_ids(block_ids: list[int] | np.ndarray, block_size: int, count: int, start: int = 0) -> np.ndarray:
    """Global slot ids of a request's held slots ``start .. start + count - 1`` (its block table order)."""
    held = np.arange(start, start + count)
    blocks = np.asarray(block_ids, dtype=np.int64)
    if count and (held[-1] // block_size) >= len(blocks):
        raise ValueError(f"slot {held[-1]} needs block {held[-1] // block_size}, the request has {len(blocks)}")
    return blocks[held // block_size] * block_size + held % block_size
