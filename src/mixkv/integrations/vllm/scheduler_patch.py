"""Engine-core side: free a compressed request's blocks and size its later allocations by held slots.

vLLM 0.32 has no call that shrinks a running request below its position (``remove_skipped_blocks``
only swaps blocks for the null block and keeps the table positional), so five functions are wrapped,
each for one reason (targets and the parameters the wrappers re-declare: :mod:`.internals`, checked
at start-up):

* ``Scheduler.__init__``: turns prefix caching off (compressed blocks no longer hold the prompt's
  prefix, so they must never be shared or reused) and checks (:func:`engine_refusal`) that the model
  has one full-attention KV group, that the workers use the V1 model runner (the one
  :mod:`.runner_patch` wraps) and that the scheduler waits for each step before the next (no async
  scheduling, no pipeline parallelism: with a batch queue the trim below could run before the worker
  has compressed).
* ``Scheduler.schedule``: before scheduling, every running request whose prompt was completed by the
  previous step (and was compressed by the worker at the end of that step, :mod:`.slots` says when)
  gives its blocks past ``ceil(held / block_size)`` back to the pool, and its offset
  (``prompt - budget``) is recorded. After scheduling, a trace line is written when asked for.
* ``KVCacheManager.allocate_slots``: for a compressed request, runs with
  ``request.num_computed_tokens`` lowered by the offset for the duration of the call, so new blocks
  are counted from the held length (a decode step needs a block only every ``block_size`` tokens).
  Everything else (output, positions, stop checks) keeps the true count.
* ``Scheduler._preempt_request``: forgets the offset; the preempted request is recomputed from
  scratch and compressed again when its recomputation reaches the end of its prompt (the same kept
  positions: the prompt's keys and values do not depend on what follows). The preemption is noted
  for the trace.
* ``Scheduler._reserve_prefill_lookahead`` (vLLM's last cap on a request's tokens in a step, for
  running and waiting requests alike): a step that would run past the end of a prompt it completes
  stops there (:meth:`.slots.CompressionRule.stop_at_prompt`). Only a resumed request has tokens past
  its prompt; this way its outputs are recomputed over the compressed prompt, as they were first
  computed, and preemption does not change what it generates.

State lives in one :class:`SchedulerState` per process (vLLM runs one scheduler per engine core).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

from . import internals as vi
from .config import PluginConfig
from .paging import PagedRule
from .slots import CompressionRule
from .trace import StepRecord, TraceWriter, now

logger = logging.getLogger("mixkv.vllm")


@dataclass
class SchedulerState:
    config: PluginConfig
    rule: CompressionRule
    block_size: int = 0
    offsets: dict[str, int] = field(default_factory=dict)
    trace: TraceWriter | None = None
    freed_total: int = 0
    preempted: list[tuple[str, int]] = field(default_factory=list)  # (request id, outputs) since the last trace line


STATE: SchedulerState | None = None


def engine_refusal(group_specs: list[str], v2_runner: bool, async_scheduling: bool,
                   concurrent_batches: int, pipeline_parallel: int, tensor_parallel: int = 1,
                   kv_heads: int = 1, paged: bool = False) -> str | None:
    """Why the plugin cannot compress in this engine configuration (None: it can).

    ``group_specs``: the class names of the KV cache groups' specs. The scheduler frees a request's
    blocks at the step after the worker compressed it, so the scheduler must not run ahead of the
    workers (async scheduling and pipeline parallelism keep several batches in flight). A KV head's
    score averages its whole GQA group's queries, so a head must not be split over workers.
    """
    if group_specs != ["FullAttentionSpec"]:
        return f"mixkv's vLLM plugin supports models with one full-attention KV cache group; got {group_specs}"
    if v2_runner:
        return ("mixkv's vLLM plugin patches the V1 model runner; vLLM chose the V2 runner "
                "(set VLLM_USE_V2_MODEL_RUNNER=0)")
    if async_scheduling:
        return "mixkv's vLLM plugin needs synchronous scheduling (async_scheduling=False)"
    if pipeline_parallel > 1:
        return (f"mixkv's vLLM plugin does not support pipeline parallelism (pipeline_parallel_size="
                f"{pipeline_parallel}): its batch queue lets the scheduler free blocks before the workers have "
                "compressed them; use tensor parallelism (supported) or one stage")
    if tensor_parallel > kv_heads:
        return (f"mixkv's vLLM plugin needs tensor_parallel_size ({tensor_parallel}) not larger than the model's KV "
                f"heads ({kv_heads}): vLLM would replicate each KV head over workers that each hold part of its "
                f"query group, so the copies would keep different tokens; use a size that divides {kv_heads}")
    if paged and tensor_parallel > 1:
        return (f"mixkv's per-layer / per-head paging runs on one worker (tensor_parallel_size={tensor_parallel}): "
                "each worker would hold its own heads' share of the budget, a different number of blocks per "
                "worker where vLLM keeps one block table; serve a uniform method (snapkv, snapkv+mixkv) with "
                "tensor parallelism, or this method on one worker")
    if concurrent_batches > 1:
        return (f"mixkv's vLLM plugin needs one batch in flight (vLLM would keep {concurrent_batches}): the "
                "scheduler must not free blocks before the workers have compressed them")
    return None


def paged_rule(config: PluginConfig, num_layers: int, kv_heads: int, block_size: int, model: str) -> CompressionRule:
    """The compression rule of a per-layer / per-head method on this model; a profile made for another model's
    shape is refused here, when the engine starts."""
    from types import SimpleNamespace

    method = config.make_method()
    method.validate_for(SimpleNamespace(name=model, num_layers=num_layers, num_kv_heads=kv_heads))
    paged = PagedRule(method, num_layers, kv_heads, block_size)
    return CompressionRule(config.budget, config.window, prompt_slots=paged.prompt_slots)


def _single_type_managers(scheduler) -> list:
    return list(scheduler.kv_cache_manager.coordinator.single_type_managers)


def trim_compressed(scheduler, state: SchedulerState) -> int:
    """Give back the blocks of requests compressed by the last step; returns how many were freed."""
    freed = 0
    for request in scheduler.running:
        rid = request.request_id
        p = request.num_prompt_tokens
        if rid in state.offsets or not state.rule.compresses(p) or request.num_computed_tokens < p:
            continue
        keep = state.rule.blocks_kept(request.num_computed_tokens, p, state.block_size)
        for manager in _single_type_managers(scheduler):
            blocks = manager.req_to_blocks.get(rid)
            if not blocks or len(blocks) <= keep:
                continue
            tail = blocks[keep:]
            del blocks[keep:]
            manager.block_pool.free_blocks(reversed(tail))
            freed += len(tail)
        state.offsets[rid] = state.rule.offset(p)
    for rid in [r for r in state.offsets if r not in scheduler.requests]:
        del state.offsets[rid]
    state.freed_total += freed
    return freed


def patch_scheduler(config: PluginConfig) -> None:
    """Install the wrappers (once per process)."""
    global STATE
    scheduler_class = vi.SCHEDULER.resolve()
    full_attention = vi.FULL_ATTENTION_SPEC.resolve()

    if getattr(scheduler_class, "_mixkv_patched", False):
        return
    STATE = SchedulerState(config=config, rule=CompressionRule(config.budget, config.window))
    init, schedule, preempt = vi.SCHEDULER_INIT.resolve(), vi.SCHEDULE.resolve(), vi.PREEMPT.resolve()
    # Wrapped only when compressing (checked at start-up only then: :func:`.internals.required`).
    lookahead = vi.PREFILL_LOOKAHEAD.resolve() if config.compresses else None
    allocate = vi.ALLOCATE_SLOTS.resolve() if config.compresses else None

    @functools.wraps(init)
    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs):
        if config.compresses and vllm_config.cache_config.enable_prefix_caching:
            logger.warning("mixkv: prefix caching turned off (compressed blocks must not be shared)")
            vllm_config.cache_config.enable_prefix_caching = False
        init(self, vllm_config, kv_cache_config, *args, **kwargs)
        groups = kv_cache_config.kv_cache_groups
        if config.compresses:
            specs = ["FullAttentionSpec" if isinstance(g.kv_cache_spec, full_attention)
                     else type(g.kv_cache_spec).__name__ for g in groups]
            refusal = engine_refusal(specs, bool(vllm_config.use_v2_model_runner),
                                     bool(vllm_config.scheduler_config.async_scheduling),
                                     int(vllm_config.max_concurrent_batches),
                                     int(vllm_config.parallel_config.pipeline_parallel_size),
                                     int(vllm_config.parallel_config.tensor_parallel_size),
                                     int(vllm_config.model_config.get_total_num_kv_heads()), config.paged)
            if refusal:
                raise RuntimeError(refusal)
        STATE.block_size = groups[0].kv_cache_spec.block_size if groups else 0
        if config.paged:
            STATE.rule = paged_rule(config, len(groups[0].layer_names),
                                    int(vllm_config.model_config.get_total_num_kv_heads()), STATE.block_size,
                                    str(vllm_config.model_config.model))
        if config.trace_path and STATE.trace is None:
            STATE.trace = TraceWriter(config.trace_path)
        logger.info("mixkv: %s, budget %d, window %d, block size %d", config.method_name, config.budget,
                    config.window, STATE.block_size)

    @functools.wraps(schedule)
    def schedule_(self, *args, **kwargs):
        freed = trim_compressed(self, STATE) if config.compresses else 0
        output = schedule(self, *args, **kwargs)
        if STATE.trace is not None:
            pool = self.kv_cache_manager.block_pool
            STATE.trace.write(StepRecord(
                t=now(), running=len(self.running), waiting=len(self.waiting),
                scheduled_tokens=int(output.total_num_scheduled_tokens), free_blocks=pool.get_num_free_blocks(),
                total_blocks=pool.num_gpu_blocks, compressed=len(STATE.offsets), freed_blocks=freed,
                preempted=[rid for rid, _ in STATE.preempted], preempted_outputs=[n for _, n in STATE.preempted]))
        STATE.preempted.clear()  # also without a trace: the list must not grow for the server's lifetime
        return output

    @functools.wraps(allocate)
    def allocate_slots(self, request, *args, **kwargs):
        offset = STATE.offsets.get(request.request_id, 0)
        if not offset:
            return allocate(self, request, *args, **kwargs)
        request.num_computed_tokens -= offset
        try:
            return allocate(self, request, *args, **kwargs)
        finally:
            request.num_computed_tokens += offset

    @functools.wraps(preempt)
    def _preempt_request(self, request, *args, **kwargs):
        STATE.offsets.pop(request.request_id, None)
        STATE.preempted.append((request.request_id, int(request.num_output_tokens)))
        return preempt(self, request, *args, **kwargs)

    @functools.wraps(lookahead)
    def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens, *args, **kwargs):
        n = lookahead(self, request, num_computed_tokens, num_new_tokens, *args, **kwargs)
        return STATE.rule.stop_at_prompt(num_computed_tokens, n, request.num_prompt_tokens)

    vi.SCHEDULER_INIT.install(__init__)
    vi.SCHEDULE.install(schedule_)
    vi.PREEMPT.install(_preempt_request)  # without compression: only noted for the trace
    if config.compresses:
        vi.ALLOCATE_SLOTS.install(allocate_slots)
        vi.PREFILL_LOOKAHEAD.install(_reserve_prefill_lookahead)
    scheduler_class._mixkv_patched = True
