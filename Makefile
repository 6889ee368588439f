# `make demo` and `make test` work on a fresh machine: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Development and CI pin torch and torchvision: an unpinned torch pulls a newer multi-GB build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
WORKDIR ?= work/demo

.PHONY: install bytecode demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev]' $(TORCH_PINS)
	touch $@

install: $(VENV)/.installed

# The project's own bytecode, written even where PYTHONDONTWRITEBYTECODE is set (as on CI
# machines): every Ray worker, actor and job process imports these modules, and would compile
# them again each time (~0.3 s of CPU per process).
bytecode: install
	$(PY) -m compileall -q mltr jobs pipeline tests

demo: bytecode
	$(PY) -m jobs.demo --workdir $(WORKDIR)

test: bytecode
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf work .pytest_cache
