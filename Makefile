# Quick start: `make demo` and `make test`. Both create and fill .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean perf-analyzer

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on disk (a bare `torch` would pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flowact demo --preset cpu --out out.mp4

# NVIDIA perf_analyzer into tools/ (git-ignored; a few seconds, nothing system-wide). Optional: its
# test skips without it, so a failed download does not fail `make test`.
perf-analyzer: $(STAMP)
	-bash benchmarks/install_perf_analyzer.sh $(PY)

test: $(STAMP) perf-analyzer
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m flowact.benchmarks.inprocess --presets tiny,cpu --batches 1,2,4

clean:
	rm -rf $(VENV) artifacts out.mp4
