"""What the two sides agree on: method names, the mixkv-only cross-check row, file formats.

``kvpress/run_kvpress.py`` repeats these strings (it runs in kvpress's venv and cannot import
mixkv); change them in both places.
"""

from __future__ import annotations

PROMPTS_FORMAT = "mixkv-compare-prompts"
KVPRESS_FORMAT = "kvpress-compare-results"
REPORT_FORMAT = "mixkv-compare"
METHODS = ("full", "snapkv", "adakv")
IMPLS = ("mixkv", "kvpress")
# mixkv's AdaKV configured as kvpress's behaves at small budgets (no floor, no mass normalisation);
# run on the mixkv side only and paired with kvpress's "adakv" (see ``PEER``).
ADAKV_AS_KVPRESS = "adakv-as-kvpress"
PEER = {ADAKV_AS_KVPRESS: "adakv"}


def method_order(name: str) -> int:
    """Sort key that lists rows as full, snapkv, adakv, adakv-as-kvpress, then anything else."""
    order = (*METHODS, ADAKV_AS_KVPRESS)
    return order.index(name) if name in order else len(order)
