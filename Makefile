# rayft: two commands on a fresh machine.
#   make demo   set up .venv, then train, merge, serve and answer on the bundled Gemma 3 270M
#   make test   set up .venv, then lint and run the whole test suite (what CI runs)
#
# torch is installed first and on its own: the CPU wheel by default. GPU users pick their CUDA
# build, e.g.  make setup TORCH_SPEC="torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rayft-installed

.PHONY: setup demo test test-slow lint format clean

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

demo: setup
	$(VENV)/bin/rayft demo

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q --durations=30

test-slow: lint    # the extra Ray runs kept out of CI's 30-minute budget
	$(PY) -m pytest -q -m slow

format: setup
	$(VENV)/bin/ruff format .

clean:
	rm -rf saves .pytest_cache .ruff_cache
