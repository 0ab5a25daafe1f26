# The two commands the README promises. Both create .venv when it is missing and install
# with constraints.txt, so torch stays at the pinned CPU build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
OUT ?= demo_out

.PHONY: demo test lint bench fuzz clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/trustmap trust --out $(OUT)

# The browser tests drive Debian's Chromium with Playwright (never `playwright install`).
# Installed when missing; if that fails, the browser tests fail and say so.
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	{ $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; } \
	|| echo "warning: could not install chromium; the browser tests will fail saying so" >&2

test: $(VENV)/.installed-dev $(CHROMIUM)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/pytest -q -n 2

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/methods.py

# Coverage-guided fuzzing (atheris) of every reader, FUZZ_SECONDS per target (default 600);
# findings in fuzz_out/<target>/findings, a table at the end. `make test` runs a short,
# seeded burst of the same targets.
FUZZ_SECONDS ?= 600
fuzz: $(VENV)/.installed-dev
	$(PY) -m tests.fuzz.campaign --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info src/*.egg-info fuzz_out
