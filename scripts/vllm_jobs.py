"""One vLLM configuration per fresh interpreter, for the vLLM check scripts (vllm_check.py, vllm_vlm_check.py).

Why a process per run: the plugin reads its configuration from the environment when vLLM starts its
processes, and a fresh process frees the engine completely. The calling script re-runs itself with
``--job <spec>``; the job writes its result JSON to ``job.out``. Standard library only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path


def launch(job, label: str, script: str) -> dict:
    """Run ``script --job <spec>`` for the dataclass ``job`` (fields ``plugin_env`` and ``out``); its result
    JSON with ``log`` (the run's log path) added, or a RuntimeError with the log's tail."""
    spec = Path(job.out).with_suffix(".job.json")
    spec.write_text(json.dumps(asdict(job)))
    log = Path(job.out).with_suffix(".log")
    print(f"  [{label}] starting vLLM ({' '.join(f'{k}={v}' for k, v in job.plugin_env.items()) or 'no plugin'})",
          flush=True)
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, script, "--job", str(spec)], stdout=fh, stderr=subprocess.STDOUT,
                              check=False)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"[{label}] vLLM run failed (exit {proc.returncode}); log {log}:\n{tail}")
    result = json.loads(Path(job.out).read_text())
    result["log"] = str(log)
    print(f"  [{label}] load {result['load_seconds']:.0f} s, generate {result['generate_seconds']:.1f} s", flush=True)
    return result
