# Quickstart targets. Each creates .venv on first use (CPU torch 2.13.0 pinned by constraints-cpu.txt).
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip install -q -c constraints-cpu.txt

.PHONY: run test lint clean

run: $(VENV)/.runtime
	rm -rf runs/quickstart
	$(VENV)/bin/nanoseek pretrain --out runs/quickstart
	$(VENV)/bin/nanoseek generate --model runs/quickstart/latest --prompt "What is 7 * 6 + 5?" --temperature 0 --max-tokens 80

test: $(VENV)/.dev
	$(VENV)/bin/ruff check nanoseek tests
	$(VENV)/bin/python -m pytest -q

$(VENV)/.runtime: pyproject.toml constraints-cpu.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: pyproject.toml constraints-cpu.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.runtime

clean:
	rm -rf $(VENV) runs
