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

What goes where:

* :mod:`.sample` -- :class:`CalibrationSample`, one prompt and where its answer is;
* :mod:`.maths` -- the scores as pure tensor functions (hits, retrieval mass, counted steps);
* :mod:`.measuring` -- :func:`measure`, one prompt through the model (model plumbing);
* :mod:`.accumulator` -- the running sums over prompts and their JSON form;
* :mod:`.run` -- :func:`calibrate`, a whole run with partial progress (interrupting and resuming);
* :mod:`.sources` -- calibration data: generated prompts or a JSONL file (its format).

The names below are re-exported so ``from mixkv.lab.calibration import calibrate`` keeps working;
code inside mixkv imports from the module that defines a name.
"""

from __future__ import annotations

from .accumulator import Accumulator
from .maths import counted_steps, region_argmax_hits, retrieval_reasoning_hits
from .measuring import Measurement, extend_inputs, measure
from .run import PARTIAL_FORMAT, calibrate, partial_path
from .sample import CalibrationSample
from .sources import (
    DEFAULT_SEED,
    GENERATORS,
    char_spans_to_mask,
    generated_samples,
    generator_for,
    read_jsonl,
    text_sample,
    text_suite_samples,
    toyvlm_samples,
)

__all__ = [
    "DEFAULT_SEED",
    "GENERATORS",
    "PARTIAL_FORMAT",
    "Accumulator",
    "CalibrationSample",
    "Measurement",
    "calibrate",
    "char_spans_to_mask",
    "counted_steps",
    "extend_inputs",
    "generated_samples",
    "generator_for",
    "measure",
    "partial_path",
    "read_jsonl",
    "region_argmax_hits",
    "retrieval_reasoning_hits",
    "text_sample",
    "text_suite_samples",
    "toyvlm_samples",
]
