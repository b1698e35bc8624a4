# make test: set up .venv, install, run the tests.  make demo: set up, then summarize sample documents.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch first, so that no dependency pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: test demo setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) jobs/demo.py --output demo_out

clean:
	rm -rf $(VENV) demo_out .pytest_cache
