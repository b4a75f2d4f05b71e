"""Calibration: measure a model's per-(layer, KV head) statistics offline and write a profile.

What a profile holds (see :mod:`mixkv.core.profiles` for the JSON format):

``key_redundancy`` / ``value_redundancy``
    The mean over calibration prompts of each head's average pairwise cosine similarity of its
    cached keys (values), computed from the exact prefill with padding excluded
    (:func:`mixkv.core.scores.redundancy`, O(N)). This is MixKV's offline ``r`` (``docs/method.md``, MixKV step 5).
``head_scores`` (only when prompts carry an answer region)
    SparseMM-style visual-head scores. After the prompt the model decodes greedily
    (``max_new_tokens``, full cache). For every decoded step whose produced token is part of the
    expected answer text (SparseMM matches output tokens to the OCR text; without an answer text
    every step counts), each query head's *strongest* attention over the region tokens (the image
    tokens of a VLM prompt, else the tokens of the user message) is found; it is a hit when it
    lands inside the answer region. Hits are averaged over the query heads of each KV head's
    group and divided by the number of counted steps: the score is a hit rate in [0, 1] per
    (layer, KV head). ``SparseMM`` normalises the scores to sum 1 itself.

``retrieval_scores`` (only when prompts carry an answer region)
    HeadKV-R2 retrieval-reasoning scores (Fu et al., ICLR 2025), from the same decoded steps. For
    every counted step and query head, the step's attention over everything it sees (the prompt and
    the generated tokens before it) is ranked; of its ``k`` strongest keys, ``k`` = the number of
    answer tokens in the prompt, those inside the answer region add their attention weight, and the
    sum is divided by ``k``. Averaged over the query heads of each KV head, summed over counted steps
    and divided by their number: a score in [0, 1] per (layer, KV head). ``HeadKV`` normalises the
    scores to sum 1 itself. Unlike the visual-head score this credits a head for *how much* attention
    it puts on the answer, not only where its maximum lies; the "reasoning" part of HeadKV-R2 comes
    from the data: needles whose answer must be picked among look-alike distractors (the text suite's
    ``kv_retrieval``), so heads that attend to the right one score, not those that attend to any.

    The decode-step queries are the model's own (after its RoPE / M-RoPE): a second exact prefill
    of ``prompt + generated tokens`` captures its last queries (:func:`mixkv.core.capture.capture_prefill`),
    and causal attention makes them equal to the queries of the decoding steps. It runs only when
    a step counts, and only up to the last counted step.

Calibration data
----------------
A :class:`CalibrationSample` is batch-1 model ``inputs`` plus, optionally, a boolean ``(N,)``
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

Interrupting
------------
The profile at ``out`` is written once, atomically, when every prompt is done. Progress goes to
``<out>.partial.json`` every ``save_every`` prompts and when the run is interrupted (any
exception, Ctrl-C included); ``resume=True`` continues from it (it must describe the same model,
data and settings, and its prompts are checked by fingerprint). Without ``resume`` an existing
partial file is an error, so progress is never thrown away silently.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core import scores
from ..core.capture import build_cache, capture_prefill
from ..core.io import write_json_atomic
from ..core.models import inspect_model
from ..core.profiles import Profile, save_profile
from ..testbeds.sources import is_toy_vlm
from .run import greedy_decode

PARTIAL_FORMAT = "mixkv-calibration-partial"
DEFAULT_SEED = 1234


@dataclass
class CalibrationSample:
    """One calibration prompt (batch 1) and, optionally, where its answer is."""

    inputs: dict
    answer_mask: torch.Tensor | None = None  # (N,) bool
    region_mask: torch.Tensor | None = None  # (N,) bool; None: image tokens of a VLM, else all
    answer_text: str | None = None
    name: str = ""
    image: Any = None  # PIL image for pictures (VLM samples)
    grid: tuple[int, int] | None = None  # patch grid (rows, cols) of ``image``
    meta: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])

    def fingerprint(self) -> str:
        """Identifies the prompt (ids and answer mask) so a resumed run can check it sees the same data."""
        h = hashlib.sha256(self.inputs["input_ids"].cpu().numpy().tobytes())
        if self.answer_mask is not None:
            h.update(self.answer_mask.cpu().numpy().tobytes())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# maths (pure tensor functions)


def region_argmax_hits(queries: torch.Tensor, keys: torch.Tensor, region: torch.Tensor, answer: torch.Tensor,
                       steps: torch.Tensor | None = None) -> torch.Tensor:
    """SparseMM hits per KV head: where each query head's strongest attention over ``region`` lands.

    ``queries`` ``(B, Hq, T, D)`` (one per decoded step), ``keys`` ``(B, H, N, D)`` (the prompt),
    ``region`` / ``answer`` ``(B, N)`` bool, ``steps`` ``(B, T)`` bool (which steps count; all
    when None). The argmax of the attention weights equals the argmax of ``q . k`` (softmax is
    monotonic), so no softmax is built. Returns ``(B, H)``: hits averaged over the ``G`` query
    heads of each group and summed over the counted steps.
    """
    b, hq, t, d = queries.shape
    h = keys.shape[1]
    g = hq // h
    logits = torch.matmul(queries.float().reshape(b, h, g * t, d), keys.float().transpose(-1, -2))
    logits = logits.masked_fill(~region[:, None, None, :], float("-inf"))
    top = logits.argmax(dim=-1)  # (B, H, G*T)
    hit = answer.gather(1, top.reshape(b, -1)).reshape(b, h, g, t).float()
    if steps is not None:
        hit = hit * steps[:, None, None, :].float()
    return hit.mean(dim=2).sum(dim=-1)


def retrieval_reasoning_hits(queries: torch.Tensor, keys: torch.Tensor, answer: torch.Tensor, scaling: float,
                             steps: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """HeadKV-R2 retrieval-reasoning mass per KV head: attention on the answer among each head's top ``k``.

    ``queries`` ``(B, Hq, T, D)``: the queries of ``T`` decoding steps; step ``t`` sits at position
    ``M - T + t`` and sees keys ``0 .. M - T + t`` (causal). ``keys`` ``(B, H, M, D)``: the prompt
    followed by the generated tokens fed back. ``answer`` ``(B, M)`` bool: the answer tokens of the
    prompt (``k = answer.sum()`` per sequence). ``steps`` ``(B, T)`` bool: which steps count (all
    when None); ``valid`` ``(B, M)``: False on padding (never attended). ``scaling``: the softmax scale.

    Per step and query head: ``a = softmax(scaling * q . k)`` over the visible keys; the ``k``
    largest weights (a stable sort: ties go to the earlier position) that lie in the answer add up,
    divided by ``k``. Returns ``(B, H)``: averaged over the ``G`` query heads of each group and summed
    over the counted steps; each step adds at most 1.
    """
    b, hq, t, d = queries.shape
    h, m = keys.shape[1], keys.shape[2]
    g = hq // h
    logits = torch.matmul(queries.float().reshape(b, h, g * t, d), keys.float().transpose(-1, -2)) * scaling
    pos = torch.arange(m, device=keys.device)
    qpos = m - t + torch.arange(t, device=keys.device)
    visible = (pos[None, :] <= qpos[:, None]).repeat(g, 1)[None, None]  # (1, 1, G*T, M), row = g * T + t
    if valid is not None:
        visible = visible & valid[:, None, None, :].bool()
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    weight, order = probs.sort(dim=-1, descending=True, stable=True)
    k = answer.sum(dim=-1)  # (B,)
    in_top = torch.arange(m, device=keys.device)[None, :] < k[:, None]  # (B, M) over ranks
    on_answer = answer.gather(1, order.reshape(b, -1)).reshape(order.shape)
    mass = (weight * (in_top[:, None, None, :] & on_answer)).sum(dim=-1) / k.clamp_min(1)[:, None, None]
    mass = mass.reshape(b, h, g, t)
    if steps is not None:
        mass = mass * steps[:, None, None, :].float()
    return mass.mean(dim=2).sum(dim=-1)


def counted_steps(pieces: Sequence[str], answer_text: str | None) -> list[bool]:
    """Which decoded tokens count: their text (stripped, any case) occurs in ``answer_text``."""
    if answer_text is None:
        return [True] * len(pieces)
    target = answer_text.lower()
    return [bool(p.strip()) and p.strip().lower() in target for p in pieces]


@dataclass
class Accumulator:
    """Running sums over calibration prompts; JSON round-trips for the partial file."""

    num_layers: int
    num_kv_heads: int
    key_sum: torch.Tensor | None = None  # (L, H) float64
    value_sum: torch.Tensor | None = None
    hits_sum: torch.Tensor | None = None
    retrieval_sum: torch.Tensor | None = None  # HeadKV-R2 mass, summed over counted steps
    prompts: int = 0
    steps: int = 0  # counted decoding steps (SparseMM)
    answered: int = 0  # prompts with an answer region
    done: list[str] = field(default_factory=list)  # fingerprints, in order

    def __post_init__(self) -> None:
        shape = (self.num_layers, self.num_kv_heads)
        for name in ("key_sum", "value_sum", "hits_sum", "retrieval_sum"):
            value = getattr(self, name)
            value = torch.zeros(shape, dtype=torch.float64) if value is None else torch.as_tensor(value,
                                                                                                 dtype=torch.float64)
            if value.shape != shape:
                raise ValueError(f"partial calibration: {name} has shape {tuple(value.shape)}, expected {shape}")
            setattr(self, name, value)

    def add(self, m: Measurement, fingerprint: str) -> None:
        self.key_sum += m.key_redundancy.double()
        self.value_sum += m.value_redundancy.double()
        self.prompts += 1
        if m.hits is not None:
            self.answered += 1
            self.hits_sum += m.hits.double()
            if m.retrieval is not None:
                self.retrieval_sum += m.retrieval.double()
            self.steps += m.steps
        self.done.append(fingerprint)

    def to_profile(self, model: str, data: dict, library_version: str) -> Profile:
        if self.prompts == 0:
            raise ValueError("no calibration prompt was measured")
        data = dict(data, prompts=self.prompts, prompts_with_answer=self.answered, counted_steps=self.steps)
        head_scores = (self.hits_sum / self.steps).float() if self.steps > 0 else None
        retrieval = (self.retrieval_sum / self.steps).float() if self.steps > 0 else None
        return Profile(model=model, num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                       key_redundancy=(self.key_sum / self.prompts).float(),
                       value_redundancy=(self.value_sum / self.prompts).float(),
                       head_scores=head_scores, retrieval_scores=retrieval, data=data,
                       library_version=library_version)

    def to_json(self) -> dict:
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "key_sum": self.key_sum.tolist(), "value_sum": self.value_sum.tolist(),
                "hits_sum": self.hits_sum.tolist(), "retrieval_sum": self.retrieval_sum.tolist(),
                "prompts": self.prompts, "steps": self.steps,
                "answered": self.answered, "done": self.done}

    @classmethod
    def from_json(cls, obj: dict) -> Accumulator:
        """Read a saved state, refusing one whose counts and sums cannot come from a real run."""
        if "retrieval_sum" not in obj and int(obj["steps"]) != 0:
            raise ValueError("it was written by an older mixkv without HeadKV retrieval sums, so its counted steps "
                             "would be missing from retrieval_scores")
        state = cls(int(obj["num_layers"]), int(obj["num_kv_heads"]), key_sum=obj["key_sum"],
                    value_sum=obj["value_sum"], hits_sum=obj["hits_sum"], retrieval_sum=obj.get("retrieval_sum"),
                    prompts=int(obj["prompts"]), steps=int(obj["steps"]), answered=int(obj["answered"]),
                    done=[str(d) for d in obj["done"]])
        state.check()
        return state

    def check(self) -> None:
        """Each prompt adds a redundancy in [0, 1] per head, each counted step a hit rate and a mass in [0, 1]."""
        if self.prompts < 0 or self.prompts != len(self.done):
            raise ValueError(f"{self.prompts} prompts but {len(self.done)} fingerprints")
        if not 0 <= self.answered <= self.prompts or self.steps < 0:
            raise ValueError(f"inconsistent counts (prompts {self.prompts}, answered {self.answered}, "
                             f"steps {self.steps})")
        for name, limit in (("key_sum", self.prompts), ("value_sum", self.prompts), ("hits_sum", self.steps),
                            ("retrieval_sum", self.steps)):
            t = getattr(self, name)
            if not bool(torch.isfinite(t).all()) or bool((t < -1e-6).any()) or bool((t > limit + 1e-6).any()):
                raise ValueError(f"{name} holds values outside [0, {limit}]")


# ---------------------------------------------------------------------------------------------------
# measuring one prompt (model plumbing)


@dataclass
class Measurement:
    key_redundancy: torch.Tensor  # (L, H)
    value_redundancy: torch.Tensor  # (L, H)
    hits: torch.Tensor | None = None  # (L, H) summed over counted steps; None without an answer region
    steps: int = 0
    tokens: list[int] = field(default_factory=list)
    retrieval: torch.Tensor | None = None  # (L, H) HeadKV-R2 mass summed over counted steps (with ``hits``)


def extend_inputs(inputs: dict, tokens: Sequence[int]) -> dict:
    """``inputs`` with ``tokens`` appended (ids; 1 in the attention mask; 0 in other per-token maps)."""
    ids = inputs["input_ids"]
    if not tokens:
        return dict(inputs)
    new = torch.tensor([list(tokens)], dtype=ids.dtype, device=ids.device)
    out = dict(inputs)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == ids.shape:
            fill = new if key == "input_ids" else (torch.ones_like(new) if key == "attention_mask"
                                                   else torch.zeros_like(new))
            out[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
    return out


@torch.no_grad()
def measure(model, sample: CalibrationSample, decode: Callable[[list[int]], str] | None = None,
            max_new_tokens: int = 16, eos_token_ids: set[int] | None = None, hits_on: str = "answer") -> Measurement:
    """Redundancies of one prompt and, with an answer region, its SparseMM hits and HeadKV-R2 retrieval mass
    (see the module docstring).

    ``decode`` turns token ids into text (needed to match decoded tokens to ``answer_text`` when
    ``hits_on="answer"``); ``hits_on="all"`` counts every decoded step.
    """
    if hits_on not in ("answer", "all"):
        raise ValueError(f"hits_on must be 'answer' or 'all', got {hits_on!r}")
    inputs = sample.inputs
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("calibration samples are single prompts (batch 1)")
    n = sample.length
    pre = capture_prefill(model, inputs, window=1)
    key_r = torch.stack([scores.redundancy(c.keys, c.valid)[0] for c in pre.layers]).cpu()
    value_r = torch.stack([scores.redundancy(c.values, c.valid)[0] for c in pre.layers]).cpu()
    if sample.answer_mask is None:
        return Measurement(key_r, value_r)
    valid = pre.layers[0].valid
    device = pre.layers[0].keys.device
    region = sample.region_mask
    if region is None:
        region = pre.image_mask[0] if pre.image_mask is not None else torch.ones(n, dtype=torch.bool)
    region = region.to(device).bool()
    if valid is not None:
        region = region & valid[0]
    if tuple(sample.answer_mask.shape) != (n,) or tuple(region.shape) != (n,):
        raise ValueError(f"answer/region masks must have shape ({n},), got {tuple(sample.answer_mask.shape)} "
                         f"and {tuple(region.shape)}")
    answer = sample.answer_mask.to(device).bool() & region
    if not bool(answer.any()):
        warnings.warn(f"calibration sample {sample.name!r}: the answer region holds no region token; "
                      "it counts for the redundancies only", stacklevel=2)
        return Measurement(key_r, value_r)
    cache, _, _ = build_cache(pre, None, None)
    tokens = greedy_decode(model, cache, int(pre.logits[0].argmax()), max_new_tokens, eos_token_ids)
    del cache
    if hits_on == "all" or sample.answer_text is None:
        counts = [True] * len(tokens)
    else:
        if decode is None:
            raise ValueError("hits_on='answer' needs decode= to read the generated tokens")
        counts = counted_steps([decode([t]) for t in tokens], sample.answer_text)
    hits = torch.zeros_like(key_r)
    retrieval = torch.zeros_like(key_r)
    if not any(counts):
        return Measurement(key_r, value_r, hits, 0, tokens, retrieval)
    last = max(i for i, c in enumerate(counts) if c)
    if last > 0:  # queries of steps 1..last: exact prefill of prompt + generated tokens
        del pre
        pre = capture_prefill(model, extend_inputs(inputs, tokens[:last]), window=last + 1)
    steps = torch.tensor([counts[: last + 1]], device=device)
    total = n + last  # prompt + generated tokens fed back
    answer_all = torch.cat([answer, answer.new_zeros(last)])
    for layer, cap in enumerate(pre.layers):
        q = cap.queries[:, :, -(last + 1):]
        hits[layer] = region_argmax_hits(q, cap.keys[:, :, :n], region[None], answer[None], steps)[0].cpu()
        stored = cap.keys.shape[2]  # a sliding-window layer stores only the last tokens
        retrieval[layer] = retrieval_reasoning_hits(q, cap.keys, answer_all[total - stored:][None], cap.scaling,
                                                    steps, cap.valid)[0].cpu()
    return Measurement(key_r, value_r, hits, int(sum(counts)), tokens, retrieval)


# ---------------------------------------------------------------------------------------------------
# a whole run, with partial progress


def partial_path(out: str | Path) -> Path:
    return Path(str(out) + ".partial.json")


def _load_partial(path: Path, model_id: str, info, spec: dict) -> Accumulator:
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged (not valid JSON: {e}); delete it to start over") from e
    if not isinstance(obj, dict) or obj.get("format") != PARTIAL_FORMAT:
        raise ValueError(f"{path}: not a mixkv partial calibration file; delete it to start over")
    if obj.get("model") != model_id or obj.get("spec") != spec:
        raise ValueError(
            f"{path} was made for model {obj.get('model')!r} with settings {obj.get('spec')}; this run is "
            f"{model_id!r} with {spec}. Delete it or rerun with the same settings."
        )
    try:
        state = Accumulator.from_json(obj["state"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); delete it to start over") from e
    if (state.num_layers, state.num_kv_heads) != (info.num_layers, info.num_kv_heads):
        raise ValueError(f"{path}: layer/head shape does not match the model")
    return state


def calibrate(model, samples: Sequence[CalibrationSample], out: str | Path, *, model_id: str | None = None,
              data: dict | None = None, decode: Callable[[list[int]], str] | None = None,
              max_new_tokens: int = 16, eos_token_ids: set[int] | None = None, hits_on: str = "answer",
              resume: bool = False, save_every: int = 4, progress: bool = True) -> Profile:
    """Measure every sample, then write the profile to ``out`` (atomically) and return it.

    ``data`` describes the calibration data (stored in the profile). See the module docstring for
    the partial file and ``resume``.
    """
    from .. import __version__

    info = inspect_model(model)
    model_id = model_id or info.name
    out = Path(out)
    partial = partial_path(out)
    spec = {"data": data or {}, "max_new_tokens": max_new_tokens, "hits_on": hits_on, "n": len(samples)}
    if partial.exists() and not resume:
        raise ValueError(f"{partial} holds an interrupted calibration; pass --resume (resume=True) to continue "
                         "it, or delete it to start over")
    state = _load_partial(partial, model_id, info, spec) if partial.exists() else \
        Accumulator(info.num_layers, info.num_kv_heads)
    if state.prompts > len(samples):
        raise ValueError(f"{partial} already holds {state.prompts} prompts, more than the {len(samples)} asked for")

    def save() -> None:
        write_json_atomic({"format": PARTIAL_FORMAT, "model": model_id, "spec": spec, "state": state.to_json()},
                          partial, indent=None)

    unsaved = 0
    bar = tqdm(total=len(samples), initial=state.prompts, desc="calibrate", unit="prompt", disable=not progress)
    try:
        for i, sample in enumerate(samples):
            fp = sample.fingerprint()
            if i < state.prompts:
                if state.done[i] != fp:
                    raise ValueError(f"{partial}: prompt {i} differs from the one measured before; "
                                     "the data changed since the interrupted run (delete the partial file)")
                continue
            m = measure(model, sample, decode, max_new_tokens, eos_token_ids, hits_on)
            state.add(m, fp)
            unsaved += 1
            bar.update(1)
            if unsaved >= save_every:
                save()
                unsaved = 0
    except BaseException:
        if unsaved:
            save()
        raise
    finally:
        bar.close()
    profile = state.to_profile(model_id, dict(spec["data"], max_new_tokens=max_new_tokens, hits_on=hits_on),
                               __version__)
    save_profile(profile, out)
    partial.unlink(missing_ok=True)
    return profile


# ---------------------------------------------------------------------------------------------------
# data sources


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
    from ..testbeds import tasks as suite

    per = math.ceil(n / max(len(tasks), 1))
    made = suite.make_suite(list(tasks), per, seed, length, tokenizer)
    ordered = [made[t * per + i] for i in range(per) for t in range(len(tasks))][:n]
    return [text_sample(tokenizer, s.prompt, _occurrences(s.prompt, s.answer), s.answer, name=f"{s.task}-{i}",
                        meta={"task": s.task}) for i, s in enumerate(ordered)]


def toyvlm_samples(processor, n: int, seed: int = DEFAULT_SEED, **_: Any) -> list[CalibrationSample]:
    """``n`` toy-VLM grid images; answer = the image tokens of the cells that show the answer."""
    from ..testbeds.toyvlm import generator as gen

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
