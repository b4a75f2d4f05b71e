#!/usr/bin/env python3
"""Measure NVIDIA kvpress on prompts exported by ``mixkv compare``; the peer side of the comparison.

Runs INSIDE kvpress's venv (built by ``setup_env.sh`` next to this file: kvpress 0.5.5 needs
transformers<5.3) and never imports ``mixkv``, which needs transformers 5.24. ``mixkv compare`` runs it
(:mod:`mixkv.lab.compare.kvpress_side`); by hand::

    ~/.cache/mixkv/venv-kvpress/bin/python run_kvpress.py PROMPTS.json GGUF_PATH OUT.json

``PROMPTS.json`` (written by ``mixkv.lab.compare.export_prompts``)::

    {"format": "mixkv-compare-prompts", "version": 1,
     "settings": {"methods": ["full", "snapkv", "adakv"], "budget": 128, "compression_ratio": null,
                  "window": 32, "kernel": 5, "alpha_safeguard": 0.2, "max_new_tokens": 10,
                  "decode_steps": 16, "eos_token_ids": [2], "record_kept": true, "warmup": true},
     "prompts": [{"id": "1024/passkey/0", "context": 1024, "task": "passkey", "input_ids": [...],
                  "answer": "48213", "answer_kind": "number", "choices": null}, ...]}

What one run (prompt x method) does, with kvpress's own press API, as its pipeline does
(``KVPressTextGenerationPipeline._forward`` / ``generate_answer``) except that the whole prompt,
question included, is the compressed context -- exactly what mixkv compresses:

1. prefill: ``with press(model): model(input_ids, past_key_values=DynamicCache(), logits_to_keep=1)``;
   the press's forward hooks compress each layer right after its attention. ``prefill_s`` is the wall
   time of that call (compression included); ``compress_s`` the time inside ``press.compress``
   (summed over layers; the instance method is wrapped with a timer).
2. ``kv_bytes``: bytes of the key and value tensors the cache holds after prefill. kvpress's AdaKV
   does not evict: it records the pruned (head, position) pairs in ``module.masked_key_indices`` and
   overwrites those keys with a "fake key" at every decoding step, so its cache stays full size
   (``kv_bytes_unmasked`` counts only what it logically keeps).
3. greedy decoding of ``max(max_new_tokens, decode_steps)`` tokens from the prefill's last logits,
   positions continuing at the prompt length (``position_ids = N + i``, as the pipeline passes them;
   the compressed cache is shorter than N). Every step is timed; ``decode_ms_per_token`` is their
   median. The answer is the prefix up to the first EOS within ``max_new_tokens`` (greedy decoding
   is deterministic, so decoding on past EOS for timing does not change it).
4. ``peak_rss_mib``: the process's peak resident set (VmHWM, reset before the run through
   /proc/self/clear_refs), ``rss_before_mib`` the resident set before it.

Budget matching: mixkv's budget B counts tokens kept per KV head, the observation window included.
kvpress keeps ``n_kept = max(1, int(N * (1 - compression_ratio)))`` tokens per KV head, the window
included (SnapKV pads the window's scores with ``max + 1`` so it always survives). For each prompt of
N tokens the script uses ``compression_ratio = 1 - (B + 0.5) / N`` -- the ``+ 0.5`` makes the
truncation land exactly on B despite float rounding -- and asserts ``compute_n_kept(N, ratio) == B``.
AdaKV gets the same ratio: ``H * B`` tokens per layer shared among its H heads, as in mixkv. A prompt
with N <= B is not compressed (ratio 0), as in mixkv. With ``compression_ratio`` given instead of a
budget it is used as is and mixkv is given the budget ``int(N * (1 - ratio))`` per prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

FORMAT = "kvpress-compare-results"


# ---- process memory ----------------------------------------------------------------------------------

def _status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_reset() -> None:
    """Give freed heap back to the OS (glibc ``malloc_trim``), then reset the peak-RSS counter (Linux)
    so the next VmHWM is this run's peak (as ``mixkv.lab.machine.reset_peak_rss`` does on mixkv's side)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


# ---- budget matching ---------------------------------------------------------------------------------

def matched_ratio(n_tokens: int, budget: int) -> float:
    """kvpress ``compression_ratio`` that keeps exactly ``budget`` tokens per KV head of an N-token prompt."""
    if n_tokens <= budget:
        return 0.0
    return 1.0 - (budget + 0.5) / n_tokens


