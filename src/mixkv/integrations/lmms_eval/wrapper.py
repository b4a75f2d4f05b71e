"""mixkv around an existing lmms-eval model class: same chat template, image processing and generation code,
run inside ``mixkv.press`` (needs lmms-eval; imported only by lmms-eval through :mod:`.wrapped`).

:func:`make_wrapper` subclasses the lmms-eval class (``class MixKV_qwen2_5_vl(MixKVMixin, Qwen2_5_VL)``):

* ``__init__`` takes mixkv's ``--model_args`` keys out (:func:`.args.split_model_args`), validates them before
  the model loads, lets the lmms-eval class load the model as usual, then checks that mixkv supports it;
* ``generate_until`` runs the lmms-eval class's own ``generate_until`` inside ``mixkv.press`` (one press per
  call) with a :class:`.recorder.PrefillRecorder` on the Hugging Face model, and returns lmms-eval
  ``GenerationResult`` objects whose ``token_counts`` carry mixkv's per-sample numbers.

Why ``token_counts``: it is the one per-sample channel lmms-eval 0.7 has from a model to its logs -- the
evaluator copies ``token_counts.to_dict()`` of each request into the logged sample (``--log_samples``
JSONL, key ``token_counts``). :class:`MixKVTokenCounts` subclasses lmms-eval's ``TokenCounts`` and adds
``kv_bytes``, ``kv_bytes_full``, ``compress_ms``, ``batch_rows`` and ``method`` to that dict; lmms-eval's
own token summary keeps reading ``input_tokens`` / ``output_tokens`` from it unchanged.

Request order: lmms-eval wrappers sort requests (``lmms_eval.utils.Collator``), generate in that order and
restore the original order with ``Collator.get_original``. For the duration of the call that method is
wrapped so that it also reports the permutation it applies; the recorder's rows (in generation order) are
permuted the same way. When a wrapper does not go through ``Collator`` and generates exactly one row per
request, generation order is taken as request order; otherwise the per-sample numbers are left out (with a
warning) rather than attributed to the wrong sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from loguru import logger
from torch import nn

from ...core.models import inspect_model
from ...core.press import press
from .args import PressArgs, split_model_args
from .recorder import PrefillRecorder, order_rows


def _token_counts_class():
    from lmms_eval.api.instance import TokenCounts

    @dataclass
    class MixKVTokenCounts(TokenCounts):
        """lmms-eval's per-request counters plus mixkv's (see the module docstring)."""

        kv_bytes: int | None = None
        kv_bytes_full: int | None = None
        compress_ms: float | None = None
        batch_rows: int | None = None
        method: str | None = None

        def to_dict(self) -> dict[str, Any]:
            d: dict[str, Any] = super().to_dict()
            for key in ("kv_bytes", "kv_bytes_full", "compress_ms", "batch_rows", "method"):
                value = getattr(self, key)
                if value is not None:
                    d[key] = value
            return d

    return MixKVTokenCounts


@contextlib.contextmanager
def _capture_reorders(perms: list[list[int]]) -> Iterator[None]:
    """While active, every ``Collator.get_original(newarr)`` also appends the permutation it applied."""
    from lmms_eval import utils

    original = utils.Collator.get_original

    def get_original(self, newarr):
        perms.append(original(self, list(range(len(newarr)))))
        return original(self, newarr)

    utils.Collator.get_original = get_original
    try:
        yield
    finally:
        utils.Collator.get_original = original


def hf_model_of(lm: Any) -> nn.Module:
    """The Hugging Face model an lmms-eval wrapper generates with (its ``model`` property, else ``_model``)."""
    for name in ("model", "_model"):
        candidate = getattr(lm, name, None)
        if isinstance(candidate, nn.Module) and hasattr(candidate, "generate"):
            return candidate
    raise ValueError(f"{type(lm).__name__} exposes no Hugging Face model (.model / ._model) for mixkv to press")


class MixKVMixin:
    """Put first in the bases of an lmms-eval model class (see :func:`make_wrapper`)."""

    mixkv_args: PressArgs

    def __init__(self, **kwargs: Any) -> None:
        self.mixkv_args, rest = split_model_args(kwargs)
        self._mixkv_method = self.mixkv_args.make()
        super().__init__(**rest)
        model = hf_model_of(self)
        info = inspect_model(model)  # a clear error for a model family mixkv does not support
        if self._mixkv_method is not None:
            self._mixkv_method.validate_for(info)
        self._mixkv_counts = _token_counts_class()
        logger.info(f"mixkv: {self.mixkv_args.label} on {info.name} ({info.model_type})")

    def generate_until(self, requests):
        from lmms_eval.api.instance import GenerationResult, TokenCounts

        model = hf_model_of(self)
        perms: list[list[int]] = []
        with press(model, self._mixkv_method, timing=True) as session, \
                PrefillRecorder(model, session) as recorder, _capture_reorders(perms):
            outputs = super().generate_until(requests)
        rows = order_rows(recorder.rows, perms, len(outputs))
        if rows is None:
            logger.warning(f"mixkv: could not map {len(recorder.rows)} generated rows to {len(outputs)} requests "
                           f"({len(perms)} reorderings seen); per-sample KV bytes are left out of this call")
        results = []
        for i, out in enumerate(outputs):
            if isinstance(out, GenerationResult):
                text, base = out.text, out.token_counts
            else:
                text, base = out, None
            base = base if isinstance(base, TokenCounts) else TokenCounts()
            row = rows[i] if rows is not None else None
            counts = self._mixkv_counts(
                input_tokens=base.input_tokens if base.input_tokens is not None else (row and row.prompt_tokens),
                output_tokens=base.output_tokens, reasoning_tokens=base.reasoning_tokens,
                kv_bytes=row.kv_bytes if row else None, kv_bytes_full=row.kv_bytes_full if row else None,
                compress_ms=round(1000 * row.compress_seconds, 3) if row else None,
                batch_rows=row.batch_rows if row else None, method=self.mixkv_args.label)
            results.append(GenerationResult(text=text, token_counts=counts))
        return results


def make_wrapper(base: type, name: str) -> type:
    """``class <name>(MixKVMixin, base)``, keeping ``base``'s ``is_simple`` (lmms-eval checks it)."""
    return type(name, (MixKVMixin, base), {
        "is_simple": getattr(base, "is_simple", True),
        "__module__": "mixkv.integrations.lmms_eval.wrapped",
        "__qualname__": name,
        "__doc__": f"mixkv.press around lmms-eval's {base.__module__}.{base.__qualname__}.",
    })
