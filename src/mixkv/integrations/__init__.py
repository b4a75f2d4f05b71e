"""Plugins of other programs (optional; each runs in its engine's own environment).

* :mod:`mixkv.integrations.vllm`: a vLLM plugin (entry point ``vllm.general_plugins``) that compresses
  each request's KV cache right after its prefill and returns the freed blocks to the pool.
* :mod:`mixkv.integrations.lmms_eval`: mixkv's models for lmms-eval (entry point ``lmms_eval.models``),
  and an lmms-eval task over the toy VLM's generated samples.

Integrations use :mod:`mixkv.core` (one source of truth for scoring and selection) and, for the toy
VLM, :mod:`mixkv.testbeds`; never the lab or the command line (``tests/test_layout.py``).
"""