def ratio_for(prompt: dict, settings: dict) -> tuple[float, int]:
    """(compression_ratio, tokens kept per KV head) for one prompt under the settings."""
    from kvpress.utils import compute_n_kept

    n = len(prompt["input_ids"])
    if settings.get("budget") is not None:
        budget = int(settings["budget"])
        ratio = matched_ratio(n, budget)
        kept = n if ratio == 0 else compute_n_kept(n, ratio)
        if kept != min(budget, n):
            raise RuntimeError(f"budget matching failed: N={n}, budget={budget}, ratio={ratio!r} keeps {kept}")
        return ratio, kept
    ratio = float(settings["compression_ratio"])
    return ratio, (n if ratio == 0 else compute_n_kept(n, ratio))


def make_press(method: str, ratio: float, settings: dict):
    from kvpress import AdaKVPress, SnapKVPress

    snap = SnapKVPress(compression_ratio=ratio, window_size=int(settings.get("window", 32)),
                       kernel_size=int(settings.get("kernel", 5)))
    if method == "snapkv":
        return snap
    if method == "adakv":
        return AdaKVPress(snap, alpha_safeguard=float(settings.get("alpha_safeguard", 0.2)))
    raise ValueError(f"unknown method {method!r}; this script runs full, snapkv, adakv")


class Instrument:
    """Times ``press.compress`` per call and keeps SnapKV's scores per layer (for the kept positions)."""

    def __init__(self, press, record_scores: bool):
        self.seconds = 0.0
        self.scores: dict[int, torch.Tensor] = {}
        compress = press.compress

        def timed_compress(module, *args, **kwargs):
            start = time.perf_counter()
            try:
                return compress(module, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        press.compress = timed_compress
        if record_scores:
            score = press.score

            def kept_score(module, *args, **kwargs):
                s = score(module, *args, **kwargs)
                self.scores[module.layer_idx] = s.detach().clone()
                return s

            press.score = kept_score


# ---- one run -----------------------------------------------------------------------------------------

def kv_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None and t.numel():
                total += t.numel() * t.element_size()
    return total


def attention_modules(model) -> list:
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn for layer in lm.layers]


def adakv_kept(model, n: int) -> tuple[list, int]:
    """Per layer, per KV head: the positions AdaKV did NOT mask (batch 0), and the masked count."""
    kept, masked = [], 0
    for attn in attention_modules(model):
        idx = getattr(attn, "masked_key_indices", None)
        h = attn.config.num_key_value_heads
        keep = torch.ones(h, n, dtype=torch.bool)
        if idx is not None:
            b, hi, si = (t.cpu() for t in idx)
            sel = b == 0
            keep[hi[sel], si[sel]] = False
            masked += int(sel.sum())
        kept.append([torch.nonzero(keep[i]).flatten().tolist() for i in range(h)])
    return kept, masked


@torch.no_grad()
def run_one(model, prompt: dict, method: str, settings: dict, record_kept: bool, steps: int | None = None) -> dict:
    from transformers import DynamicCache

    ids = torch.tensor([prompt["input_ids"]], dtype=torch.long)
    n = ids.shape[1]
    max_new = int(settings.get("max_new_tokens", 10))
    steps = max(max_new, int(settings.get("decode_steps", 16))) if steps is None else steps
    eos = set(settings.get("eos_token_ids") or [])
    ratio, n_kept = (0.0, n) if method == "full" else ratio_for(prompt, settings)
    press = None if method == "full" else make_press(method, ratio, settings)
    inst = Instrument(press, record_kept and method == "snapkv") if press is not None else None

    rss_reset()
    rss_before = _status_mib("VmRSS")
    cache = DynamicCache()
    start = time.perf_counter()
    with press(model) if press is not None else contextlib.nullcontext():
        out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
    prefill_s = time.perf_counter() - start
    nbytes = kv_bytes(cache)
    lengths = [int(layer.keys.shape[2]) for layer in cache.layers]

    num_layers = len(cache.layers)
    heads = cache.layers[0].keys.shape[1]
    kept, masked = None, 0
    kept_counts = None if method == "full" else [[min(n_kept, n)] * heads for _ in range(num_layers)]
    if method == "adakv":
        kept, masked = adakv_kept(model, n)
        kept_counts = [[len(h) for h in layer] for layer in kept]
    elif inst is not None and inst.scores:
        kept = []
        for layer_idx in sorted(inst.scores):
            s = inst.scores[layer_idx][0]
            top = s.topk(min(n_kept, s.shape[-1]), dim=-1).indices.sort(dim=-1).values
            kept.append(top.tolist())
    if not record_kept:
        kept = None
    per_token = nbytes // max(sum(lengths) * heads, 1) if lengths else 0  # bytes per (head, token), K and V

    token = int(out.logits[0, -1].argmax())
    tokens, times = [token], []
    for i in range(steps - 1):
        t0 = time.perf_counter()
        step = model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                     position_ids=torch.tensor([[n + i]]))
        token = int(step.logits[0, -1].argmax())
        times.append(time.perf_counter() - t0)
        tokens.append(token)
    peak = _status_mib("VmHWM")
    answer = []
    for t in tokens[:max_new]:
        answer.append(t)
        if t in eos:
            break
    del cache, out
    return {
        "prompt_id": prompt["id"], "context": prompt["context"], "task": prompt["task"], "method": method,
        "impl": "kvpress", "prompt_tokens": n, "compression_ratio": ratio, "kept_per_head": n_kept,
        "prefill_s": prefill_s, "compress_s": inst.seconds if inst is not None else 0.0,
        "decode_step_ms": [1000 * t for t in times],
        "decode_ms_per_token": 1000 * statistics.median(times) if times else None,
        "kv_bytes": nbytes, "kv_bytes_unmasked": nbytes - masked * per_token,
        "cache_tokens_per_layer": lengths[0] if len(set(lengths)) == 1 else lengths, "num_layers": num_layers,
        "kept_counts": kept_counts,
        "rss_before_mib": rss_before, "peak_rss_mib": peak,
        "tokens": answer, "decode_tokens": tokens, "kept": kept,
    }


