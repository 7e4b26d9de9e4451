# Quick start: `make demo` (the whole study on the embedded tiny model) and `make test`.
# Both create .venv and install the pinned CPU dependencies on first use.
# `make test PYTHON=python3` skips the virtualenv and uses an interpreter that already has the packages
# (e.g. a GPU machine with torch 2.11 and triton 3.6 and no internet).
VENV := .venv
PYTHON ?= $(VENV)/bin/python

ifeq ($(PYTHON),$(VENV)/bin/python)
DEPS := $(VENV)/.installed
else
DEPS :=
endif

.PHONY: demo test test-fast bench profile clean

$(VENV)/.installed: requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: on CPU machines this is the CPU wheel; a bare `torch` would pull a CUDA build.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements.lock
	touch $@

demo: $(DEPS)
	$(PYTHON) cli.py demo

# Two workers when pytest-xdist is installed (it is in requirements.lock); plain pytest otherwise.
XDIST = $(shell $(PYTHON) -c "import xdist" >/dev/null 2>&1 && echo "-n 2")

test: $(DEPS)
	$(PYTHON) -m pytest -q $(XDIST)

test-fast: $(DEPS)
	$(PYTHON) -m pytest -q $(XDIST) -m "not slow"

profile: $(DEPS)
	$(PYTHON) cli.py profile

# The side-by-side benchmarks of BENCHMARKS.md (minutes on a 2-core CPU): generation against
# transformers' generate, then a training step against transformers + PEFT (Qwen3-0.6B shape).
bench: $(DEPS)
	$(PYTHON) benchmarks/bench_generate.py
	$(PYTHON) cli.py bench --steps 4

clean:
	rm -rf $(VENV) .pytest_cache
