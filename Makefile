# The two set-up commands of the README: `make demo` (main job) and `make test` (whole suite).
# Each installs what it needs first: Python packages into .venv, Node tools (solc-js, anvil)
# into .tools. Both steps are stamped, so a second run does nothing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TOOLS := .tools
TOOLCHAIN := contracts/toolchain
TOOLS_STAMP := $(TOOLS)/.installed

.PHONY: demo test lint install

install: $(STAMP) $(TOOLS_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
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

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint $(TOOLS_STAMP)
	# pytest exits 5 when it collects no test; that is not a failure of the suite.
	$(PY) -m pytest -q -n 2 --dist loadgroup; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc
