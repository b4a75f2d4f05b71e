#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: the CUDA tests, then the decode-attention
# microbenchmark and the model benchmark in bf16, with their JSON in $OUT (default out/gpu).
# Needs the package installed (make setup, or pip install -e .); flash-attn is optional
# (with it the flash varlen path runs too; without it the portable path does).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"

"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
try:
    import flash_attn
    print("flash-attn", flash_attn.__version__)
except ImportError:
    print("flash-attn not installed: the portable CUDA path is measured")
PY

echo "== CUDA tests"
MIXKV_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests.txt"

echo "== decode-attention microbenchmark (bf16)"
"$PYTHON" -m mixkv.cli.main bench --micro --dtype bfloat16 --micro-lengths 1024,4096,16384 \
    --micro-batches 1,8 --micro-iters 50 --micro-max-tokens 4194304 --json "$OUT/micro-bf16.json"

echo "== model benchmark (SmolLM2-135M, bf16)"
"$PYTHON" -m mixkv.cli.main bench --model smollm2-135m --dtype bfloat16 \
    --methods full,snapkv,snapkv+mixkv,adakv,adakv+mixkv --contexts 4096,16384 --budget 128 \
    --steps 32 --repeats 3 --device cuda --json "$OUT/bench-bf16.json"
echo "wrote $OUT"
