"""Where calibration prompts come from: the library's generated prompts, or a JSONL file.

A :class:`~.sample.CalibrationSample` is batch-1 model ``inputs`` plus, optionally, a boolean ``(N,)``
``answer_mask`` (prompt tokens holding the answer), a ``region_mask`` (tokens the strongest
attention is searched over; default: the image tokens of a VLM prompt, else every prompt token)
and the ``answer_text``. Sources:

* ``generated`` (:func:`generated_samples`): the library's generated prompts, chosen by model:
  the toy VLM's grid images (answer = the cells that show the answer) when the processor is the
  toy VLM's, else the long-context text suite (``passkey``, ``kv_retrieval``, ``redundant``,
  round-robin; answer = the occurrences of the answer in the user message). Default seed 1234,
  disjoint from the evaluation's default seed 0. New sources register in ``GENERATORS``.
* a JSONL file (:func:`read_jsonl`), one object per line::

      {"prompt": "<user message>", "answer_span": [start_char, end_char], "answer": "48213"}

  ``prompt`` (required) is the user message; it is wrapped in the tokenizer's chat template unless
  ``"chat": false`` (then it is the whole model input). ``answer_span`` (optional; one
  ``[start, end)`` pair of character offsets into ``prompt`` or a list of them) marks the answer
  region; ``answer`` (optional) is the expected answer text used to pick the decoded steps that
  count. A line without ``answer_span`` contributes to the redundancies only.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ...testbeds.sources import is_toy_vlm
from .sample import CalibrationSample

DEFAULT_SEED = 1234


def char_spans_to_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``(N,)`` True on tokens whose character span (tokenizer offsets) overlaps one of ``spans``."""
    mask = torch.zeros(len(offsets), dtype=torch.bool)
    for i, (s, e) in enumerate(offsets):
        if e > s and any(s < b and e > a for a, b in spans):
            mask[i] = True
    return mask


def text_sample(tokenizer, message: str, answer_spans: Sequence[tuple[int, int]] = (), answer: str | None = None,
                chat: bool = True, name: str = "", meta: dict | None = None) -> CalibrationSample:
    """A calibration sample from a user message and character spans of its answer (into ``message``).

    The region is the message's own tokens (not the chat template around it).
    """
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                             tokenize=False)
        at = text.find(message)
        if at < 0:
            raise ValueError("the chat template changed the user message; cannot locate its tokens")
    else:
        text, at = message, 0
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    ids = torch.tensor([enc["input_ids"]])
    region = char_spans_to_mask(offsets, [(at, at + len(message))])
    mask = None
    if answer_spans:
        for s, e in answer_spans:
            if not 0 <= s < e <= len(message):
                raise ValueError(f"answer span [{s}, {e}) is outside the {len(message)}-character prompt")
        mask = char_spans_to_mask(offsets, [(at + s, at + e) for s, e in answer_spans])
    return CalibrationSample({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, mask, region, answer,
                             name, meta=dict(meta or {}, text=text, offsets=offsets, message_start=at))


def _occurrences(text: str, needle: str) -> list[tuple[int, int]]:
    out, start = [], text.find(needle)
    while needle and start >= 0:
        out.append((start, start + len(needle)))
        start = text.find(needle, start + 1)
    return out


def text_suite_samples(tokenizer, n: int, seed: int = DEFAULT_SEED, length: int = 1024,
                       tasks: Sequence[str] = ("passkey", "kv_retrieval", "redundant")) -> list[CalibrationSample]:
    """``n`` prompts of the generated text suite, tasks round-robin; answer = the answer's occurrences."""
    from ...testbeds import tasks as suite

    per = math.ceil(n / max(len(tasks), 1))
    made = suite.make_suite(list(tasks), per, seed, length, tokenizer)
    ordered = [made[t * per + i] for i in range(per) for t in range(len(tasks))][:n]
    return [text_sample(tokenizer, s.prompt, _occurrences(s.prompt, s.answer), s.answer, name=f"{s.task}-{i}",
                        meta={"task": s.task}) for i, s in enumerate(ordered)]


def toyvlm_samples(processor, n: int, seed: int = DEFAULT_SEED, **_: Any) -> list[CalibrationSample]:
    """``n`` toy-VLM grid images; answer = the image tokens of the cells that show the answer."""
    from ...testbeds.toyvlm import generator as gen

    out = []
    grid = getattr(processor, "grid", gen.GRID)
    for i, s in enumerate(gen.make_samples(n, seed, tasks=getattr(processor, "tasks", gen.DEFAULT_TASKS), grid=grid)):
        inputs = processor.sample_inputs(s)
        ids = inputs["input_ids"][0]
        answer = torch.zeros(ids.shape[0], dtype=torch.bool)
        answer[processor.answer_positions(s, ids)] = True
        image_positions = (ids == processor.image_token_id).nonzero().flatten()
        out.append(CalibrationSample(inputs, answer, None, s.answer, f"{s.task}-{i}", image=s.image,
                                     grid=(grid, grid),
                                     meta={"task": s.task, "image_positions": image_positions}))
    return out


# name -> (description, function(processor, n, seed=..., length=...)); new testbeds register here.
GENERATORS: dict[str, tuple[str, Callable[..., list[CalibrationSample]]]] = {
    "text": ("generated long-context text suite (passkey, kv_retrieval, redundant)", text_suite_samples),
    "toyvlm": ("generated toy-VLM grid images (questions of the tasks the model was trained on)", toyvlm_samples),
}


def generator_for(model_name: str, processor) -> str:
    """The generated data that fits a model: by name, else the toy VLM's processor, else text."""
    if is_toy_vlm(model_name):
        return "toyvlm"
    if hasattr(processor, "sample_inputs") and hasattr(processor, "answer_positions"):
        return "toyvlm"
    return "text"


def generated_samples(model_name: str, processor, n: int, seed: int = DEFAULT_SEED,
                      length: int = 1024) -> tuple[list[CalibrationSample], dict]:
    """Generated calibration prompts for ``model_name`` and a description of them."""
    kind = generator_for(model_name, processor)
    description, make = GENERATORS[kind]
    samples = make(processor, n, seed=seed, length=length)
    data = {"source": f"generated:{kind}", "description": description, "seed": seed, "n": n}
    if kind == "text":
        data["length"] = length
    return samples, data


def read_jsonl(path: str | Path, tokenizer, n: int | None = None) -> tuple[list[CalibrationSample], dict]:
    """Calibration prompts from a JSONL file (format in the module docstring); the first ``n`` lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration data {str(path)!r} does not exist")
    raw = path.read_bytes()
    samples = []
    for lineno, line in enumerate(raw.decode().splitlines(), 1):
        if not line.strip():
            continue
        if n is not None and len(samples) >= n:
            break
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f'{path}:{lineno}: expected an object with a "prompt" string')
        spans = obj.get("answer_span") or []
        if spans and isinstance(spans[0], (int, float)):
            spans = [spans]
        try:
            spans = [(int(s), int(e)) for s, e in spans]
        except (TypeError, ValueError) as e:
            raise ValueError(f'{path}:{lineno}: "answer_span" must be [start, end] or a list of them') from e
        try:
            samples.append(text_sample(tokenizer, obj["prompt"], spans, obj.get("answer"), bool(obj.get("chat", True)),
                                       name=f"{path.name}:{lineno}"))
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from e
    if not samples:
        raise ValueError(f"{path}: no prompts")
    data = {"source": str(path), "sha256": hashlib.sha256(raw).hexdigest()[:16], "n": len(samples)}
    return samples, data
