"""Worker side: keep positions true while slots and attention lengths follow the held cache.

Two methods of vLLM 0.32's V1 ``GPUModelRunner`` (which ``CPUModelRunner`` inherits) are wrapped:

* ``_prepare_inputs``: after vLLM has built the step's inputs from true positions, for each
  compressed request it lowers ``seq_lens`` (the attention's KV length) and
  ``optimistic_seq_lens_cpu`` (its host copy, used for ``max_seq_len``) by the request's offset and
  recomputes the slot mapping from ``position - offset``; ``positions`` (RoPE) are left true. It
  also tells the window store which rows of this batch are window queries, and notes the requests
  whose prompt this step completes.
* ``execute_model``: before the step, forgets finished and resumed (preempted) requests; after the
  forward (KV written, logits computed, sampling not yet done, which reads logits only) it compresses
  the noted requests with :func:`.compact.compact_request`, truncates their block lists (the
  request state's and the persistent block table row) to the blocks the scheduler keeps, and
  records their offsets. The scheduler frees the same blocks at its next step (:mod:`.slots` keeps
  both sides in agreement without messages).

The runner's state hangs off the runner object (one per worker process). Every vLLM name used here,
and the parameters the wrappers re-declare: :mod:`.internals`, checked at start-up.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import attention_patch
from . import internals as vi
from .capture import StepCapture, WindowStore
from .compact import Compaction, compact_paged, compact_request
from .config import PluginConfig
from .kvlayout import KVLayout, detect_layout
from .paged_attention import PagedRequest, build_step
from .paging import Geometry, PackedPrompt, PagedRule, flat_storage
from .slots import CompressionRule, window_tokens

logger = logging.getLogger("mixkv.vllm")


@dataclass
class RunnerState:
    config: PluginConfig
    rule: CompressionRule
    method: object
    store: WindowStore
    layer_names: list[str]
    block_size: int
    layout: KVLayout
    offsets: dict[str, int] = field(default_factory=dict)
    finishing: list[tuple[str, int]] = field(default_factory=list)
    compress_seconds: float = 0.0
    compressed: int = 0
    paged: PagedRule | None = None  # per-layer / per-head methods: packed prompts (:mod:`.paging`)
    geometry: Geometry | None = None
    packed: dict[str, PackedPrompt] = field(default_factory=dict)


def _layer_order(names: list[str]) -> list[str]:
    extract_layer_index = vi.EXTRACT_LAYER_INDEX.resolve()
    return sorted(names, key=extract_layer_index)


def _check_layout(runner, names: list[str]) -> KVLayout:
    """The cache's element order, found with the engine's own writer; refuse one the plugin would misread."""
    write_cache = vi.CPU_CACHE_WRITER.resolve()
    context = runner.compilation_config.static_forward_context
    layer = context[names[0]]
    impl = layer.impl
    if type(impl) is not vi.CPU_ATTENTION_IMPL.resolve():
        raise RuntimeError(f"mixkv's vLLM plugin supports the CPU attention backend only; got {type(impl).__name__}")
    if impl.kv_cache_dtype not in ("auto", None):
        raise RuntimeError(f"mixkv's vLLM plugin needs an unquantised KV cache; got {impl.kv_cache_dtype}")
    kv = layer.kv_cache
    _, heads, block_size, two_d = kv.shape

    def writer(k, v, kc, vc, slots):
        write_cache(k, v, kc, vc, slots, layer.isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

    layout = detect_layout(writer, heads, two_d // 2, block_size, kv.dtype)
    if layout is None:
        raise RuntimeError(f"mixkv: the KV layout of CPU attention (isa {layer.isa!r}) is none of the layouts the "
                           "plugin can read; compression is not supported with this kernel")
    logger.info("mixkv: CPU attention isa %r stores %s", layer.isa, layout.describe())
    return layout


def _check_paged_attention(impl) -> None:
    """The plugin's own attention (per-head requests) computes plain softmax attention: refuse what it omits."""
    window = getattr(impl, "sliding_window", -1)
    extras = {"sliding_window": window not in (-1, None),
              "alibi_slopes": getattr(impl, "alibi_slopes", None) is not None,
              "logits_soft_cap": bool(getattr(impl, "logits_soft_cap", None) or 0),
              "sinks": getattr(impl, "sinks", None) is not None}
    found = [k for k, v in extras.items() if v]
    if found:
        raise RuntimeError(f"mixkv's per-layer / per-head paging attends with plain softmax attention; this model's "
                           f"attention uses {', '.join(found)}: serve a uniform method (snapkv, snapkv+mixkv)")


