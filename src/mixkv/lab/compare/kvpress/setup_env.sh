#!/usr/bin/env bash
# Build the virtual environment that runs NVIDIA kvpress next to mixkv, for `mixkv compare`.
#
# kvpress 0.5.5 requires transformers<5.3 while mixkv uses transformers 5.24, so kvpress gets its
# own, isolated venv, outside any source checkout: $KVPRESS_VENV, else <cache>/venv-kvpress with
# <cache> = $MIXKV_CACHE or ~/.cache/mixkv (the rule of mixkv.lab.compare.kvpress_side).
#
# The venv does not inherit torch (no --system-site-packages): when mixkv is installed in a
# virtualenv, as usual, a venv made from that interpreter sees the *base* interpreter's
# site-packages, not the virtualenv's torch. So torch is installed into the venv, in two steps:
#   1. torch at the CPU pin ($KVPRESS_TORCH, default torch==2.13.0, the pin of `make setup`; an
#      unpinned torch would pull a multi-GB CUDA build);
#   2. kvpress, transformers (kvpress pins <5.3) and gguf, with the torch just installed as a pip
#      constraint, so resolving kvpress's requirements cannot replace it (checked in pip's log).
#
# Idempotent: when the venv exists, was completed with the same pins and imports them, it does nothing.
#
# Environment: KVPRESS_VENV, MIXKV_CACHE (see above); PYTHON (default python3: only creates the venv,
#              needs no torch); KVPRESS_TORCH / KVPRESS_SPEC / KVPRESS_TRANSFORMERS
#              (default torch==2.13.0 / kvpress==0.5.5 / transformers==5.2.0).
set -euo pipefail
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/../../../envs/venv_lib.sh"


CACHE="$(expand_home "${MIXKV_CACHE:-$HOME/.cache/mixkv}")"
VENV="$(expand_home "${KVPRESS_VENV:-$CACHE/venv-kvpress}")"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${KVPRESS_TORCH:-torch==2.13.0}"
KVPRESS_SPEC="${KVPRESS_SPEC:-kvpress==0.5.5}"
TRANSFORMERS_SPEC="${KVPRESS_TRANSFORMERS:-transformers==5.2.0}"
STAMP="$VENV/.kvpress-setup"
WANT="$TORCH_SPEC $KVPRESS_SPEC $TRANSFORMERS_SPEC gguf"

say() { echo "[kvpress-env] $*"; }

check_env() {
    # Prints versions; fails unless torch, kvpress and transformers import at the pinned versions
    # (a local label such as +cpu is accepted for a pin without one).
    "$VENV/bin/python" - "$TORCH_SPEC" "$KVPRESS_SPEC" "$TRANSFORMERS_SPEC" <<'PY'
import os, sys
torch_spec, kv_spec, tf_spec = sys.argv[1:4]
import torch, transformers, kvpress, gguf  # noqa: F401
from importlib.metadata import version
problems = []
for spec, got in ((torch_spec, torch.__version__), (kv_spec, version("kvpress")), (tf_spec, transformers.__version__)):
    want = spec.split("==", 1)[1] if "==" in spec else None
    if want is not None and got != want and got.split("+", 1)[0] != want:
        problems.append(f"{spec} wanted, {got} installed")
print(f"kvpress {version('kvpress')}, transformers {transformers.__version__}, "
      f"torch {torch.__version__} from {os.path.dirname(torch.__file__)}")
if problems:
    sys.exit("; ".join(problems))
PY
}


if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && CHECK="$(check_env 2>/dev/null)"; then
    say "already set up: $VENV ($CHECK)"
    exit 0
fi

# A venv made by an older version of this script sees the base interpreter's packages: rebuild it.
if [[ -f "$VENV/pyvenv.cfg" ]] && grep -Eiq '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg"; then
    say "rebuilding $VENV (it was made with --system-site-packages)"
    rm -f "$STAMP"
    "$PYTHON" -m venv --clear "$VENV"
elif [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV ($PYTHON -m venv)"
    mkdir -p "$(dirname "$VENV")"
    if ! "$PYTHON" -m venv "$VENV"; then
        say "error: $PYTHON -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
        exit 1
    fi
else
    say "reusing the existing venv $VENV"
fi
echo '*' > "$VENV/.gitignore"  # as Python >= 3.13 venvs do: git ignores the venv by itself

say "step 1/2: $TORCH_SPEC"
pip_install "$VENV/pip-torch.log" "$TORCH_SPEC"
TORCH_VERSION="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"

CONSTRAINTS="$VENV/constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
say "step 2/2: $KVPRESS_SPEC $TRANSFORMERS_SPEC gguf (constraint torch==$TORCH_VERSION: pip may not replace it)"
LOG="$VENV/pip-install.log"
pip_install "$LOG" -c "$CONSTRAINTS" "$KVPRESS_SPEC" "$TRANSFORMERS_SPEC" gguf
if grep -Eiq '^(Collecting|Downloading) torch([^a-z_-]|$)' "$LOG"; then
    say "error: pip fetched another torch for kvpress (see $LOG); expected torch $TORCH_VERSION to be kept" >&2
    exit 1
fi
check_env | sed 's/^/[kvpress-env] check: /'
echo "$WANT" > "$STAMP"
say "done: run kvpress with $VENV/bin/python"
