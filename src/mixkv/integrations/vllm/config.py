"""What the plugin does, read from the environment of every vLLM process.

vLLM starts the engine core and its workers in separate processes and loads ``vllm.general_plugins``
in each of them; environment variables reach every one of them, whether the engine was started by
``LLM(...)`` or ``vllm serve``. That is why the plugin is configured by environment only:

* ``MIXKV_VLLM_METHOD``: a mixkv registry name (``snapkv``, ``snapkv+mixkv``, ``random``), or
  ``full`` (no compression, only the scheduler trace). Unset or empty: the plugin does nothing
  and patches nothing, so an installed plugin is inert until asked for.
* ``MIXKV_VLLM_BUDGET``: tokens kept per KV head, window included (default 128).
* ``MIXKV_VLLM_WINDOW``: observation window ``W`` (default mixkv's, 32).
* ``MIXKV_VLLM_TRACE``: a path; the scheduler appends one JSON line per step (running and waiting
  requests, free blocks) so a benchmark can read concurrency from any process layout.
* ``MIXKV_VLLM_DUMP``: a directory; the worker saves the kept positions of every compressed request
  there (``<request id>.pt``; with tensor parallelism one file per rank, ``<request id>.tp<rank>.pt``,
  each holding that rank's KV heads), so a check can compare them with ``mixkv.press``'s.

Decisions (the issue is silent on them):

* Only **uniform** methods are accepted: every head of every layer keeps ``budget`` tokens, so the
  kept tokens fit vLLM's paged blocks as they are (one block table per request for all layers,
  every head of a layer in the same slots). Per-layer (PyramidKV) and per-head (AdaKV, SparseMM,
  HeadKV) budgets are refused with the reason, not silently padded: padding them to the largest
  layer or head would still run but would not be the method's memory.
* MixKV's head redundancy is computed online (from the prompt); a profile path cannot be given
  here (no profile-driven method is uniform).
* Errors name the variable and the accepted values; they are raised when the plugin loads, i.e.
  when the engine starts, not at the first request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from mixkv.core import defaults
from mixkv.core.methods.base import Allocation, Method
from mixkv.core.registry import allocation_of, available_methods, make_method

ENV_METHOD = "MIXKV_VLLM_METHOD"
ENV_BUDGET = "MIXKV_VLLM_BUDGET"
ENV_WINDOW = "MIXKV_VLLM_WINDOW"
ENV_TRACE = "MIXKV_VLLM_TRACE"
ENV_DUMP = "MIXKV_VLLM_DUMP"
DEFAULT_BUDGET = defaults.SERVING_BUDGET

# Why a declared allocation other than uniform cannot be served yet (the method's trait decides, not its name).
WHY_NOT = {
    "pyramidkv": "PyramidKV gives layers different budgets; vLLM 0.32 has one block table per request for "
                 "all layers, so every layer would be sized for the largest (see docs/serving.md)",
    "adakv": "AdaKV gives heads different budgets; vLLM's blocks hold every head of a layer in the same slots, "
             "so it needs per-head paging (see docs/serving.md)",
    "sparsemm": "SparseMM gives heads different budgets (per-head paging needed, see docs/serving.md)",
    "headkv": "HeadKV gives heads different budgets (per-head paging needed, see docs/serving.md)",
}


@dataclass(frozen=True)
class PluginConfig:
    """The plugin's settings. ``method`` is None for ``full`` (trace only, nothing compressed)."""

    method_name: str
    budget: int
    window: int
    trace_path: str | None = None
    dump_dir: str | None = None

    @property
    def compresses(self) -> bool:
        return self.method_name != "full"

    def make_method(self) -> Method | None:
        """The mixkv method object (built per process: methods are cheap dataclasses)."""
        if not self.compresses:
            return None
        return make_method(self.method_name, budget=self.budget, window=self.window)


def _int_var(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number of tokens, got {raw!r}") from None


def config_from_env(environ: Mapping[str, str] | None = None) -> PluginConfig | None:
    """Parse the plugin's variables; None when ``MIXKV_VLLM_METHOD`` is unset or empty (plugin off)."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_METHOD, "").strip()
    if not raw:
        return None
    name = raw.lower()
    base, _, _wrapper = name.partition("+")
    if name != "full" and name not in available_methods():
        raise ValueError(f"{ENV_METHOD}={raw!r} is not a mixkv method; accepted here: "
                         f"{', '.join(accepted_methods())}")
    if name != "full" and allocation_of(name) is not Allocation.UNIFORM:
        reason = WHY_NOT.get(base, f"{base} does not keep the same number of tokens in every head and layer "
                                   f"(its allocation is {allocation_of(name).value})")
        raise ValueError(f"{ENV_METHOD}={raw!r} is not supported by the vLLM plugin yet: {reason}. "
                         f"Accepted: {', '.join(accepted_methods())}")
    budget = _int_var(env, ENV_BUDGET, DEFAULT_BUDGET)
    window = _int_var(env, ENV_WINDOW, defaults.WINDOW)
    if window < 1:
        raise ValueError(f"{ENV_WINDOW} must be at least 1, got {window}")
    if budget <= window:
        raise ValueError(f"{ENV_BUDGET}={budget} must be larger than the window ({window}): the budget counts the "
                         f"window's {window} tokens, so use {ENV_BUDGET} >= {window + 1}")
    trace = env.get(ENV_TRACE, "").strip() or None
    dump = env.get(ENV_DUMP, "").strip() or None
    config = PluginConfig(method_name=name, budget=budget, window=window, trace_path=trace, dump_dir=dump)
    config.make_method()  # the method's own checks (budget range, ...) fail here, at engine start
    return config


def accepted_methods() -> list[str]:
    """Names the plugin accepts: ``full`` and every uniform base, alone or wrapped."""
    return ["full"] + [m for m in available_methods() if allocation_of(m) is Allocation.UNIFORM]
