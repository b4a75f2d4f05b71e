"""The gap analysis: which answer tokens a plan kept, the failure split and the share of the gap closed."""

import pytest
import torch

from mixkv.core.selection import KeepPlan
from mixkv.lab.gap import answer_kept, gap_closed, gap_summary, heads_map, kept_record


def _plan(rows: list[list[int]]) -> KeepPlan:
    """One sequence; ``rows[h]`` = positions head h keeps (ragged: padded with 0 past the length)."""
    width = max(len(r) for r in rows)
    idx = torch.zeros(1, len(rows), width, dtype=torch.long)
    for h, r in enumerate(rows):
        idx[0, h, : len(r)] = torch.tensor(r)
    return KeepPlan(idx, torch.tensor([[len(r) for r in rows]]))


def test_answer_kept_by_hand():
    plans = {0: _plan([[1, 5, 9], [2, 5]]), 2: _plan([[0, 9], [9]])}  # layer 1 not compressed
    kept = answer_kept(plans, num_layers=3, num_heads=2, positions=[5, 9])
    assert kept.tolist() == [[[True, True], [True, False]],
                             [[True, True], [True, True]],
                             [[False, True], [False, True]]]
    rec = kept_record(kept)
    assert rec["answer_kept"] == pytest.approx(9 / 12, abs=1e-4)
    assert rec["answer_kept_min"] == pytest.approx(4 / 6, abs=1e-4)  # position 5: 4 of 6 caches
    assert rec["answer_kept_heads"] == [1.0, 0.5, 1.0, 1.0, 0.5, 0.5]


def test_filler_past_a_heads_length_is_not_a_kept_position():
    plan = KeepPlan(torch.tensor([[[3, 0], [0, 0]]]), torch.tensor([[1, 1]]))  # head 0 keeps 3, head 1 keeps 0
    assert answer_kept({0: plan}, 1, 2, [0]).tolist() == [[[False], [True]]]
    with pytest.raises(ValueError, match="expected 3"):
        answer_kept({0: plan}, 1, 3, [0])


def test_full_cache_keeps_everything():
    assert kept_record(answer_kept({}, 4, 3, [7, 8]))["answer_kept"] == 1.0


def _rec(method, budget, score, kept, kept_min, task="text"):
    return {"method": method, "budget": budget, "score": score, "task": task, "answer_kept": kept,
            "answer_kept_min": kept_min, "answer_kept_heads": [kept, kept_min]}


def test_failures_split_into_dropped_and_kept_but_wrong():
    samples = [_rec("snapkv", 64, 1.0, 0.9, 0.8), _rec("snapkv", 64, 0.0, 0.4, 0.2),
               _rec("snapkv", 64, 0.0, 0.9, 0.6), _rec("snapkv", 64, 0.0, 0.7, 0.49),
               {"method": "snapkv", "budget": 64, "score": 0.0, "task": "text"}]  # no record: skipped
    (row,) = gap_summary(samples)
    assert (row["n"], row["failures"], row["dropped"], row["kept_but_wrong"]) == (4, 3, 2, 1)
    assert row["accuracy"] == 0.25 and row["answer_kept"] == pytest.approx(0.725)
    assert row["accuracy_when_kept"] == 0.5  # two samples keep every answer token in >= half the heads
    assert heads_map(samples, "snapkv", 64, num_layers=2).tolist() == [[pytest.approx(0.725)],
                                                                        [pytest.approx(0.5225)]]
    with pytest.raises(ValueError, match="no answer-kept records"):
        heads_map(samples, "adakv", 64, 2)


def test_gap_closed():
    results = [{"task": "mean", "method": "full", "budget": None, "accuracy": 1.0},
               {"task": "mean", "method": "snapkv", "budget": 64, "accuracy": 0.6},
               {"task": "mean", "method": "snapkv+mixkv", "budget": 64, "accuracy": 0.9},
               {"task": "mean", "method": "adakv", "budget": 64, "accuracy": 1.0},
               {"task": "mean", "method": "adakv+mixkv", "budget": 64, "accuracy": 0.9}]
    assert gap_closed(results, "snapkv", 64) == pytest.approx(0.75)
    assert gap_closed(results, "adakv", 64) is None  # no gap to close
    assert gap_closed(results, "pyramidkv", 64) is None