def _state(runner) -> RunnerState:
    state = getattr(runner, "_mixkv", None)
    if state is not None:
        return state
    config: PluginConfig = runner._mixkv_config
    groups = runner.kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise RuntimeError(f"mixkv's vLLM plugin supports one KV cache group; got {len(groups)}")
    names = _layer_order(list(groups[0].layer_names))
    layout = _check_layout(runner, names)
    store = WindowStore(window=config.window, layer_index={n: i for i, n in enumerate(names)})
    method = config.make_method()
    block_size = groups[0].kv_cache_spec.block_size
    rule, paged, geometry = CompressionRule(config.budget, config.window), None, None
    if config.paged:
        context = runner.compilation_config.static_forward_context
        _check_paged_attention(context[names[0]].impl)
        kv_caches = [context[name].kv_cache for name in names]
        geometry = Geometry.of(kv_caches)
        paged = PagedRule(method, len(names), geometry.num_kv_heads, block_size)
        rule = CompressionRule(config.budget, config.window, prompt_slots=paged.prompt_slots)
    state = RunnerState(config=config, rule=rule, method=method, store=store, layer_names=names,
                        block_size=block_size, layout=layout, paged=paged, geometry=geometry)
    attention_patch.STORE = store
    runner._mixkv = state
    return state


def plan_step(runner, state: RunnerState, num_scheduled: np.ndarray) -> None:
    """Apply offsets to this step's slots and lengths; mark window rows and finishing prompts."""
    batch = runner.input_batch
    n = batch.num_reqs
    req_ids = list(batch.req_ids[:n])
    computed = batch.num_computed_tokens_cpu[:n].astype(np.int64)
    prompt = batch.num_prompt_tokens[:n].astype(np.int64)
    offsets = np.array([state.offsets.get(r, 0) for r in req_ids], dtype=np.int64)
    if offsets.any():
        total = int(num_scheduled.sum())
        per_token = torch.from_numpy(np.repeat(offsets, num_scheduled))
        held_positions = runner.positions[:total] - per_token.to(runner.positions.dtype)
        per_req = torch.from_numpy(offsets)
        runner.seq_lens[:n] -= per_req.to(runner.seq_lens.dtype)
        runner.optimistic_seq_lens_cpu[:n] -= per_req.to(runner.optimistic_seq_lens_cpu.dtype)
        batch.block_table.compute_slot_mapping(n, runner.query_start_loc.gpu[: n + 1], held_positions)
    skip = offsets > 0
    starts = runner.query_start_loc.np[:n].astype(np.int64)
    rows, reqs, slots = window_tokens(state.rule, computed, num_scheduled.astype(np.int64), prompt, starts, skip)
    state.store.step = StepCapture.from_arrays(rows, reqs, slots, req_ids) if len(rows) else None
    state.finishing = [
        (rid, int(computed[i] + num_scheduled[i])) for i, rid in enumerate(req_ids)
        if not skip[i] and state.rule.finishes_prompt(int(computed[i]), int(num_scheduled[i]), int(prompt[i]))
    ]
    if state.paged is not None:
        attention_patch.PAGED = paged_step(runner, state, req_ids, computed, prompt, num_scheduled, starts)


