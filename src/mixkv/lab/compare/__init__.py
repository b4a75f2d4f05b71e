"""mixkv next to NVIDIA kvpress: the same prompts, the same budgets, measured the same way.

One call of :func:`run_compare` (``mixkv compare``):

1. exports the prompts (token ids of the generated task suite) and the settings to JSON;
2. builds kvpress's own venv on first use (kvpress 0.5.5 needs transformers<5.3, mixkv 5.24);
3. runs kvpress (its ``SnapKVPress`` / ``AdaKVPress(SnapKVPress(...))`` and ``with press(model):``)
   in that venv, in a subprocess;
4. measures mixkv on the same prompts with the same protocol;
5. aggregates both sides per context length and method, side by side with kvpress/mixkv ratios,
   and checks where the two implementations of one method agree (answers, kept positions).

What goes where:

* :mod:`.protocol` -- method names, the mixkv-only cross-check row, file formats (shared by both sides);
* :mod:`.budgets` -- budget matching: kvpress's compression ratio for mixkv's budget and back;
* :mod:`.prompts` -- the prompts file both sides read, and the one scorer for both;
* :mod:`.mixkv_side` -- one prompt under one method with mixkv, timed and measured;
* :mod:`.kvpress_side` -- the kvpress venv (location, setup), the subprocess, its results file;
* :mod:`.summary` -- aggregation, ratios, agreement of the two sides, the report;
* :mod:`.tables` / :mod:`.figures` -- the printed tables and the PNG;
* :mod:`.run` -- :func:`run_compare`, the whole job;
* ``kvpress/`` -- package data run inside kvpress's venv (``setup_env.sh``, ``run_kvpress.py``);
  it never imports mixkv.
"""

from __future__ import annotations

from .budgets import kvpress_n_kept, matched_ratio, mixkv_budget
from .figures import plot_compare
from .kvpress_side import (
    check_kvpress_results,
    default_venv,
    ensure_kvpress_env,
    kvpress_paths,
    load_kvpress_results,
    run_kvpress,
)
from .mixkv_side import measure_mixkv, measure_mixkv_one
from .prompts import export_prompts, score_text
from .protocol import ADAKV_AS_KVPRESS, IMPLS, KVPRESS_FORMAT, METHODS, PEER, PROMPTS_FORMAT
from .run import run_compare
from .summary import agreement, alloc_difference, build_report, compare_rows, kept_overlap, ratio, summarize
from .tables import format_tables

__all__ = [
    "ADAKV_AS_KVPRESS", "IMPLS", "KVPRESS_FORMAT", "METHODS", "PEER", "PROMPTS_FORMAT",
    "agreement", "alloc_difference", "build_report", "check_kvpress_results", "compare_rows", "default_venv",
    "ensure_kvpress_env", "export_prompts", "format_tables", "kept_overlap", "kvpress_n_kept", "kvpress_paths",
    "load_kvpress_results", "matched_ratio", "measure_mixkv", "measure_mixkv_one", "mixkv_budget",
    "plot_compare", "ratio", "run_compare", "run_kvpress", "score_text", "summarize",
]
