# refface — every entry point creates and reuses its own virtual env (.venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# GPU=1: the CUDA torch, onnxruntime-gpu and FAISS GPU. By default GPU=1 when nvidia-smi lists a
# GPU (never under CI); otherwise the CPU builds of all three. See docs/install.md.
GPU ?= $(if $(CI),,$(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo 1))
RUNTIME := $(if $(filter 1 yes true,$(GPU)),gpu,cpu)
EXTRAS ?= $(RUNTIME),train,tracking,dev
# The CPU torch: torch==2.13.0 is the CPU wheel where pip's find-links holds it; elsewhere set
# TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu so pip does not pick the CUDA build.
TORCH_CPU_INDEX ?=
TORCH_SPEC ?= $(if $(filter gpu,$(RUNTIME)),torch,torch==2.13.0)
TORCH_PIP := "$(TORCH_SPEC)" $(if $(and $(filter cpu,$(RUNTIME)),$(TORCH_CPU_INDEX)),--index-url $(TORCH_CPU_INDEX))
# Offline machines point the demo and tests at a local folder of faces.
REFFACE_SAMPLE_DIR ?= $(firstword $(wildcard ../shared/data/faces))
export REFFACE_SAMPLE_DIR
OUT ?= out
WORKERS ?= 2
# build-ffhq-ref: auto = ArcFace when its weights are found (MODEL= or insightface's model root), else dlib.
EMBEDDER ?= auto
# train-mgfr reads the dataset build-ffhq-ref wrote unless DATASET= says otherwise.
DATASET_MGFR = $(or $(DATASET),$(OUT)/ffhq-ref)
CONFIG_MGFR = $(or $(CONFIG),configs/mgfr_sd15.yaml)

.PHONY: help install test test-fast lint format demo build-ffhq-ref degrade-test audit-leakage train-mgfr train-refldm bench clean

help:  ## list the entry points
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml requirements-test.txt scripts/select_runtime.sh
	$(PY) -c "import torch, sys; sys.exit(('$(RUNTIME)' == 'gpu') != (torch.version.cuda is not None))" 2>/dev/null \
		|| { $(PY) -m pip uninstall -y -q torch 2>/dev/null; $(PY) -m pip install -q $(TORCH_PIP); }
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps --no-build-isolation -r requirements-test.txt
	bash scripts/select_runtime.sh $(PY) $(RUNTIME)
	touch $@

install: $(VENV)/.installed  ## create .venv and install refface (GPU=1: CUDA builds; see docs/install.md)

lint: install  ## ruff lint + format check, mypy type check, import-linter layer contracts
	$(BIN)/ruff check refface tests bench
	$(BIN)/ruff format --check refface tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo

format: install
	$(BIN)/ruff format refface tests bench
	$(BIN)/ruff check --fix refface tests bench

test: install  ## lint, then the full test suite (the 25 slowest tests listed at the end)
	$(MAKE) --no-print-directory lint
	$(BIN)/pytest -q -ra -p no:cacheprovider --durations=25 $(PYTEST_ARGS)

test-fast: install  ## the quick tier: every test not marked slow or faces (no lint)
	REFFACE_TEST_NO_FACES=1 $(BIN)/pytest -q -ra -p no:cacheprovider -m "not slow and not faces" --durations=10 $(PYTEST_ARGS)

demo: install  ## the whole pipeline on the default input (DATA=<folder> to override)
	$(BIN)/refface demo --out $(OUT)/demo $(if $(DATA),--data $(DATA)) --workers $(WORKERS)

build-ffhq-ref: install  ## FFHQ-Ref-style dataset: make build-ffhq-ref FFHQ=<images dir> [EMBEDDER=auto|arcface|dlib] [MODEL=<weights>] [OUT=...]
	@test -n "$(FFHQ)" || { echo "usage: make build-ffhq-ref FFHQ=<folder of FFHQ-aligned images> [EMBEDDER=auto|arcface|dlib] [MODEL=<embedder weights>] [DETECTOR=prealigned|dlib|scrfd] [OUT=out]"; exit 2; }
	$(BIN)/refface build ffhq-ref $(FFHQ) --out $(OUT)/ffhq-ref --embedder $(EMBEDDER) $(if $(MODEL),--model $(MODEL)) $(if $(DETECTOR),--detector $(DETECTOR)) --workers $(WORKERS)

degrade-test: install  ## LQ test sets: make degrade-test DATASET=<dataset root>
	@test -n "$(DATASET)" || { echo "usage: make degrade-test DATASET=<dataset root>"; exit 2; }
	$(BIN)/refface degrade $(DATASET) --preset refldm-severe --preset refldm-moderate --workers $(WORKERS)

audit-leakage: install  ## leakage audit: make audit-leakage TRAIN=<set> TEST=<set>
	@test -n "$(TRAIN)" -a -n "$(TEST)" || { echo "usage: make audit-leakage TRAIN=<split list|csv|root|folder> TEST=<...>"; exit 2; }
	$(BIN)/refface audit --set train=$(TRAIN) --set test=$(TEST) --out $(OUT)/audit

train-mgfr: install  ## MGFR: make train-mgfr SD=<diffusers folder> [DATASET=<root>, default OUT/ffhq-ref] [STAGE=1|2] [CONFIG=...] [MAX_STEPS=n]
	@test -n "$(SD)" || { echo "usage: make train-mgfr SD=<diffusers SD folder> [DATASET=<dataset root or shards>, default $(OUT)/ffhq-ref] [STAGE=1|2] [CONFIG=configs/mgfr_sd15.yaml] [MAX_STEPS=n]"; exit 2; }
	$(BIN)/accelerate launch -m refface.train.mgfr.train --config $(CONFIG_MGFR) --dataset $(DATASET_MGFR) --sd $(SD) --stage $(or $(STAGE),1) --output $(OUT)/mgfr $(if $(MAX_STEPS),--max-steps $(MAX_STEPS))

train-refldm: install  ## ReF-LDM: make train-refldm DATASET=<root> [STAGE=vqgan|ldm|refldm] [CONFIG=...]
	@test -n "$(DATASET)" || { echo "usage: make train-refldm DATASET=<dataset root> [STAGE=refldm]"; exit 2; }
	$(BIN)/accelerate launch -m refface.train.refldm.train --config $(or $(CONFIG),configs/refldm.yaml) --dataset $(DATASET) --stage $(or $(STAGE),refldm) --output $(OUT)/refldm

bench: install  ## run every CPU benchmark in bench/ (results in bench/results/); GPU: bash bench/gpu_check.sh
	for f in bench/*.py; do case $$f in bench/gpu_check.py|bench/install_check.py) continue;; esac; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .import_linter_cache
