#!/usr/bin/env bash
# Build the virtual environment that runs NVIDIA kvpress next to mixkv, for `mixkv compare`.
#
# kvpress 0.5.5 requires transformers<5.3 while mixkv uses transformers 5.24, so kvpress gets its
# own environment: `.venv-kvpress` at the repository root (git-ignored). It is created with
# --system-site-packages so that the torch already installed for this interpreter (the CPU build)
# is reused: torch is pinned to the installed version with a pip constraint, so pip fails rather
# than download another torch (a CUDA build is several GB), and the script checks afterwards that
# torch still comes from outside the venv. transformers 5.2.0 installed into the venv shadows the
# system's 5.24 inside the venv only.
#
# Idempotent: when the venv exists and imports the pinned versions, it does nothing.
#
# Environment: KVPRESS_VENV (default <repo>/.venv-kvpress), PYTHON (default python3),
#              KVPRESS_SPEC / KVPRESS_TRANSFORMERS (default kvpress==0.5.5 / transformers==5.2.0).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${KVPRESS_VENV:-$REPO/.venv-kvpress}"
PYTHON="${PYTHON:-python3}"
KVPRESS_SPEC="${KVPRESS_SPEC:-kvpress==0.5.5}"
TRANSFORMERS_SPEC="${KVPRESS_TRANSFORMERS:-transformers==5.2.0}"
STAMP="$VENV/.kvpress-setup"
WANT="$KVPRESS_SPEC $TRANSFORMERS_SPEC gguf"

say() { echo "[kvpress-env] $*"; }

check_env() {
    # Prints versions; fails unless kvpress and transformers import at the pinned versions and
    # torch is the system one (not installed inside the venv).
    "$VENV/bin/python" - "$VENV" "$KVPRESS_SPEC" "$TRANSFORMERS_SPEC" <<'PY'
import os, sys
venv, kv_spec, tf_spec = sys.argv[1:4]
import torch, transformers, kvpress, gguf  # noqa: F401
from importlib.metadata import version
venv = os.path.realpath(venv)
torch_dir = os.path.realpath(os.path.dirname(torch.__file__))
problems = []
if torch_dir.startswith(venv + os.sep):
    problems.append(f"torch was installed inside the venv ({torch_dir})")
for spec, got in ((kv_spec, version("kvpress")), (tf_spec, transformers.__version__)):
    if "==" in spec and spec.split("==", 1)[1] != got:
        problems.append(f"{spec} wanted, {got} installed")
print(f"kvpress {version('kvpress')}, transformers {transformers.__version__}, "
      f"torch {torch.__version__} from {torch_dir}")
if problems:
    sys.exit("; ".join(problems))
PY
}

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && CHECK="$(check_env 2>/dev/null)"; then
    say "already set up: $VENV ($CHECK)"
    exit 0
fi

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    say "error: $PYTHON has no torch; install the CPU build first (make setup) -- refusing to let pip pick one" >&2
    exit 1
fi
TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__)')"

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV (python3 -m venv --system-site-packages, reusing torch $TORCH_VERSION)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
    echo '*' > "$VENV/.gitignore"  # as Python >= 3.13 venvs do: git ignores the venv by itself
else
    say "reusing the existing venv $VENV"
fi

CONSTRAINTS="$VENV/constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
say "installing $WANT (constraint torch==$TORCH_VERSION: pip may not download torch)"
LOG="$VENV/pip-install.log"
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -c "$CONSTRAINTS" \
        "$KVPRESS_SPEC" "$TRANSFORMERS_SPEC" gguf >"$LOG" 2>&1; then
    tail -n 30 "$LOG" >&2
    say "error: pip install failed (full log: $LOG)" >&2
    exit 1
fi
if grep -Eiq '^(Collecting|Downloading) torch([^a-z_-]|$)' "$LOG"; then
    say "error: pip fetched torch (see $LOG); expected the system torch to be reused" >&2
    exit 1
fi
NEW="$(sed -n 's/^Successfully installed //p' "$LOG")"
say "pip installed into the venv: ${NEW:-nothing new}"
check_env | sed 's/^/[kvpress-env] check: /'
echo "$WANT" > "$STAMP"
say "done: run kvpress with $VENV/bin/python"
