"""The kvpress side: its virtual environment, the subprocess that measures it, and its results file.

kvpress 0.5.5 needs transformers<5.3 while mixkv uses 5.24, so kvpress runs in a venv of its own,
built by ``kvpress/setup_env.sh`` and driven by ``kvpress/run_kvpress.py``. Both ship inside this
package (found with :mod:`importlib.resources`, so an installed wheel works as a checkout does).
The venv lives in ``$KVPRESS_VENV``, else ``<cache>/venv-kvpress`` with ``<cache>`` the mixkv cache
(``$MIXKV_CACHE`` or ``~/.cache/mixkv``): never inside the package or a source checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

from ...testbeds.smollm2 import default_cache_dir
from .protocol import KVPRESS_FORMAT, METHODS

VENV_ENV = "KVPRESS_VENV"
VENV_NAME = "venv-kvpress"
SCRIPTS_PACKAGE = f"{__package__}.kvpress"
SETUP_SCRIPT = "setup_env.sh"
RUN_SCRIPT = "run_kvpress.py"
STAMP = ".kvpress-setup"  # written by setup_env.sh once the venv is complete
# settings that change the numbers: results made under other values cannot be reused
SETTINGS_THAT_MATTER = ("budget", "compression_ratio", "window", "kernel", "max_new_tokens", "decode_steps")


def script_path(name: str) -> Path:
    """A file of ``mixkv.lab.compare.kvpress`` on disk (it is handed to bash or another Python)."""
    resource = resources.files(SCRIPTS_PACKAGE) / name
    if not isinstance(resource, Path):
        raise RuntimeError(f"{name} of {SCRIPTS_PACKAGE} is not a file on disk ({resource!r}); install mixkv "
                           "unzipped to run the kvpress comparison")
    if not resource.is_file():
        raise FileNotFoundError(f"{resource} is missing from the installed mixkv package (package data)")
    return resource


def default_venv() -> Path:
    """``$KVPRESS_VENV``, else ``<mixkv cache>/venv-kvpress`` (the same rule as ``setup_env.sh``)."""
    env = os.environ.get(VENV_ENV)
    return Path(env).expanduser() if env else default_cache_dir() / VENV_NAME


def kvpress_paths(venv: Path | str | None = None) -> dict[str, Path]:
    """The two scripts, the venv, its Python and its completion stamp."""
    venv = Path(venv).expanduser() if venv is not None else default_venv()
    return {"setup": script_path(SETUP_SCRIPT), "script": script_path(RUN_SCRIPT), "venv": venv,
            "python": venv / "bin" / "python", "stamp": venv / STAMP}


def ensure_kvpress_env(paths: dict[str, Path], allow_setup: bool = True) -> Path:
    """The venv's Python; runs ``setup_env.sh`` when the venv is missing or was never completed."""
    if paths["python"].exists() and paths["stamp"].exists():
        return paths["python"]
    if not allow_setup:
        raise RuntimeError(f"{paths['venv']} is not set up; run `bash {paths['setup']}` (or drop --no-setup)")
    env = dict(os.environ, KVPRESS_VENV=str(paths["venv"]), PYTHON=os.environ.get("PYTHON", sys.executable))
    proc = subprocess.run(["bash", str(paths["setup"])], env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{paths['setup']} failed with status {proc.returncode}")
    return paths["python"]


def run_kvpress(python: Path, script: Path, prompts_path: Path, gguf: Path, out_path: Path,
                threads: int) -> dict:
    """Run the kvpress side in its venv (output streamed); returns its results JSON.

    Offline and without progress bars, and without ``PYTHONPATH`` so nothing of mixkv's
    environment (transformers 5.24) leaks into the venv.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    cmd = [str(python), str(script), str(prompts_path), str(gguf), str(out_path), "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the kvpress run failed with status {proc.returncode}: {' '.join(cmd)}")
    return load_kvpress_results(out_path)


def load_kvpress_results(path: Path | str) -> dict:
    """A results file written by ``run_kvpress.py``; raises on any other JSON."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != KVPRESS_FORMAT:
        raise ValueError(f"{path}: not a kvpress results file (format {data.get('format')!r})")
    return data


def check_kvpress_results(spec: dict, kv_data: dict) -> None:
    """Raise unless ``kv_data`` holds every (prompt, method) of ``spec`` under the same settings.

    Reused results (``--kvpress-results``) must describe the very prompts measured on the mixkv side.
    """
    mine, theirs = spec["settings"], kv_data.get("settings", {})
    for key in SETTINGS_THAT_MATTER:
        if mine.get(key) != theirs.get(key):
            raise ValueError(f"the kvpress results were made with {key}={theirs.get(key)!r}, this run uses "
                             f"{mine.get(key)!r}; rerun without --kvpress-results")
    have = {(r["prompt_id"], r["method"]): r["prompt_tokens"] for r in kv_data["runs"]}
    for p in spec["prompts"]:
        for method in mine.get("methods", METHODS):
            n = have.get((p["id"], method))
            if n is None:
                raise ValueError(f"the kvpress results lack prompt {p['id']} under {method}; "
                                 "rerun without --kvpress-results")
            if n != len(p["input_ids"]):
                raise ValueError(f"prompt {p['id']} has {len(p['input_ids'])} tokens here but {n} in the kvpress "
                                 "results (another tokenizer, seed or task version?); rerun without --kvpress-results")
