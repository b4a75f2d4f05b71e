"""``mixkv bench`` measurement code on a tiny model (what it reports, not how fast it is)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from zoo import make_inputs, make_model  # noqa: E402

from mixkv.lab.benchmark import bench_context, micro_decode_step  # noqa: E402


def test_bench_rows_report_exact_kv_bytes():
    model = make_model("llama")
    inputs = make_inputs(model, "llama", text_len=100)
    n = inputs["input_ids"].shape[1]
    rows = bench_context(model, inputs, ["full", "snapkv", "adakv+mixkv"], budget=20, window=8, steps=2, repeats=1)
    by = {r.method: r for r in rows}
    assert set(by) == {"full", "snapkv", "adakv+mixkv"}
    full = by["full"]
    # 2 layers x 2 KV heads x 16 dims x (K and V) x 4 bytes per token.
    assert full.kv_bytes == full.kv_bytes_theory == n * 2 * 2 * 16 * 2 * 4
    per_token = 16 * 2 * 4
    assert by["snapkv"].kv_bytes == by["snapkv"].kv_bytes_theory == 20 * 2 * 2 * per_token
    ada = by["adakv+mixkv"]
    assert ada.kv_bytes == ada.kv_bytes_theory
    # AdaKV shares each layer's 2 x 12 candidates among heads, exactly (largest-remainder rounding).
    assert ada.kv_bytes == 20 * 2 * 2 * per_token
    for name in ("snapkv", "adakv+mixkv"):
        r = by[name]
        assert r.kv_bytes_allocated >= r.kv_bytes
        assert r.compress_s > 0 and r.decode_ms_per_token > 0 and r.prefill_s > 0
    assert by["adakv+mixkv"].attention_path.startswith("torch_varlen") or "dense" in by["adakv+mixkv"].attention_path
    assert all(r.context == n for r in rows)


def test_micro_decode_step_rows():
    rows = micro_decode_step([64, 128], layouts=["3x3x16", "8x2x16"], batches=[1, 2], iters=2, progress=False,
                             max_tokens=2000)
    # 8 heads x batch 2 x 128 tokens = 2048 > max_tokens: skipped.
    assert [(r["layout"], r["batch"], r["tokens_per_head"]) for r in rows] == [
        ("3x3x16", 1, 64), ("3x3x16", 1, 128), ("3x3x16", 2, 64), ("3x3x16", 2, 128),
        ("8x2x16", 1, 64), ("8x2x16", 1, 128), ("8x2x16", 2, 64)]
    for r in rows:
        assert r["varlen_ms"] > 0 and r["dense_ms"] > 0 and r["padded_ms"] > 0
        assert r["min_len"] < r["max_len"]  # heads really differ in length
        # Exact bytes: kept tokens x head dim x K and V x 4 bytes, plus the decoded token.
        assert r["kv_bytes"] == (r["batch"] * r["num_kv_heads"] * (r["tokens_per_head"] + 1)) * 16 * 2 * 4


def test_micro_heads_that_draw_equal_lengths_are_measured():
    """Two heads with 2 tokens each on average often draw 2 and 2: a uniform layer, nothing packed."""
    (row,) = micro_decode_step([2], layouts=["2x1x8"], batches=[1], iters=1, progress=False)
    assert row["min_len"] == row["max_len"] == 2 and row["regions"] == [] and row["varlen_ms"] > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"layouts": ["1x4x64"]}, r"layout '1x4x64' has 1 KV head.*at least 2"),
    ({"lengths_per_head": [1, 64]}, r"at least 2 .*got \[1\]"),
    ({"layouts": ["4x64"]}, "not KVHEADSxGROUPxHEADDIM"),
    ({"batches": [0]}, "positive"),
])
def test_micro_settings_it_cannot_measure(kwargs, message):
    args = {"lengths_per_head": [64], "layouts": ["3x3x16"], "batches": [1], **kwargs}
    with pytest.raises(ValueError, match=message):
        micro_decode_step(args.pop("lengths_per_head"), **args, iters=1, progress=False)


def test_throughput_rows():
    from mixkv.lab.benchmark import throughput

    model = make_model("llama")
    inputs = make_inputs(model, "llama", batch=3, text_len=60)
    rows = throughput(model, inputs, ["full", "snapkv+mixkv", "adakv+mixkv"], budget=20, window=4, steps=2)
    assert [r["method"] for r in rows] == ["full", "snapkv+mixkv", "adakv+mixkv"]
    assert all(r["batch"] == 3 and r["tokens_per_s"] > 0 for r in rows)


def test_long_answer_rows_bound_the_cache_with_a_decode_budget(tmp_path):
    """`bench --long-answer`: KV bytes every step; with a decode budget the cache stops growing."""
    from mixkv.core.capture import capture_prefill
    from mixkv.lab.figures import plot_long_answer
    from mixkv.lab.long_answer import long_answer

    model = make_model("llama")
    inputs = make_inputs(model, "llama", text_len=60, image=False)
    prefill = capture_prefill(model, inputs, window=4)
    configs = [("full", None), ("snapkv+mixkv", None), ("snapkv+mixkv", 24), ("adakv", 24)]
    rows = long_answer(model, prefill, configs, budget=20, window=4, every=4, new_tokens=40, repeats=2)
    by = {(r.method, r.decode_budget): r for r in rows}
    per_token = 2 * 2 * 16 * 2 * 4  # layers x KV heads x dims x (K, V) x fp32 bytes
    full = by[("full", None)]
    assert full.kv_mib_trace[0] * 2**20 == 60 * per_token and len(full.kv_mib_trace) == 40  # after prefill + 39 steps
    assert full.same_as_full == full.new_tokens == 40
    grows = by[("snapkv+mixkv", None)]
    assert grows.kv_mib_end * 2**20 == (20 + 39) * per_token and grows.decode_compressions == 0
    assert grows.query_ring_mib == 0
    for key in (("snapkv+mixkv", 24), ("adakv", 24)):
        bounded = by[key]
        assert bounded.decode_compressions > 0 and bounded.recompress_ms_per_token > 0
        assert bounded.kv_mib_peak * 2**20 < (24 + 4) * per_token  # decode budget + every, never more
        assert bounded.ms_per_token > 0 and 0 <= bounded.same_as_full <= 40
        # 2 layers x (1 x 4 query heads x window 4 x 16 dims) x 4 bytes of recent queries
        assert bounded.query_ring_mib * 2**20 == 2 * 4 * 4 * 16 * 4
    assert plot_long_answer(rows, tmp_path / "long.png").stat().st_size > 0
