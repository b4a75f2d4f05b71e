"""Per-head paging in the vLLM plugin (#27), on random caches laid out as vLLM 0.32 lays them out: every
layer's cache a view of one backing storage. No vLLM needed."""

import pytest
import torch

from mixkv import make_method
from mixkv.core.layer import LayerPrefill
from mixkv.core.profiles import Profile
from mixkv.core.selection import plan_layer
from mixkv.integrations.vllm.compact import Compaction, compact_paged
from mixkv.integrations.vllm.kvlayout import PLAIN, KVLayout, read_slots, split_kv, write_slots
from mixkv.integrations.vllm.paged_attention import PagedRequest, attend, build_step
from mixkv.integrations.vllm.paging import (
    Geometry,
    PagedRule,
    check_total,
    flat_storage,
    kept_total,
    pack,
)
from mixkv.integrations.vllm.slots import CompressionRule, slot_ids

L, H, HQ, D, BS = 3, 2, 4, 8, 4


def shared_caches(blocks: int, interleaved: bool, seed: int = 0) -> list[torch.Tensor]:
    """``L`` per-layer views ``(blocks, H, BS, 2D)`` of one storage: layer-major or block-major (both occur)."""
    gen = torch.Generator().manual_seed(seed)
    buf = torch.randn(L * blocks * H * BS * 2 * D, generator=gen)
    if interleaved:
        whole = buf.view(blocks, L, H, BS, 2 * D)
        return [whole[:, layer] for layer in range(L)]
    size = blocks * H * BS * 2 * D
    return [buf[layer * size:(layer + 1) * size].view(blocks, H, BS, 2 * D) for layer in range(L)]


def test_geometry_addresses_every_tile_of_both_layouts():
    for interleaved in (False, True):
        caches = shared_caches(5, interleaved)
        geom = Geometry.of(caches)
        flat = flat_storage(caches[0])
        for layer in (0, 2):
            for block in (0, 3):
                for head in (0, 1):
                    c = int(geom.tile_chunks(torch.tensor(layer), torch.tensor(block), torch.tensor(head)))
                    keys = flat[c * BS * D:(c + 1) * BS * D].view(BS, D)
                    values = flat[(c + 1) * BS * D:(c + 2) * BS * D].view(BS, D)
                    kc, vc = split_kv(caches[layer])
                    assert torch.equal(keys, kc[block, head]) and torch.equal(values, vc[block, head])


def test_geometry_refuses_caches_in_separate_storages():
    caches = [torch.zeros(4, H, BS, 2 * D) for _ in range(2)]
    with pytest.raises(RuntimeError, match="one backing storage"):
        Geometry.of(caches)


