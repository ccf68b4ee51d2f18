# Quickstart targets. Each creates .venv on first use (CPU torch 2.13.0 pinned by constraints-cpu.txt).
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip install -q -c constraints-cpu.txt

.PHONY: run test lint clean chromium

# The main job: the whole R1 pipeline, offline, with runs/speedrun/report.md (a rerun skips finished stages).
run: $(VENV)/.runtime
	$(VENV)/bin/nanoseek speedrun --out runs/speedrun

test: $(VENV)/.dev chromium
	$(VENV)/bin/ruff check nanoseek tests
	$(VENV)/bin/python -m pytest -q -n 2

$(VENV)/.runtime: pyproject.toml constraints-cpu.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: pyproject.toml constraints-cpu.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.runtime

# The chat page's browser test uses Debian's chromium; it skips, saying why, where it cannot be installed.
chromium:
	@command -v chromium > /dev/null || (command -v apt-get > /dev/null && \
		(apt-get install -y -q chromium > /dev/null 2>&1 || \
		 (apt-get update -q > /dev/null 2>&1 && apt-get install -y -q chromium > /dev/null 2>&1))) || \
		echo "chromium could not be installed: the browser test will skip"

clean:
	rm -rf $(VENV) runs
