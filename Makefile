# make test: set up .venv, install, lint, run the tests.  make demo: set up, then summarize sample documents.
# make test-latest: the same tests in .venv-latest, with the newest releases that pyproject.toml allows.
PYTHON ?= python3
# The CPU wheel of torch; a GPU machine names the CUDA build it wants here (TORCH_SPEC='torch==2.13.0' ...).
TORCH_SPEC ?= torch==2.13.0
# Versions known to pass the tests (CPython 3.11, Linux x86-64). `make lock` rewrites it from .venv-latest.
LOCK := constraints.txt
# More conditions on the installed torch for tests.environment: CI passes --cpu-only.
TORCH_CHECK ?=

# What ruff lints and checks the formatting of (its rules: [tool.ruff] in pyproject.toml).
LINTED := model pipeline jobs synthetic benchmarks tests

.PHONY: test lint demo setup test-latest setup-latest lock clean

# $(call install,VENV,CONSTRAINTS): a venv with TORCH_SPEC first, then the project and its test extras, with the
# torch just installed pinned by a constraint: without it the project's install has replaced the CPU torch
# with a CUDA build of a newer release (issue 11). The last step fails if torch changed all the same.
define install
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q $(2) --upgrade pip setuptools
	$(1)/bin/python -m pip install -q $(2) "$(TORCH_SPEC)"
	$(1)/bin/python -c 'import torch; print(f"torch=={torch.__version__}")' > $(1)/torch-constraint.txt
	$(1)/bin/python -m pip install -q $(2) -c $(1)/torch-constraint.txt --no-build-isolation -e ".[test]"
	$(1)/bin/python -m tests.environment --torch "$(TORCH_SPEC)" $(TORCH_CHECK)
	touch $(1)/.installed
endef

setup: .venv/.installed

.venv/.installed: pyproject.toml $(LOCK)
	$(call install,.venv,-c $(LOCK))

test: setup lint
	.venv/bin/python -m pytest -q tests

lint: setup
	.venv/bin/python -m ruff check $(LINTED)
	.venv/bin/python -m ruff format --check $(LINTED)

demo: setup
	.venv/bin/python jobs/demo.py --output demo_out

setup-latest:
	$(call install,.venv-latest,)

test-latest: setup-latest
	.venv-latest/bin/python -m pytest -q tests

lock:
	test -f .venv-latest/.installed  # run 'make test-latest' first: lock what passed
	{ echo "# Versions known to pass 'make test' (CPython 3.11, Linux x86-64), written by 'make lock' from .venv-latest."; \
	  echo "# A pip constraints file: the Makefile installs with -c $(LOCK). torch is not here: TORCH_SPEC chooses it."; \
	  .venv-latest/bin/python -m pip freeze --all --exclude-editable | grep -v -i '^torch=='; } > $(LOCK)

clean:
	rm -rf .venv .venv-latest demo_out .pytest_cache
