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

* ``MIXKV_VLLM_PROFILE``: a calibration profile (``mixkv calibrate``), needed by the methods that read one
  (SparseMM's head scores, HeadKV's retrieval scores); its shape is checked against the served model when the
  engine starts.

Decisions (the issue is silent on them):

* Every allocation is served. **Uniform** methods (every head of every layer keeps ``budget`` tokens) keep
  their tokens in vLLM's paged blocks as they are and vLLM's own kernel attends over them. **Per-layer** and
  **per-head** methods (PyramidKV, AdaKV, SparseMM, HeadKV) pack each head's kept tokens densely into whole
  blocks and the plugin attends over them itself (:mod:`.paging`, :mod:`.paged_attention`), so a request
  holds the method's own memory, not the largest head's. Both processes must know a request's size from its
  prompt length alone, so a per-head method must declare ``keeps_full_budget`` (its total is the budget
  however heads share it); one that does not is refused by that trait.
* MixKV's head redundancy is computed online (from the prompt), the library's default.
* Errors name the variable and the accepted values; they are raised when the plugin loads, i.e.
  when the engine starts, not at the first request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mixkv.core import defaults
from mixkv.core.methods.base import Allocation, Method
from mixkv.core.registry import BASES, WRAPPERS, allocation_of, available_methods, make_method, needs_profile

ENV_METHOD = "MIXKV_VLLM_METHOD"
ENV_BUDGET = "MIXKV_VLLM_BUDGET"
ENV_WINDOW = "MIXKV_VLLM_WINDOW"
ENV_TRACE = "MIXKV_VLLM_TRACE"
ENV_DUMP = "MIXKV_VLLM_DUMP"
ENV_PROFILE = "MIXKV_VLLM_PROFILE"
DEFAULT_BUDGET = defaults.SERVING_BUDGET


@dataclass(frozen=True)
class PluginConfig:
    """The plugin's settings. ``method`` is None for ``full`` (trace only, nothing compressed)."""

    method_name: str
    budget: int
    window: int
    trace_path: str | None = None
    dump_dir: str | None = None
    profile: str | None = None

    @property
    def compresses(self) -> bool:
        return self.method_name != "full"

    @property
    def paged(self) -> bool:
        """True for per-layer and per-head methods: packed prompt blocks and the plugin's own attention."""
        return self.compresses and allocation_of(self.method_name) is not Allocation.UNIFORM

    def make_method(self) -> Method | None:
        """The mixkv method object (built per process: methods are cheap dataclasses)."""
        if not self.compresses:
            return None
        return make_method(self.method_name, budget=self.budget, window=self.window, profile=self.profile)


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
    if name != "full" and name not in available_methods():
        raise ValueError(f"{ENV_METHOD}={raw!r} is not a mixkv method; accepted here: "
                         f"{', '.join(accepted_methods())}")
    if name != "full" and (reason := why_not_served(name)):
        raise ValueError(f"{ENV_METHOD}={raw!r} is not supported by the vLLM plugin: {reason}. "
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
    profile = env.get(ENV_PROFILE, "").strip() or None
    if name != "full" and needs_profile(name) and profile is None:
        raise ValueError(f"{ENV_METHOD}={raw!r} reads a calibration profile: set {ENV_PROFILE} to one made for the "
                         "served model (`mixkv calibrate`; the toy VLM's ships in mixkv/testbeds/profiles/)")
    if profile is not None and not Path(profile).is_file():
        raise ValueError(f"{ENV_PROFILE}={profile!r} is not a file")
    config = PluginConfig(method_name=name, budget=budget, window=window, trace_path=trace, dump_dir=dump,
                          profile=profile)
    config.make_method()  # the method's own checks (budget range, profile format, ...) fail here, at engine start
    return config


def why_not_served(name: str) -> str | None:
    """Why a registered method cannot be served (None: it can), from its declared traits, never its name."""
    base, _, wrapper = name.partition("+")
    if wrapper and WRAPPERS[wrapper].reads_modality:
        return ("its scores read which prompt tokens are image tokens, and the plugin does not track that "
                "(it would serve a different score); use the method without the modality option")
    method_class = BASES[base]
    if method_class.allocation is Allocation.PER_HEAD and not method_class.keeps_full_budget:
        return ("its allocation is per head and it does not declare keeps_full_budget, so a request's size "
                "cannot be known from its prompt length before its scores are computed")
    return None


def accepted_methods() -> list[str]:
    """Names the plugin accepts: ``full`` and every method whose traits it can page (see :func:`why_not_served`)."""
    return ["full"] + [m for m in available_methods() if m != "full" and why_not_served(m) is None]