def paged_step(runner, state: RunnerState, req_ids: list[str], computed: np.ndarray, prompt: np.ndarray,
               num_scheduled: np.ndarray, starts: np.ndarray) -> attention_patch.PagedContext | None:
    """The rows of this step's packed requests and the addresses their attention reads (None: no such rows)."""
    requests = []
    for i, rid in enumerate(req_ids):
        packed = state.packed.get(rid)
        if packed is None or not num_scheduled[i]:
            continue
        s = int(num_scheduled[i])
        first = int(computed[i]) - int(prompt[i]) + 1  # tokens after the prompt the first row sees, itself included
        blocks = runner.requests[rid].block_ids[0][packed.prompt_blocks:]
        requests.append(PagedRequest(rows=list(range(int(starts[i]), int(starts[i]) + s)),
                                     visible=list(range(first, first + s)), prompt=packed, decode_blocks=blocks))
    if not requests:
        return None
    context = runner.compilation_config.static_forward_context
    flat = flat_storage(context[state.layer_names[0]].kv_cache)
    chunks = flat[: (flat.numel() // state.geometry.chunk) * state.geometry.chunk].view(-1, state.geometry.chunk)
    return attention_patch.PagedContext(step=build_step(state.geometry, requests), geometry=state.geometry,
                                        flat=chunks, layout=state.layout, layer_index=state.store.layer_index)


def compress_finished_prompts(runner, state: RunnerState) -> None:
    """Compress every request whose prompt the step just completed, then shrink its block lists."""
    jobs, state.finishing = state.finishing, []
    if not jobs:
        return
    context = runner.compilation_config.static_forward_context
    kv_caches = [context[name].kv_cache for name in state.layer_names]
    table = runner.input_batch.block_table[0]
    for rid, computed in jobs:
        start = time.perf_counter()
        req_state = runner.requests[rid]
        row = runner.input_batch.req_id_to_index[rid]
        prompt = int(runner.input_batch.num_prompt_tokens[row])
        job = Compaction(block_ids=list(req_state.block_ids[0]), prompt_length=prompt, computed=computed,
                         queries=state.store.take(rid), scaling=state.store.scaling)
        dumping = state.config.dump_dir is not None
        if state.paged is None:
            plans = compact_request(state.method, state.rule, job, kv_caches, state.block_size, state.store.scaling,
                                    layout=state.layout, keep_plans=dumping)
        else:
            state.packed[rid], plans = compact_paged(state.method, state.paged, job, kv_caches, layout=state.layout,
                                                     keep_plans=dumping)
        keep = state.rule.blocks_kept(computed, prompt, state.block_size)
        del req_state.block_ids[0][keep:]
        old = int(table.num_blocks_per_row[row])
        table.block_table.np[row, keep:old] = 0
        table.num_blocks_per_row[row] = keep
        state.offsets[rid] = state.rule.offset(prompt)
        state.compress_seconds += time.perf_counter() - start
        state.compressed += 1
        if plans:
            out = Path(state.config.dump_dir)
            out.mkdir(parents=True, exist_ok=True)
            ids = req_state.prompt_token_ids
            rank, ranks = _tp_rank()
            name = f"{rid}.pt" if ranks == 1 else f"{rid}.tp{rank}.pt"  # each rank holds its own KV heads
            width = max(p.shape[-1] for p in plans)  # per-head plans: filler -1 past each head's length
            kept = torch.stack([torch.nn.functional.pad(p, (0, width - p.shape[-1]), value=-1) for p in plans])
            torch.save({"prompt_length": prompt, "prompt": list(ids) if ids is not None else None,
                        "kept": kept, "tp_rank": rank, "tp_size": ranks}, out / name)
        logger.debug("mixkv: compressed %s (%d -> %d tokens, %d blocks kept)", rid, prompt, state.rule.budget, keep)


def _tp_rank() -> tuple[int, int]:
    """This worker's tensor-parallel rank and the group size (its KV heads are one slice of the layer's)."""
    return vi.TP_RANK.resolve()(), vi.TP_WORLD_SIZE.resolve()()


def patch_runner(config: PluginConfig) -> None:
    runner_class = vi.MODEL_RUNNER.resolve()

    if getattr(runner_class, "_mixkv_patched", False):
        return
    prepare, execute = vi.PREPARE_INPUTS.resolve(), vi.EXECUTE_MODEL.resolve()
    runner_class._mixkv_config = config

    @functools.wraps(prepare)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        plan_step(self, _state(self), np.asarray(num_scheduled_tokens))
        return result

    @functools.wraps(execute)
    def execute_model(self, scheduler_output, *args, **kwargs):
        state = _state(self)
        gone = set(scheduler_output.finished_req_ids) | set(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
        for rid in gone:
            state.offsets.pop(rid, None)
            state.packed.pop(rid, None)
        state.store.forget(gone)
        state.finishing = []
        try:
            result = execute(self, scheduler_output, *args, **kwargs)
        finally:
            state.store.step = None
            attention_patch.PAGED = None
        compress_finished_prompts(self, state)
        return result

    vi.PREPARE_INPUTS.install(_prepare_inputs)
    vi.EXECUTE_MODEL.install(execute_model)
    runner_class._mixkv_patched = True