def _profile(tmp_path, seed=0):
    """Skewed head scores, so per-head methods really give heads different budgets."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(L, H, generator=gen) ** 3
    return Profile("test", L, H, head_scores=scores, retrieval_scores=scores.flip(0),
                   key_redundancy=torch.rand(L, H, generator=gen))


@pytest.mark.parametrize("name", ["snapkv", "adakv", "adakv+mixkv", "sparsemm", "headkv", "pyramidkv",
                                  "pyramidkv+mixkv", "pyramidkv-authors"])
def test_kept_total_is_what_the_method_keeps_on_real_data(name, tmp_path):
    budget, window, n = 12, 4, 37
    method = make_method(name, budget=budget, window=window, profile=_profile(tmp_path))
    torch.manual_seed(3)
    total = 0
    for layer in range(L):
        record = LayerPrefill(layer, L, torch.randn(1, HQ, window, D) * 3, torch.randn(1, H, n, D),
                              torch.randn(1, H, n, D), D ** -0.5, window=window, kernel=method.kernel)
        total += int(plan_layer(method, record).lengths.sum())
    assert kept_total(method, n, L, H) == total
    if method.keeps_full_budget:
        assert total == budget * L * H
    assert kept_total(method, budget, L, H) == budget * L * H  # a prompt that fits is kept whole


def test_a_total_that_differs_from_the_rule_is_refused():
    with pytest.raises(RuntimeError, match="cannot be served"):
        check_total(71, 72, "odd")


def test_pack_is_dense_unique_and_inside_the_first_blocks():
    caches = shared_caches(8, interleaved=True)
    geom = Geometry.of(caches)
    lengths = torch.tensor([[5, 9], [1, 3], [7, 0]])
    block_ids = [6, 2, 7, 0]
    packed = pack(lengths, block_ids, geom)
    per_block = L * H * BS
    assert packed.prompt_blocks == -(-25 // per_block) == 2
    valid = torch.arange(packed.chunks.shape[-1]) < lengths[..., None]
    addresses = set(zip(packed.chunks[valid].tolist(), packed.offsets[valid].tolist()))
    assert len(addresses) == 25  # one place per kept token
    allowed = {int(geom.tile_chunks(torch.tensor(layer), torch.tensor(b), torch.tensor(h)))
               for layer in range(L) for b in block_ids[:2] for h in range(H)}
    assert {c for c, _ in addresses} <= allowed


@pytest.mark.parametrize("name", ["adakv", "pyramidkv+mixkv", "sparsemm"])
@pytest.mark.parametrize("layout, interleaved", [(PLAIN, False), (KVLayout(keys_transposed=True), True)])
def test_compaction_and_attention_equal_masked_attention_over_the_kept_tokens(name, layout, interleaved, tmp_path):
    """Each head attends exactly over its own kept prompt tokens and the tokens after the prompt, row by row."""
    torch.manual_seed(0)
    budget, window, prompt, tail = 12, 4, 30, 2
    method = make_method(name, budget=budget, window=window, profile=_profile(tmp_path, 1))
    paged = PagedRule(method, L, H, BS)
    caches = shared_caches(24, interleaved, seed=1)
    block_ids = [9, 3, 7, 0, 5, 11, 2, 8, 20, 21]  # 40 slots, out of order as a pool hands them out
    n = prompt + tail
    kt, vt = layout.keys_transposed, layout.values_transposed
    slots = torch.from_numpy(slot_ids(block_ids, BS, n))
    before = [(read_slots(split_kv(kv)[0], slots, kt), read_slots(split_kv(kv)[1], slots, vt)) for kv in caches]
    queries = torch.randn(L, HQ, window, D) * 3
    job = Compaction(block_ids=block_ids, prompt_length=prompt, computed=n, queries=queries, scaling=D ** -0.5)
    packed, plans = compact_paged(method, paged, job, caches, layout=layout, keep_plans=True)
    assert packed.prompt_blocks == paged.prompt_blocks(prompt)
    # the rule both processes share: held slot = position - (prompt - P * bs)
    rule = CompressionRule(budget, window, prompt_slots=paged.prompt_slots)
    offset = rule.offset(prompt)
    assert offset == prompt - packed.prompt_blocks * BS
    # one more token (position n) written by "the engine" at its held slot, in every layer
    new_slot = torch.from_numpy(slot_ids(block_ids, BS, 1, start=n - offset))
    new = [(torch.randn(H, 1, D), torch.randn(H, 1, D)) for _ in range(L)]
    for kv, (k, v) in zip(caches, new):
        write_slots(split_kv(kv)[0], new_slot, k, kt)
        write_slots(split_kv(kv)[1], new_slot, v, vt)
    geom = Geometry.of(caches)
    flat = flat_storage(caches[0])
    request = PagedRequest(rows=[1, 2, 4], visible=[1, 2, 3], prompt=packed,
                           decode_blocks=block_ids[packed.prompt_blocks:])
    step = build_step(geom, [request])
    query = torch.randn(6, HQ, D)
    for layer in range(L):
        got = attend(step, layer, query, flat, geom, D ** -0.5, kt, vt)
        keys, values = before[layer]
        keys = torch.cat([keys, new[layer][0]], dim=1)
        values = torch.cat([values, new[layer][1]], dim=1)
        kept = plans[layer]
        for i, (row, seen) in enumerate(zip(request.rows, request.visible)):
            for qh in range(HQ):
                h = qh // (HQ // H)
                pos = kept[h][kept[h] >= 0]
                pos = torch.cat([pos, torch.arange(prompt, prompt + seen)])
                ref = torch.softmax(keys[h, pos] @ query[row, qh] * D ** -0.5, 0) @ values[h, pos]
                torch.testing.assert_close(got[i, qh], ref)


def test_a_step_of_several_requests_pads_each_to_the_widest_and_masks_the_rest(tmp_path):
    """Two packed requests of different budgets and decode lengths in one step: every row equals its own reference."""
    torch.manual_seed(4)
    window, tail = 4, 0
    caches = shared_caches(40, interleaved=True, seed=5)
    geom = Geometry.of(caches)
    jobs = []
    for budget, prompt, block_ids, seen in ((12, 30, [1, 3, 5, 7, 9, 11, 13, 15, 17], [2, 5]),
                                            (20, 36, [20, 22, 24, 26, 28, 30, 32, 34, 36, 38], [9])):
        method = make_method("headkv+mixkv", budget=budget, window=window, profile=_profile(tmp_path, budget))
        slots = torch.from_numpy(slot_ids(block_ids, BS, prompt))
        before = [(read_slots(split_kv(kv)[0], slots), read_slots(split_kv(kv)[1], slots)) for kv in caches]
        job = Compaction(block_ids=block_ids, prompt_length=prompt, computed=prompt + tail,
                         queries=torch.randn(L, HQ, window, D) * 3, scaling=D ** -0.5)
        packed, plans = compact_paged(method, PagedRule(method, L, H, BS), job, caches, keep_plans=True)
        # tokens after the prompt, written at their held slots as the engine would
        start = packed.prompt_blocks * BS
        extra = max(seen)
        decoded = [(torch.randn(H, extra, D), torch.randn(H, extra, D)) for _ in range(L)]
        held = torch.from_numpy(slot_ids(block_ids, BS, extra, start=start))
        for kv, (k, v) in zip(caches, decoded):
            write_slots(split_kv(kv)[0], held, k)
            write_slots(split_kv(kv)[1], held, v)
        jobs.append((packed, plans, before, decoded, prompt, block_ids, seen))
    rows = iter(range(10))
    requests = [PagedRequest(rows=[next(rows) for _ in seen], visible=seen, prompt=packed,
                             decode_blocks=block_ids[packed.prompt_blocks:])
                for packed, _, _, _, _, block_ids, seen in jobs]
    step = build_step(geom, requests)
    query = torch.randn(5, HQ, D)
    flat = flat_storage(caches[0])
    for layer in range(L):
        got = attend(step, layer, query, flat, geom, D ** -0.5, False, False)
        i = 0
        for (_packed, plans, before, decoded, prompt, _, seen), req in zip(jobs, requests):
            keys = torch.cat([before[layer][0], decoded[layer][0]], dim=1)
            values = torch.cat([before[layer][1], decoded[layer][1]], dim=1)
            for row, visible in zip(req.rows, seen):
                for qh in range(HQ):
                    h = qh // (HQ // H)
                    pos = plans[layer][h][plans[layer][h] >= 0]
                    pos = torch.cat([pos, torch.arange(prompt, prompt + visible)])
                    ref = torch.softmax(keys[h, pos] @ query[row, qh] * D ** -0.5, 0) @ values[h, pos]
                    torch.testing.assert_close(got[i, qh], ref)
                i += 1
