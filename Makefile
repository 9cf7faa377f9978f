# Quick start: `make demo` and `make test`. Both create and fill .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean perf-analyzer browser

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

test: $(STAMP) perf-analyzer browser
	$(PY) -m pytest

# The browser tests (tests/test_web.py) drive Debian's chromium through chromium-driver. Installed once
# with apt-get where it exists (as root); skipped when both are there; elsewhere the missing part is named
# and those tests skip.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium and chromium-driver (Debian packages) for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium chromium-driver >/dev/null \
		|| { echo "apt-get could not install chromium chromium-driver" >&2; exit 1; }; \
	else \
		echo "note: $$(command -v chromium >/dev/null || echo 'chromium ')$$(command -v chromedriver >/dev/null \
			|| echo 'chromium-driver ')missing and not installable here (needs apt-get as root): the browser tests skip"; \
	fi

bench: $(STAMP)
	$(PY) -m flowact.benchmarks.inprocess --presets tiny,cpu --batches 1,2,4

clean:
	rm -rf $(VENV) artifacts out.mp4
