"""``scripts/vllm_vlm_capacity.py`` without vLLM: settings parse with clear errors, the block arithmetic of the
plugin's rule, what the trace says about requests at once, accuracy with its interval, the table and plot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cap():
    sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("vllm_vlm_capacity", REPO / "scripts" / "vllm_vlm_capacity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vllm_vlm_capacity"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(REPO / "scripts"))


def test_settings_parse(cap):
    assert cap.parse_config("full") == {"label": "full", "method": "full", "budget": None, "window": None}
    assert cap.parse_config("snapkv+mixkv@32/16") == {"label": "snapkv+mixkv@32/16", "method": "snapkv+mixkv",
                                                      "budget": 32, "window": 16}
    with pytest.raises(ValueError, match="needs a budget"):
        cap.parse_config("snapkv")
    with pytest.raises(ValueError, match="takes no budget"):
        cap.parse_config("full@64")
    with pytest.raises(SystemExit):
        cap.parse_args(["--configs", "snapkv"])


def test_pool_and_held_blocks_follow_the_plugin_rule(cap):
    args = cap.parse_args([])
    assert args.pool_blocks == 3 * 21 + 1  # ceil((618 + 24) / 32) = 21 per full request, one null block
    full, b64 = cap.parse_config("full"), cap.parse_config("snapkv@64")
    assert cap.held_blocks(full, 618, 12, 32) == 20  # ceil(630 / 32)
    assert cap.held_blocks(b64, 618, 12, 32) == 3  # ceil((64 + 12) / 32)
    assert cap.held_blocks(b64, 50, 12, 32) == 2  # a prompt that fits is kept whole


def test_trace_summary_reads_concurrency_while_queued(cap, tmp_path):
    lines = [{"t": 1.0, "running": 2, "waiting": 5, "scheduled_tokens": 600, "free_blocks": 10, "total_blocks": 64,
              "compressed": 0, "freed_blocks": 0},
             {"t": 2.0, "running": 6, "waiting": 1, "scheduled_tokens": 6, "free_blocks": 4, "total_blocks": 64,
              "compressed": 5, "freed_blocks": 19},
             {"t": 3.0, "running": 3, "waiting": 0, "scheduled_tokens": 3, "free_blocks": 50, "total_blocks": 64,
              "compressed": 3, "freed_blocks": 0},
             {"t": 4.0, "running": 0, "waiting": 0, "scheduled_tokens": 0, "free_blocks": 63, "total_blocks": 64,
              "compressed": 0, "freed_blocks": 0}]
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps(x) for x in lines))
    got = cap.trace_summary(trace)
    assert got["max_running"] == 6 and got["mean_running_while_queued"] == 4.0 and got["steps"] == 3
    assert got["peak_blocks_used"] == 60 and got["preemptions"] == 0


def test_accuracy_scores_each_reply_with_the_task_scorer(cap):
    rows = [{"seed": 3000, "task": "colour"}, {"seed": 3001, "task": "shape"}]
    import vllm_vlm_check as vc

    right = [vc.sample_of(3000, "colour").reply, "I do not know."]
    got = cap.accuracy(rows, right)
    assert got["colour"]["accuracy"] == 100.0 and got["shape"]["accuracy"] == 0.0
    assert got["all"]["n"] == 2 and got["all"]["accuracy"] == 50.0
    lo, hi = got["all"]["ci95"]
    assert 0 < lo < 50 < hi < 100


def test_table_and_plot(cap, tmp_path):
    def setting(label, method, budget, acc, mean):
        return {"label": label, "method": method, "budget": budget,
                "accuracy": {"all": {"n": 10, "accuracy": acc, "ci95": [acc - 5, min(acc + 5, 100)]}},
                "concurrency": {"max_running": int(mean) + 1, "mean_running_while_queued": mean},
                "bench": {"output_throughput": 8.0, "p50_e2el_ms": 1000.0, "p95_e2el_ms": 2000.0,
                          "p50_ttft_ms": 500.0}}
    report = {"settings": [setting("full", "full", None, 99.0, 3.0), setting("snapkv@64", "snapkv", 64, 90.0, 12.0)],
              "pool_blocks": 64, "pool_requests": 3, "n_per_task": 2}
    text = cap.table(report)
    assert "| snapkv@64 | 90.0 (85-95) | 13 | 12.0 | 4.0 |" in text
    path = cap.plot(report, tmp_path / "p.png")
    assert path.is_file() and path.stat().st_size > 1000
