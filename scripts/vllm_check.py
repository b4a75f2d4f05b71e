"""`make vllm-check`: mixkv's vLLM plugin against vLLM itself and against mixkv's own press, offline.

Run inside the venv made by `make vllm-env` (scripts/vllm_env.sh). Seven parts, named by what they check
(``--parts``; the letters a-f of earlier notes still select them: a no-op, b press-equal, c capacity,
d paging-cost, e preemption, f tensor-parallel):

(no-op) greedy outputs with the plugin and a budget that covers every prompt equal vLLM without it;
(press-equal) with compression (SnapKV+MixKV at budgets 64 and 128), vLLM's outputs and kept positions
    equal ``mixkv.press`` on the same model (the same float32 folder, loaded by transformers in this
    venv) and the same prompt token ids; vLLM without the plugin against transformers without a press
    is reported beside them as the control (the two engines' arithmetic differs slightly);
(capacity) a fixed KV pool (``kv_cache_memory_bytes``, sized for two full requests), many
    concurrent ~4k-token prompts of mixkv's task suite; requests running at once (the scheduler trace
    the plugin writes), output and total tokens per second and accuracy, full vs SnapKV+MixKV at
    budgets 64/128/256;
(paging-cost) per-layer and per-head budgets: what they would cost in paged blocks, measured on real prompts;
(preemption) a KV pool too small for every compressed request's growing outputs, so vLLM preempts
    running requests and recomputes them (the plugin compresses a resumed request's prompt again and
    then recomputes its outputs over the compressed prompt); every request must finish and every
    output must equal a run with a roomy pool, where nothing is preempted. The full cache under the
    same two pools is the control (vLLM's own preemption);
(tensor-parallel) the model's KV heads split over --tp-size worker processes (each compresses its
    own heads); outputs and kept positions must equal the one-process plugin's, with vLLM's own
    tensor-parallel run against its one-process run as the control;
(serve-http) the OpenAI-compatible server started by the command users type (`vllm serve`, with the plugin at
    SnapKV+MixKV budget --serve-budget) on 127.0.0.1 and a free port: the press-equal prompts through
    ``/v1/completions`` (token ids) and ``/v1/chat/completions`` (their text as a user message), sent at
    once; every reply must equal ``mixkv.press`` on the prompt ids the server reports, and every prompt must
    have been compressed (the plugin's dumps). The server gets --serve-timeout seconds to start and is
    always stopped (scripts/vllm_serve.py).

Each vLLM configuration runs in its own process (``--job``): the plugin reads its configuration from
the environment when vLLM starts its processes, and a fresh process frees the engine completely.
Results go to ``results/vllm-capacity.json`` (``--json``); a table is printed. The script exits
non-zero when no-op, press-equal, preemption, tensor-parallel or serve-http finds a difference (serve-http
also when the server fails). no-op and press-equal always run together: press-equal's control is no-op's
run of vLLM without the plugin.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import vllm_jobs  # scripts/, beside this file
import vllm_serve  # scripts/, beside this file

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MIXKV_CACHE", Path.home() / ".cache" / "mixkv")).expanduser()
DEFAULT_MODEL = Path(os.environ.get("MIXKV_VLLM_MODEL", CACHE / "smollm2-135m-hf")).expanduser()
PLUGIN_VARS = ("MIXKV_VLLM_METHOD", "MIXKV_VLLM_BUDGET", "MIXKV_VLLM_WINDOW", "MIXKV_VLLM_TRACE", "MIXKV_VLLM_DUMP",
               "MIXKV_VLLM_PROFILE")
BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4  # SmolLM2-135M, float32: layers x (K, V) x KV heads x head dim x 4 B

# The checks, in the order they run; ``--parts`` takes these names.
PARTS = ("no-op", "press-equal", "capacity", "paging-cost", "preemption", "tensor-parallel", "serve-http")
# The letters the parts had before they had names; notes and recorded runs still use them.
LETTERS = {"a": "no-op", "b": "press-equal", "c": "capacity", "d": "paging-cost", "e": "preemption",
           "f": "tensor-parallel"}


# ---- one vLLM run, in its own process ------------------------------------------------------------


@dataclass
class Job:
    """One engine start: plugin variables, engine arguments, prompts, and where to write the result."""

    plugin_env: dict[str, str]
    llm_kwargs: dict
    prompts: list[list[int]]
    max_tokens: int
    out: str
    ignore_eos: bool = False


def run_job(job: Job) -> None:
    for var in PLUGIN_VARS:
        os.environ.pop(var, None)
    os.environ.update(job.plugin_env)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(**job.llm_kwargs)
    ready = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=job.max_tokens, ignore_eos=job.ignore_eos)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job.prompts], params, use_tqdm=False)
    done = time.perf_counter()
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "request_ids": [o.request_id for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
        "load_seconds": ready - started,
        "generate_seconds": done - ready,
    }
    Path(job.out).write_text(json.dumps(result))


def profile_env(method: str) -> dict[str, str]:
    """MIXKV_VLLM_PROFILE for a method that reads a profile: the one mixkv ships for SmolLM2-135M."""
    from mixkv.core.registry import needs_profile
    from mixkv.testbeds.sources import shipped_profile

    return {"MIXKV_VLLM_PROFILE": str(shipped_profile("smollm2-135m"))} if needs_profile(method) else {}


def launch(job: Job, label: str) -> dict:
    """Run ``job`` in a fresh interpreter (:func:`vllm_jobs.launch`)."""
    return vllm_jobs.launch(job, label, __file__)


def llm_kwargs(model: Path, max_model_len: int, block_size: int, **extra) -> dict:
    """Engine arguments shared by every run: float32 (the press side's dtype, so kept tokens can agree),
    eager mode (no compile time on two cores), an explicit KV pool (1 GiB unless given: on CPU the
    default reserves a share of the machine's memory)."""
    return {"model": str(model), "dtype": "float32", "enforce_eager": True, "max_model_len": max_model_len,
            "block_size": block_size, "enable_prefix_caching": False, "seed": 0,
            "kv_cache_memory_bytes": 2**30, **extra}


# ---- prompts -------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    task: str
    ids: list[int]
    sample: object = field(repr=False)


def suite_prompts(tokenizer, tasks: list[str], n: int, length: int, seed: int) -> list[Prompt]:
    from mixkv.testbeds.tasks import build_prompt, make_suite

    samples = make_suite(tasks, n, seed, length, tokenizer)
    return [Prompt(s.task, tokenizer(build_prompt(tokenizer, s), add_special_tokens=False)["input_ids"], s)
            for s in samples]


# ---- no-op and press-equal ---------------------------------------------------------------------------------


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """The tokens up to and including the first end-of-sequence token (both engines stop there)."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def press_side(model_dir: Path, prompts: list[Prompt], budgets: list[int], max_tokens: int) -> dict:
    """Greedy outputs and kept positions of transformers + mixkv.press (and without a press: the control)."""
    import torch
    from transformers import AutoModelForCausalLM

    from mixkv import press

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    eos = model.generation_config.eos_token_id
    out: dict = {"full": [], "eos": sorted({eos} if isinstance(eos, int) else set(eos or [])),
                 **{b: {"tokens": [], "kept": []} for b in budgets}}
    for p in prompts:
        ids = torch.tensor([p.ids])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        out["full"].append(gen[0, ids.shape[1]:].tolist())
        for b in budgets:
            with press(model, "snapkv+mixkv", budget=b, record=True) as session, torch.no_grad():
                gen = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
            out[b]["tokens"].append(gen[0, ids.shape[1]:].tolist())
            kept = torch.stack([session.plans[i].indices[0] for i in sorted(session.plans)])  # (L, H, B)
            out[b]["kept"].append(kept)
    return out


def kept_agreement(vllm_kept, press_kept) -> float:
    """Share of kept positions (over layers and heads) both sides chose."""
    same = total = 0
    for v, p in zip(vllm_kept, press_kept):
        for layer in range(v.shape[0]):
            for head in range(v.shape[1]):
                a, b = set(v[layer, head].tolist()), set(p[layer, head].tolist())
                same += len(a & b)
                total += len(b)
    return same / total if total else float("nan")


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def part_no_op_and_press_equal(args, tokenizer, work: Path) -> dict:
    """no-op and press-equal together: press-equal's control is no-op's run of vLLM without the plugin."""
    import torch

    prompts = suite_prompts(tokenizer, ["passkey", "kv_retrieval"], args.press_n, args.press_length, seed=1)
    lengths = [len(p.ids) for p in prompts]
    max_len = max(lengths) + args.press_tokens + 64
    base = llm_kwargs(args.model, max_len, args.block_size)
    ids = [p.ids for p in prompts]
    print(f"(no-op)/(press-equal): {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, "
          f"{args.press_tokens} greedy tokens")
    plain = launch(Job({}, base, ids, args.press_tokens, str(work / "plain.json")), "vLLM, no plugin")
    cover = max(lengths) + 1
    covered = launch(Job({"MIXKV_VLLM_METHOD": "snapkv+mixkv", "MIXKV_VLLM_BUDGET": str(cover)}, base, ids,
                         args.press_tokens, str(work / "covered.json")), f"plugin, budget {cover}")
    equal = plain["tokens"] == covered["tokens"]
    report: dict = {"prompt_tokens": lengths, "max_tokens": args.press_tokens,
                    "no-op_plugin_budget_covering_prompt": {"budget": cover, "equal_to_vllm": equal}}
    print(f"(no-op) plugin with budget {cover} (covers every prompt) == vLLM without plugin: {equal}")

    print("(press-equal) transformers + mixkv.press in this venv ...", flush=True)
    started = time.perf_counter()
    ref = press_side(args.model, prompts, args.press_budgets, args.press_tokens)
    print(f"    press side took {time.perf_counter() - started:.0f} s")
    eos = set(ref["eos"]) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())

    def differences(ours, theirs):
        return [first_difference(until_eos(a, eos), until_eos(b, eos)) for a, b in zip(ours, theirs)]

    control = differences(plain["tokens"], ref["full"])
    report["press-equal_control_full"] = {"equal": all(c is None for c in control), "first_difference": control}
    print(f"(press-equal) control, no compression: vLLM == transformers on "
          f"{sum(c is None for c in control)}/{len(prompts)} prompts (first differing token per prompt: {control})")
    ok = equal
    for b in args.press_budgets:
        dump = work / f"dump-{b}"
        got = launch(Job({"MIXKV_VLLM_METHOD": "snapkv+mixkv", "MIXKV_VLLM_BUDGET": str(b),
                          "MIXKV_VLLM_DUMP": str(dump)}, base, ids, args.press_tokens, str(work / f"press-{b}.json")),
                     f"plugin snapkv+mixkv, budget {b}")
        files = sorted(dump.glob("*.pt"))
        dumps = [torch.load(f) for f in files]
        by_prompt = {tuple(d["prompt"]): d["kept"] for d in dumps}
        vkept = [by_prompt.get(tuple(p.ids)) for p in prompts]
        agree = kept_agreement([k for k in vkept if k is not None],
                               [k for k, v in zip(ref[b]["kept"], vkept) if v is not None])
        diffs = differences(got["tokens"], ref[b]["tokens"])
        same = all(d is None for d in diffs)
        ok &= same
        report[f"press-equal_snapkv+mixkv_{b}"] = {"outputs_equal_press": same, "first_difference": diffs,
                                                  "kept_positions_agreement": agree, "compressed_requests": len(files),
                                                  "vllm_texts": got["texts"]}
        print(f"(press-equal) budget {b}: outputs == press on {sum(d is None for d in diffs)}/{len(prompts)} prompts "
              f"(first differing token: {diffs}); kept positions shared with press: {agree:.4f} "
              f"({len(files)} requests compressed)")
    report["ok"] = bool(ok)
    return report


# ---- capacity -----------------------------------------------------------------------------------------


def interleave(prompts: list[Prompt]) -> list[Prompt]:
    """Alternate tasks (passkey, kv_retrieval, passkey, ...) so every prefix of the list mixes them."""
    by_task: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_task.setdefault(p.task, []).append(p)
    out = []
    for group in zip(*by_task.values()):
        out.extend(group)
    return out


def part_capacity(args, tokenizer, work: Path) -> dict:
    from mixkv.integrations.vllm.trace import read_trace
    from mixkv.testbeds.tasks import score

    # One suite for every configuration (its size does not depend on which ones run now), so rows of
    # separate runs share prompts and pool: a configuration with n requests takes the first n prompts.
    most = max(args.cap_suite, *args.cap_requests.values())
    tasks = args.cap_tasks
    prompts = interleave(suite_prompts(tokenizer, tasks, -(-most // len(tasks)), args.cap_length, seed=args.cap_seed))
    lengths = [len(p.ids) for p in prompts]
    bs = args.block_size
    per_full = -(-(max(lengths) + args.cap_tokens) // bs)  # blocks of the longest full request
    blocks = args.pool_requests * per_full + 1  # one null block kept aside by vLLM
    pool_bytes = blocks * bs * BYTES_PER_TOKEN
    max_len = max(lengths) + args.cap_tokens + bs
    common = min(args.cap_requests.values())
    print(f"(capacity) prompts of {min(lengths)}-{max(lengths)} tokens, {args.cap_tokens} output tokens each "
          f"(EOS ignored); KV pool {pool_bytes / 2**20:.0f} MiB = {blocks} blocks of {bs} "
          f"(fits {args.pool_requests} full requests)")
    rows = []
    for key, n in args.cap_requests.items():
        method, budget = capacity_setting(key, args.cap_method)
        label = method if budget is None else f"{method}@{budget}"
        trace = work / f"trace-{label}.jsonl"
        env = {"MIXKV_VLLM_METHOD": method, "MIXKV_VLLM_TRACE": str(trace), **profile_env(method)}
        if budget is not None:
            env["MIXKV_VLLM_BUDGET"] = str(budget)
        kwargs = llm_kwargs(args.model, max_len, bs, kv_cache_memory_bytes=pool_bytes, max_num_seqs=args.max_num_seqs,
                            max_num_batched_tokens=args.batched_tokens)
        batch = prompts[:n]
        res = launch(Job(env, kwargs, [p.ids for p in batch], args.cap_tokens, str(work / f"cap-{label}.json"),
                         ignore_eos=True), f"{label}, {n} requests")
        steps = read_trace(trace)
        busy = [s for s in steps if s.scheduled_tokens > 0]
        out_tokens = sum(len(t) for t in res["tokens"])
        acc = [score(p.sample, t) for p, t in zip(batch, res["texts"])]
        seconds = res["generate_seconds"]
        row = {
            "method": method, "budget": budget, "requests": n,
            "max_running": max((s.running for s in steps), default=0),
            "mean_running": sum(s.running for s in busy) / len(busy) if busy else 0.0,
            "max_compressed": max((s.compressed for s in steps), default=0),
            "steps": len(busy), "pool_blocks": blocks,
            "min_free_blocks": min((s.free_blocks for s in steps), default=0),
            "seconds": seconds, "output_tokens_per_s": out_tokens / seconds,
            "total_tokens_per_s": (out_tokens + sum(len(p.ids) for p in batch)) / seconds,
            "accuracy": sum(acc) / len(acc), f"accuracy_first_{common}": sum(acc[:common]) / common,
            "load_seconds": res["load_seconds"],
        }
        rows.append(row)
        print(f"    max running {row['max_running']}, mean running {row['mean_running']:.1f}, "
              f"{row['output_tokens_per_s']:.2f} output tok/s, accuracy {row['accuracy']:.2f}", flush=True)
    full = next((r["max_running"] for r in rows if r["method"] == "full"), 0) or 1
    for r in rows:
        r["x_full"] = r["max_running"] / full
    return {"pool_bytes": pool_bytes, "pool_blocks": blocks, "block_size": bs, "prompt_tokens": lengths,
            "output_tokens": args.cap_tokens, "max_num_batched_tokens": args.batched_tokens,
            "max_num_seqs": args.max_num_seqs, "accuracy_common_prefix": common, "tasks": tasks,
            "seed": args.cap_seed, "rows": rows}


def capacity_setting(key: str, default_method: str) -> tuple[str, int | None]:
    """``full``, a budget of ``default_method`` (``256``) or ``method@budget`` -> (method, budget)."""
    if key == "full":
        return "full", None
    method, _, budget = key.rpartition("@")
    return (method or default_method), int(budget)


# ---- paging-cost: per-layer and per-head budgets in paged blocks -------------------------------------------


def part_paging_cost(args, tokenizer) -> dict:
    """How many blocks non-uniform methods would need per request, measured on real prompts.

    For each prompt, one exact prefill is captured (``mixkv.capture_prefill``) and each method's own
    allocation is read (``method.allocate``, window added). Block counts per request, relative to a
    uniform method at the same budget, in three layouts: vLLM as it is (one block table for every
    layer, every head of a layer in the same slots: the largest head of the largest layer sets the
    size), per-layer tables (each layer sized by its largest head), per-head paging (each head its own
    blocks).
    """
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from mixkv import capture_prefill, make_method

    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    prompts = suite_prompts(tokenizer, ["passkey", "kv_retrieval"], args.skew_n, args.cap_length, seed=2)
    profile = ROOT / "results" / "profile-smollm2.json"
    names = ["pyramidkv", "adakv"] + (["headkv"] if profile.is_file() else [])
    bs = args.block_size
    rows = []
    for p in prompts:
        pre = capture_prefill(model, {"input_ids": torch.tensor([p.ids])})
        for budget in args.skew_budgets:
            uniform = math.ceil(budget / bs)
            for name in names:
                method = make_method(name, budget=budget, profile=str(profile) if name == "headkv" else None)
                kept = torch.stack([method.allocate(layer.for_method(method.window, method.kernel))[0]
                                    for layer in pre.layers]) + method.window  # (L, H) tokens kept
                layers, heads = kept.shape
                per_layer = sum(math.ceil(float(k.max()) / bs) for k in kept)
                per_head = sum(math.ceil(float(k) / bs) for k in kept.flatten())
                rows.append({
                    "method": name, "budget": budget, "prompt_tokens": len(p.ids),
                    "max_head_ratio": float(kept.max()) / budget,
                    "one_table_x_uniform": math.ceil(float(kept.max()) / bs) / uniform,
                    "per_layer_tables_x_uniform": per_layer / (layers * uniform),
                    "per_head_paging_x_uniform": per_head / (layers * heads * uniform),
                })
    summary = []
    for name in names:
        for budget in args.skew_budgets:
            sel = [r for r in rows if r["method"] == name and r["budget"] == budget]
            summary.append({"method": name, "budget": budget, **{
                key: max(r[key] for r in sel) for key in ("max_head_ratio", "one_table_x_uniform",
                                                         "per_layer_tables_x_uniform", "per_head_paging_x_uniform")}})
    print(f"(paging-cost) blocks per request relative to a uniform method at the same budget (block size {bs}; "
          f"worst of {len(prompts)} prompts)")
    print("| method    | budget | largest head / B | vLLM as is | per-layer tables | per-head paging |")
    print("|-----------|--------|------------------|------------|------------------|-----------------|")
    for r in summary:
        print(f"| {r['method']:9} | {r['budget']:6d} | {r['max_head_ratio']:16.2f} | {r['one_table_x_uniform']:9.2f}x "
              f"| {r['per_layer_tables_x_uniform']:15.2f}x | {r['per_head_paging_x_uniform']:14.2f}x |")
    return {"block_size": bs, "rows": rows, "summary": summary}


# ---- preemption ---------------------------------------------------------------------------------------


def engine_index(request_ids: list[str]) -> dict[str, int]:
    """Prompt index of each engine-side request id (vLLM appends ``-<8 hex>`` to the caller's id)."""
    return {rid: i for i, rid in enumerate(request_ids)}


def to_prompt(engine_id: str, index: dict[str, int]) -> int:
    if engine_id in index:
        return index[engine_id]
    return index[engine_id.rsplit("-", 1)[0]]


def part_preemption(args, tokenizer, work: Path) -> dict:
    """Run the same prompts with a roomy and a tight KV pool, compressed and full, and compare."""
    from mixkv.integrations.vllm.trace import read_trace

    prompts = suite_prompts(tokenizer, ["passkey", "kv_retrieval"], args.preempt_n, args.press_length, seed=3)
    ids = [p.ids for p in prompts]
    lengths = [len(i) for i in ids]
    bs, tokens = args.block_size, args.preempt_tokens
    max_len = max(lengths) + tokens + bs
    # vLLM admits a waiting request only when its whole prompt fits in the free blocks, and the pool must
    # hold one request of max_len. Compressed: the smallest such pool, so the admitted requests' outputs
    # outgrow it. Full (the control): room for two prompts, so two run and their outputs outgrow it.
    prompt_blocks = -(-max(lengths) // bs)
    pools = {"compressed": -(-max_len // bs) + 1 + args.preempt_spare,
             "full": max(-(-max_len // bs), 2 * prompt_blocks) + 1 + args.preempt_spare}
    print(f"(preemption) {len(ids)} prompts of {min(lengths)}-{max(lengths)} tokens, {tokens} output tokens each "
          f"(EOS ignored); tight KV pools of {pools['compressed']} (compressed) and {pools['full']} (full) "
          f"blocks of {bs}, chunked prefill {args.preempt_chunk} tokens per step")
    engine = {"max_num_batched_tokens": args.preempt_chunk, "max_num_seqs": len(ids)}
    report: dict = {"prompt_tokens": lengths, "output_tokens": tokens, "pool_blocks": pools, "block_size": bs,
                    "budget": args.preempt_budget, "chunk_tokens": args.preempt_chunk}
    ok = True
    for method in args.preempt_methods:
        env = {"MIXKV_VLLM_METHOD": method}
        if method != "full":
            env["MIXKV_VLLM_BUDGET"] = str(args.preempt_budget)
            env.update(profile_env(method))
        runs = {}
        for pool in ("roomy", "tight"):
            trace = work / f"trace-pre-{method}-{pool}.jsonl"
            kwargs = llm_kwargs(args.model, max_len, bs, **engine)
            if pool == "tight":
                kind = "full" if method == "full" else "compressed"
                kwargs["kv_cache_memory_bytes"] = pools[kind] * bs * BYTES_PER_TOKEN
            res = launch(Job({**env, "MIXKV_VLLM_TRACE": str(trace)}, kwargs, ids, tokens,
                             str(work / f"pre-{method}-{pool}.json"), ignore_eos=True), f"{method}, {pool} pool")
            index = engine_index(res["request_ids"])
            events = [(to_prompt(rid, index), n) for step in read_trace(trace)
                      for rid, n in zip(step.preempted, step.preempted_outputs)]
            runs[pool] = (res, events)
        (roomy, roomy_events), (tight, events) = runs["roomy"], runs["tight"]
        first_at: dict[int, int] = {}
        for i, n in events:
            first_at.setdefault(i, n)
        diffs = [first_difference(a, b) for a, b in zip(tight["tokens"], roomy["tokens"])]
        finished = all(len(t) == tokens for t in tight["tokens"])
        untouched = [i for i in range(len(ids)) if i not in first_at]
        row = {
            "preemptions": len(events), "preemptions_with_outputs": sum(n > 0 for _, n in events),
            "requests_preempted": len(first_at), "roomy_preemptions": len(roomy_events),
            "all_finished": finished, "first_difference": diffs,
            "outputs_when_first_preempted": {str(i): n for i, n in sorted(first_at.items())},
            "never_preempted_equal": sum(diffs[i] is None for i in untouched), "never_preempted": len(untouched),
            "preempted_equal_before_preemption": sum(diffs[i] is None or diffs[i] >= n for i, n in first_at.items()),
            "preempted_equal_throughout": sum(diffs[i] is None for i in first_at),
            "seconds_roomy": roomy["generate_seconds"], "seconds_tight": tight["generate_seconds"],
        }
        report[method] = row
        print(f"    {method}: {row['preemptions']} preemptions ({row['preemptions_with_outputs']} of requests "
              f"already decoding) over {row['requests_preempted']} requests; all finished: {finished}; never "
              f"preempted == roomy pool: {row['never_preempted_equal']}/{row['never_preempted']}; preempted == roomy "
              f"up to the preemption: {row['preempted_equal_before_preemption']}/{row['requests_preempted']}, "
              f"throughout: {row['preempted_equal_throughout']}/{row['requests_preempted']}", flush=True)
        if method != "full":  # the plugin's own checks; the full cache is the control
            ok &= (finished and row["preemptions_with_outputs"] > 0 and row["roomy_preemptions"] == 0
                   and all(d is None for d in diffs))
            if row["preemptions_with_outputs"] == 0:
                print("    (preemption) no decoding request was preempted: the check did not exercise preemption; "
                      "lower --preempt-spare or raise --preempt-tokens", flush=True)
    report["ok"] = bool(ok)
    return report


# ---- tensor-parallel -----------------------------------------------------------------------------------


def load_kept(dump: Path) -> dict:
    """Kept positions per prompt from a dump folder, (L, H, B); tensor-parallel ranks joined along heads."""
    import torch

    parts: dict[tuple, dict[int, object]] = {}
    for f in sorted(dump.glob("*.pt")):
        d = torch.load(f)
        parts.setdefault(tuple(d["prompt"]), {})[int(d.get("tp_rank", 0))] = d["kept"]
    return {k: torch.cat([v[r] for r in sorted(v)], dim=1) for k, v in parts.items()}


def part_tensor_parallel(args, tokenizer, work: Path) -> dict:
    """The press-equal prompts with one worker and with ``--tp-size`` workers, without and with the plugin."""
    prompts = suite_prompts(tokenizer, ["passkey", "kv_retrieval"], args.press_n, args.press_length, seed=1)
    ids = [p.ids for p in prompts]
    max_len = max(len(i) for i in ids) + args.press_tokens + 64
    tp = args.tp_size
    print(f"(tensor-parallel) tensor parallelism {tp}: {len(ids)} prompts, {args.press_tokens} greedy tokens "
          f"(VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'nobind')})")
    # Binding is per rank; "auto" wants a NUMA node per rank, so the ranks share the cores unbound unless told.
    bind = {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}
    report: dict = {"tp_size": tp, "prompt_tokens": [len(i) for i in ids], **bind}
    ok = True
    for budget in [None, *args.press_budgets]:
        env = {} if budget is None else {"MIXKV_VLLM_METHOD": "snapkv+mixkv", "MIXKV_VLLM_BUDGET": str(budget)}
        label = "no plugin" if budget is None else f"snapkv+mixkv@{budget}"
        got = {}
        for size in (1, tp):
            dump = work / f"tp{size}-{label}"
            run_env = {**env, **bind, **({"MIXKV_VLLM_DUMP": str(dump)} if budget is not None else {})}
            kwargs = llm_kwargs(args.model, max_len, args.block_size, tensor_parallel_size=size)
            res = launch(Job(run_env, kwargs, ids, args.press_tokens, str(work / f"tp{size}-{label}.json")),
                         f"{label}, tensor parallel {size}")
            got[size] = (res["tokens"], load_kept(dump) if budget is not None else {})
        (one, one_kept), (many, many_kept) = got[1], got[tp]
        diffs = [first_difference(a, b) for a, b in zip(many, one)]
        same = all(d is None for d in diffs)
        row = {"outputs_equal": same, "first_difference": diffs}
        if budget is not None:
            keys = [tuple(i) for i in ids]
            shapes_ok = all(k in many_kept and k in one_kept and many_kept[k].shape == one_kept[k].shape for k in keys)
            row["kept_positions_agreement"] = (kept_agreement([many_kept[k] for k in keys], [one_kept[k] for k in keys])
                                               if shapes_ok else 0.0)
            ok &= same and shapes_ok and row["kept_positions_agreement"] == 1.0
        report[label] = row
        kept = f"; kept positions shared: {row['kept_positions_agreement']:.4f}" if budget is not None else " (control)"
        print(f"    {label}: tensor parallel {tp} == one process on {sum(d is None for d in diffs)}/{len(ids)} prompts "
              f"(first differing token: {diffs}){kept}", flush=True)
    report["ok"] = bool(ok)
    return report


# ---- serve-http: the OpenAI-compatible server -------------------------------------------------------------------


def machine() -> str:
    """CPU model and core count, for results taken on another machine than the file's others."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    return f"{model}, {os.cpu_count()} cores"


def serve_command(args, port: int, max_len: int, pool_bytes: int) -> list[str]:
    """`vllm serve` as the README writes it (float32, block size), plus what makes the check small and private."""
    exe = Path(sys.executable).with_name("vllm")
    cmd = [str(exe if exe.is_file() else "vllm"), "serve", str(args.model), "--block-size", str(args.block_size),
           "--dtype", "float32", "--host", vllm_serve.HOST, "--port", str(port), "--max-model-len", str(max_len),
           "--kv-cache-memory-bytes", str(pool_bytes), "--seed", "0", "--uvicorn-log-level", "warning"]
    return cmd + (["--enforce-eager"] if args.serve_eager else [])


def part_serve_http(args, tokenizer, work: Path) -> dict:
    """The press-equal prompts through `vllm serve` over HTTP against ``mixkv.press`` (module doc, part serve-http)."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = suite_prompts(tokenizer, ["passkey", "kv_retrieval"], args.press_n, args.press_length, seed=1)
    budget, tokens, bs = args.serve_budget, args.press_tokens, args.block_size
    max_len = max(len(p.ids) for p in prompts) + tokens + 64
    pool_bytes = (2 * len(prompts) * -(-max_len // bs) + 1) * bs * BYTES_PER_TOKEN  # every request twice over
    dump = work / "serve-dump"
    env = {k: v for k, v in os.environ.items() if k not in PLUGIN_VARS}
    env.update({"MIXKV_VLLM_METHOD": "snapkv+mixkv", "MIXKV_VLLM_BUDGET": str(budget), "MIXKV_VLLM_DUMP": str(dump)})
    port = vllm_serve.free_port()
    cmd = serve_command(args, port, max_len, pool_bytes)
    print(f"(serve-http) {' '.join(cmd)} with MIXKV_VLLM_METHOD=snapkv+mixkv MIXKV_VLLM_BUDGET={budget}; "
          f"{len(prompts)} prompts of {min(len(p.ids) for p in prompts)}-{max(len(p.ids) for p in prompts)} tokens "
          f"as completions and as chats, {tokens} greedy tokens", flush=True)
    common = {"model": str(args.model), "max_tokens": tokens, "temperature": 0.0, "return_token_ids": True}
    requests = ([("/v1/completions", {**common, "prompt": p.ids}) for p in prompts]
                + [("/v1/chat/completions", {**common, "messages": [{"role": "user", "content": p.sample.prompt}]})
                   for p in prompts])
    started = time.perf_counter()
    with vllm_serve.Server(cmd, env, work / "serve.log", port, args.serve_timeout) as server:
        print(f"    server ready after {server.ready_seconds:.0f} s", flush=True)
        sent = time.perf_counter()
        with ThreadPoolExecutor(len(requests)) as pool:
            replies = list(pool.map(lambda r: server.post(*r, timeout=args.serve_timeout), requests))
        answered = time.perf_counter() - sent
    total = time.perf_counter() - started
    kinds = [path for path, _ in requests]
    got = []
    for (path, body), reply in zip(requests, replies):
        choice = reply["choices"][0]
        ids = body["prompt"] if "prompt" in body else reply.get("prompt_token_ids")
        if ids is None or choice.get("token_ids") is None:
            raise RuntimeError(f"(serve-http) {path} returned no token ids (return_token_ids): {str(reply)[:300]}")
        got.append((list(ids), list(choice["token_ids"])))
    distinct = list(dict.fromkeys(tuple(ids) for ids, _ in got))
    print(f"    {len(replies)} replies in {answered:.1f} s; chat prompts == local chat template: "
          f"{[got[i + len(prompts)][0] == prompts[i].ids for i in range(len(prompts))]}; press side ...", flush=True)
    ref = press_side(args.model, [Prompt("serve", list(ids), None) for ids in distinct], [budget], tokens)
    eos = set(ref["eos"]) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    press_tokens = {ids: toks for ids, toks in zip(distinct, ref[budget]["tokens"])}
    diffs = [first_difference(until_eos(toks, eos), until_eos(press_tokens[tuple(ids)], eos)) for ids, toks in got]
    kept = load_kept(dump)
    compressed = [ids in kept for ids in distinct]
    agree = kept_agreement([kept[ids] for ids in distinct if ids in kept],
                           [k for ids, k in zip(distinct, ref[budget]["kept"]) if ids in kept])
    same = all(d is None for d in diffs)
    ok = same and all(compressed)
    print(f"(serve-http) replies == press on {sum(d is None for d in diffs)}/{len(diffs)} requests ({kinds}; first "
          f"differing token: {diffs}); prompts compressed by the plugin: {sum(compressed)}/{len(distinct)}; kept "
          f"positions shared with press: {agree:.4f}; start {server.ready_seconds:.0f} s, whole part {total:.0f} s",
          flush=True)
    if not ok:
        log = work / "serve.log"
        print(f"(serve-http) FAILED; server log {log} (last lines):\n{vllm_serve.log_tail(log)}", flush=True)
    return {"machine": machine(), "command": cmd, "budget": budget, "prompt_tokens": [len(ids) for ids in distinct],
            "requests": kinds, "max_tokens": tokens, "replies_equal_press": same, "first_difference": diffs,
            "compressed_prompts": sum(compressed), "kept_positions_agreement": agree,
            "texts": [r["choices"][0].get("text", r["choices"][0].get("message", {}).get("content")) for r in replies],
            "start_seconds": server.ready_seconds, "requests_seconds": answered, "seconds": total, "ok": bool(ok)}


def merge_capacity(old: dict | None, new: dict) -> dict:
    """Rows of an earlier run with the same pool and prompts are kept unless rerun now (runs are long)."""
    same = old is not None and all(old.get(k) == new[k] for k in ("pool_bytes", "prompt_tokens", "output_tokens"))
    if not same:
        return new
    first = (["passkey", "kv_retrieval"], 2)  # what runs before --cap-tasks / --cap-seed existed used
    same = same and (old.get("tasks", first[0]), old.get("seed", first[1])) == \
        (new.get("tasks", first[0]), new.get("seed", first[1]))
    if not same:
        return new
    rerun = {(r["method"], r["budget"]) for r in new["rows"]}
    rows = [r for r in old["rows"] if (r["method"], r["budget"]) not in rerun] + new["rows"]
    rows.sort(key=lambda r: (r["budget"] is not None, -(r["budget"] or 0)))
    full = next((r["max_running"] for r in rows if r["method"] == "full"), 0) or 1
    for r in rows:
        r["x_full"] = r["max_running"] / full
    return {**new, "rows": rows}


def print_table(cap: dict) -> None:
    head = f"| {'method':14} | {'budget':6} | {'requests':8} | {'max running':11} | {'x full':6} | " \
           f"{'mean running':12} | {'out tok/s':9} | {'all tok/s':9} | {'accuracy':8} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in cap["rows"]:
        print(f"| {r['method']:14} | {str(r['budget'] or '-'):6} | {r['requests']:8d} | {r['max_running']:11d} | "
              f"{r['x_full']:5.1f}x | "
              f"{r['mean_running']:12.1f} | {r['output_tokens_per_s']:9.2f} | {r['total_tokens_per_s']:9.1f} | "
              f"{r['accuracy']:8.2f} |")


# ---- main ---------------------------------------------------------------------------------------------------


def parse_parts(text: str) -> list[str]:
    """The parts ``--parts`` names, letters mapped to names, in the order they run; ValueError on others."""
    asked = [item.strip() for item in text.split(",")]
    unknown = [item for item in asked if item not in PARTS and item not in LETTERS]
    if unknown:
        raise ValueError(f"unknown {unknown}; accepted: {', '.join(PARTS)} "
                         f"(or the old letters {', '.join(f'{k}={v}' for k, v in LETTERS.items())})")
    names = {LETTERS.get(item, item) for item in asked}
    return [name for name in PARTS if name in names]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="transformers folder (make vllm-env)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="which checks, comma-separated (default: all, in this order): no-op (the plugin with a "
                         "budget covering every prompt equals vLLM), press-equal (compressed outputs and kept "
                         "positions equal mixkv.press; no-op and press-equal always run together), capacity "
                         "(requests running at once in a fixed pool), paging-cost (per-layer/per-head block needs), "
                         "preemption, tensor-parallel, serve-http (`vllm serve` over HTTP against the press). "
                         "The old letters are aliases: "
                         + ", ".join(f"{letter}={name}" for letter, name in LETTERS.items()))
    ap.add_argument("--block-size", type=int, default=32, help="vLLM block size (CPU kernels: a multiple of 32)")
    ap.add_argument("--press-n", type=int, default=1, help="prompts per task for no-op/press-equal")
    ap.add_argument("--press-length", type=int, default=600)
    ap.add_argument("--press-tokens", type=int, default=12)
    ap.add_argument("--press-budgets", default="64,128")
    ap.add_argument("--cap-requests", default="full:6,256:16,128:26,64:44",
                    help="requests per configuration of capacity: 'full', a --cap-method budget or METHOD@BUDGET, then "
                         "the count (enough to fill the pool: more only adds prefill time)")
    ap.add_argument("--cap-method", default="snapkv+mixkv", help="method of the bare budgets in --cap-requests")
    ap.add_argument("--cap-tasks", default="passkey,kv_retrieval", help="tasks of the capacity prompts")
    ap.add_argument("--cap-seed", type=int, default=2, help="seed of the capacity prompts")
    ap.add_argument("--cap-suite", type=int, default=44, help="prompts generated for capacity; runs take the first n")
    ap.add_argument("--cap-length", type=int, default=4000)
    ap.add_argument("--cap-tokens", type=int, default=32)
    ap.add_argument("--skew-budgets", default="64,128,256", help="budgets of paging-cost")
    ap.add_argument("--skew-n", type=int, default=2, help="prompts per task for paging-cost")
    ap.add_argument("--pool-requests", type=int, default=2, help="the KV pool holds this many full requests")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--batched-tokens", type=int, default=4096, help="max_num_batched_tokens (chunked prefill)")
    ap.add_argument("--preempt-n", type=int, default=4, help="prompts per task for preemption (length: --press-length)")
    ap.add_argument("--preempt-budget", type=int, default=64, help="SnapKV+MixKV budget of preemption")
    ap.add_argument("--preempt-tokens", type=int, default=256, help="output tokens per request in preemption")
    ap.add_argument("--preempt-spare", type=int, default=0,
                    help="blocks in preemption's tight pools beyond what vLLM needs (fewer: more preemptions)")
    ap.add_argument("--preempt-methods", default="snapkv+mixkv,full",
                    help="preemption's runs: snapkv+mixkv (the check) and full (the control: vLLM's own preemption)")
    ap.add_argument("--preempt-chunk", type=int, default=256, help="max_num_batched_tokens of preemption")
    ap.add_argument("--tp-size", type=int, default=3,
                    help="worker processes of tensor-parallel (must divide the model's KV heads: SmolLM2-135M has 3)")
    ap.add_argument("--serve-budget", type=int, default=64, help="SnapKV+MixKV budget of serve-http")
    ap.add_argument("--serve-timeout", type=float, default=300.0,
                    help="seconds serve-http waits for the server to start, and for each reply")
    ap.add_argument("--serve-eager", action=argparse.BooleanOptionalAction, default=True,
                    help="serve-http passes --enforce-eager (as the other parts; without it vLLM compiles the model "
                         "at start-up, minutes on two cores)")
    ap.add_argument("--json", type=Path, default=ROOT / "results" / "vllm-capacity.json")
    args = ap.parse_args(argv)
    try:
        args.parts = parse_parts(args.parts)
    except ValueError as error:
        ap.error(f"--parts: {error}")
    args.press_budgets = [int(b) for b in args.press_budgets.split(",")]
    args.preempt_methods = [m.strip() for m in args.preempt_methods.split(",")]
    from mixkv.integrations.vllm.config import accepted_methods

    unknown = set(args.preempt_methods) - set(accepted_methods())
    if unknown:
        ap.error(f"--preempt-methods: unknown {sorted(unknown)}; accepted: {', '.join(accepted_methods())}")
    args.skew_budgets = [int(b) for b in args.skew_budgets.split(",")]
    args.cap_requests = {k.strip(): int(v) for k, v in (item.split(":") for item in args.cap_requests.split(","))}
    args.cap_tasks = [t.strip() for t in args.cap_tasks.split(",") if t.strip()]
    try:
        settings = [capacity_setting(key, args.cap_method) for key in args.cap_requests]
    except ValueError:
        ap.error(f"--cap-requests: keys are 'full', a budget or METHOD@BUDGET, got {list(args.cap_requests)}")
    bad = sorted({m for m, _ in settings if m != "full" and m not in accepted_methods()})
    if bad:
        ap.error(f"--cap-requests / --cap-method: unknown {bad}; accepted: {', '.join(accepted_methods())}")
    from mixkv.testbeds.tasks import TASKS

    if not args.cap_tasks or set(args.cap_tasks) - set(TASKS):
        ap.error(f"--cap-tasks: unknown {sorted(set(args.cap_tasks) - set(TASKS))}; accepted: {', '.join(TASKS)}")
    return args


def record_run(report: dict, parts: list[str], command: str, ok: bool) -> None:
    """Note what produced the file: a run of every part replaces the list, a partial run adds to it.

    Earlier entries stay as they were written (runs before the parts had names list letters).
    """
    run = {"date": time.strftime("%Y-%m-%d"), "command": command, "parts": ",".join(parts), "ok": bool(ok)}
    everything = set(parts) >= set(PARTS)
    report["runs"] = ([] if everything else list(report.get("runs", []))) + [run]


def main(argv=None) -> int:
    raw_args = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.job:
        run_job(Job(**json.loads(Path(args.job).read_text())))
        return 0
    if not (args.model / "config.json").is_file():
        print(f"no model folder at {args.model}: run `make vllm-env` first", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    parts = set(args.parts)
    report: dict = {"model": str(args.model), "dtype": "float32", "block_size": args.block_size}
    if args.json.is_file():  # keep parts not rerun now
        report = {**json.loads(args.json.read_text()), **report}
    ok = True
    with tempfile.TemporaryDirectory(prefix="mixkv-vllm-check-") as tmp:
        work = Path(tmp)
        # The sections keep the keys earlier runs wrote (equality, capacity, ...), so their files still merge.
        if parts & {"no-op", "press-equal"}:
            report["equality"] = part_no_op_and_press_equal(args, tokenizer, work)
            ok &= report["equality"]["ok"]
        if "capacity" in parts:
            report["capacity"] = merge_capacity(report.get("capacity"), part_capacity(args, tokenizer, work))
        if "paging-cost" in parts:
            report["paged_budgets"] = part_paging_cost(args, tokenizer)
        if "preemption" in parts:
            report["preemption"] = part_preemption(args, tokenizer, work)
            ok &= report["preemption"]["ok"]
        if "tensor-parallel" in parts:
            report["tensor_parallel"] = part_tensor_parallel(args, tokenizer, work)
            ok &= report["tensor_parallel"]["ok"]
        if "serve-http" in parts:
            try:
                report["serve_http"] = part_serve_http(args, tokenizer, work)
            except vllm_serve.ServerError as error:
                print(f"(serve-http) FAILED: {error}", flush=True)
                report["serve_http"] = {"ok": False, "error": str(error).splitlines()[0]}
            ok &= report["serve_http"]["ok"]
    record_run(report, args.parts, " ".join(["scripts/vllm_check.py", *raw_args]), ok)
    if "capacity" in report:
        print_table(report["capacity"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}; {'OK' if ok else 'FAILED: differences found, or a server that did not start (above)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
