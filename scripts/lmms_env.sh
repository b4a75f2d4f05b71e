#!/usr/bin/env bash
# Build the optional virtual environment that runs the real, unforked lmms-eval with mixkv as its plugin
# (`make lmms-env`; used by `make lmms-check` = scripts/lmms_check.py).
#
# Why a separate venv: `pip install lmms-eval` (0.7.3) pulls the registry's CUDA build of torch 2.14.x and
# torchvision 0.29.x (about 7 GB); the CPU torch 2.13.0 of `make setup` cannot be kept, because the
# registry's torchvision does not load with it (`operator torchvision::nms does not exist`). Installing
# mixkv alone must never pull lmms-eval or a CUDA build, so lmms-eval lives only here.
#
# Where: $MIXKV_LMMS_VENV, else <cache>/venv-lmms with <cache> = $MIXKV_CACHE or ~/.cache/mixkv (the rule of
# mixkv.testbeds.smollm2.default_cache_dir). Check free space first: the venv is ~7 GB.
#
# What, in two steps:
#   1. lmms-eval ($LMMS_SPEC, default lmms-eval==0.7.3) with its own requirements (torch, torchvision,
#      transformers, datasets, ...), plus gguf (mixkv's toy VLM sits on SmolLM2 read from a GGUF file) and
#      filelock<4: lmms-eval 0.7.3's evaluator imports `filelock._api`, which filelock 4 (what pip picks
#      for it otherwise) no longer has (measured: "No module named 'filelock._api'" before any task runs);
#      and decord, which lmms-eval's llava_hf wrapper imports unconditionally (not among its requirements);
#   2. this checkout, editable and with --no-deps (its requirements are met by step 1; --no-deps guarantees
#      pip cannot swap torch or transformers behind lmms-eval's back). The editable install also registers
#      mixkv's `lmms_eval.models` entry point (declared in pyproject.toml).
#
# Idempotent: when the venv exists, was completed with the same spec and imports, it only re-installs mixkv
# (cheap, so a changed pyproject.toml is picked up).
#
# Environment: MIXKV_LMMS_VENV, MIXKV_CACHE (see above); PYTHON (default python3, only creates the venv);
#              LMMS_SPEC (default lmms-eval==0.7.3); LMMS_EXTRA (extra pip requirements, default "gguf filelock<4 decord").
set -euo pipefail
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/../src/mixkv/envs/venv_lib.sh"


ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$(expand_home "${MIXKV_CACHE:-$HOME/.cache/mixkv}")"
VENV="$(expand_home "${MIXKV_LMMS_VENV:-$CACHE/venv-lmms}")"
PYTHON="${PYTHON:-python3}"
LMMS_SPEC="${LMMS_SPEC:-lmms-eval==0.7.3}"
LMMS_EXTRA="${LMMS_EXTRA:-gguf filelock<4 decord}"
STAMP="$VENV/.lmms-setup"
WANT="$LMMS_SPEC $LMMS_EXTRA"

say() { echo "[lmms-env] $*"; }

check_env() {
    # Prints versions; fails unless lmms-eval, torch, transformers and gguf import.
    "$VENV/bin/python" - <<'PY'
import torch, transformers, gguf  # noqa: F401
import filelock._api  # noqa: F401  (lmms-eval 0.7.3's evaluator needs it)
import lmms_eval  # noqa: F401
from lmms_eval.api.model import lmms  # noqa: F401
from importlib.metadata import version
print(f"lmms-eval {version('lmms-eval')}, transformers {transformers.__version__}, torch {torch.__version__}")
PY
}


if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && CHECK="$(check_env 2>/dev/null)"; then
    say "already set up: $VENV ($CHECK)"
else
    if [[ ! -x "$VENV/bin/python" ]]; then
        mkdir -p "$(dirname "$VENV")"
        avail_kb="$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print $4}')"
        if [[ "${avail_kb:-0}" -lt $((9 * 1024 * 1024)) ]]; then
            say "error: less than 9 GB free under $(dirname "$VENV"); the venv needs ~7 GB (set MIXKV_LMMS_VENV)" >&2
            exit 1
        fi
        say "creating $VENV ($PYTHON -m venv)"
        if ! "$PYTHON" -m venv "$VENV"; then
            say "error: $PYTHON -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
            exit 1
        fi
    else
        say "reusing the existing venv $VENV"
    fi
    echo '*' > "$VENV/.gitignore"  # as Python >= 3.13 venvs do: git ignores the venv by itself
    say "step 1/2: $LMMS_SPEC $LMMS_EXTRA (pulls torch + torchvision, ~7 GB; several minutes)"
    # shellcheck disable=SC2086
    pip_install "$VENV/pip-lmms.log" "$LMMS_SPEC" $LMMS_EXTRA
    check_env | sed 's/^/[lmms-env] check: /'
    echo "$WANT" > "$STAMP"
fi

say "step 2/2: mixkv from $ROOT (editable, --no-deps)"
pip_install "$VENV/pip-mixkv.log" --no-deps -e "$ROOT"
# mixkv's pyproject.toml declares the `lmms_eval.models` entry point; the editable install registers it.
"$VENV/bin/python" - <<'PY'
import pathlib, sysconfig
from importlib.metadata import entry_points

VALUE = "mixkv.integrations.lmms_eval.manifests:manifests"
old_shim = pathlib.Path(sysconfig.get_paths()["purelib"]) / "mixkv_lmms_entry_point-0.dist-info"
if old_shim.exists():  # written by an earlier version of this script, before pyproject.toml declared it
    for f in old_shim.iterdir():
        f.unlink()
    old_shim.rmdir()
if not any(ep.value == VALUE for ep in entry_points(group="lmms_eval.models")):
    raise SystemExit("[lmms-env] error: mixkv's lmms_eval.models entry point is not visible in the venv")
print("[lmms-env] entry point lmms_eval.models: registered")
PY
"$VENV/bin/python" -c "from lmms_eval.models import get_model; print('[lmms-env] lmms-eval sees:', get_model('mixkv_toy_vlm').__name__)"
say "done: run lmms-eval with $VENV/bin/python -m lmms_eval (or make lmms-check)"