# ---- answers -----------------------------------------------------------------------------------------

def first_item(text: str, prompt: dict) -> str | None:
    """The scoring rule of mixkv.testbeds.tasks.extract_answer, repeated here (no mixkv import)."""
    text = text.lower()
    if (prompt.get("answer_kind") or "number") == "number":
        m = re.search(r"\d+", re.sub(r"(?<=\d),(?=\d{3}\b)", "", text))
        return m.group(0) if m else None
    choices = {c.lower() for c in (prompt.get("choices") or [prompt["answer"]])}
    return next((w for w in re.findall(r"[a-z]+", text) if w in choices), None)


def load(gguf: Path, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=getattr(torch, dtype), attn_implementation="sdpa")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tokenizer


def _quiet_hub() -> None:
    """Offline, no progress bars; set before transformers / huggingface_hub are imported (they read it then)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    _quiet_hub()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prompts", type=Path, help="prompts + settings JSON (mixkv compare writes it)")
    p.add_argument("gguf", type=Path, help="path of the GGUF checkpoint (SmolLM2-135M-Instruct.Q4_1.gguf)")
    p.add_argument("out", type=Path, help="results JSON to write")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the settings' or all cores)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    spec = json.loads(args.prompts.read_text())
    if spec.get("format") != "mixkv-compare-prompts":
        sys.exit(f"{args.prompts}: not a mixkv-compare-prompts file")
    settings, prompts = spec["settings"], spec["prompts"]
    threads = args.threads or settings.get("threads") or os.cpu_count() or 1
    torch.set_num_threads(threads)

    import kvpress
    import transformers

    t0 = time.perf_counter()
    model, tokenizer = load(args.gguf, args.dtype)
    load_s = time.perf_counter() - t0
    methods = list(settings.get("methods", ["full", "snapkv", "adakv"]))
    record = bool(settings.get("record_kept", True))

    if settings.get("warmup", True) and prompts:  # first-call costs (allocator, kernels) out of the numbers
        short = dict(prompts[0], input_ids=prompts[0]["input_ids"][: min(len(prompts[0]["input_ids"]), 512)])
        for method in methods:
            run_one(model, short, method, settings, record_kept=False, steps=3)

    runs = []
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        for method in methods:
            r = run_one(model, prompt, method, settings, record)
            r["text"] = tokenizer.decode(r["tokens"], skip_special_tokens=True).strip()
            r["correct"] = first_item(r["text"], prompt) == str(prompt["answer"]).lower()
            runs.append(r)
            if not args.quiet:
                print(f"[kvpress] {i + 1}/{len(prompts)} {prompt['id']} {method}: N={r['prompt_tokens']} "
                      f"prefill {r['prefill_s']:.2f} s, decode {r['decode_ms_per_token']:.1f} ms/tok, "
                      f"KV {r['kv_bytes'] / 2**20:.2f} MiB, answer {r['text'][:20]!r} "
                      f"({'right' if r['correct'] else 'wrong'})", flush=True)
    payload = {
        "format": FORMAT, "version": 1, "impl": "kvpress",
        "versions": {"kvpress": getattr(kvpress, "__version__", None) or _dist_version("kvpress"),
                     "transformers": transformers.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})",
        "threads": threads, "load_s": load_s, "runtime_s": time.perf_counter() - start,
        "settings": settings, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".partial")
    tmp.write_text(json.dumps(payload))
    tmp.replace(args.out)
    if not args.quiet:
        print(f"[kvpress] wrote {args.out}")
    return 0


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
